"""Run by the deepspeed launcher (2 ranks, gloo, CPU) from tests/test_deepspeed.py.

argv: checkpoint, output folder, mode ("score", "misuse", "trl", "memory" or "no-fp16"). Each rank writes
rank{r}.json. "no-fp16" makes DeepSpeed's accelerator report no fp16 support, as on AMD EPYC CPUs with
avx512_bf16 but no avx512_fp16, whatever this machine's CPU has.
"""

import json
import resource
import sys
from pathlib import Path

import deepspeed
import numpy as np
import psutil
import torch.distributed as dist
from PIL import Image

from rewardplug.errors import ScoringError
from rewardplug.integrations.deepspeed import CollectiveTimeoutError, ShardedRewardModel

BAD = {"prompt": "What is it?", "completion": "x", "images": [b"not an image"]}


def samples_for(rank: int) -> list:
    rng = np.random.default_rng(rank)
    image = Image.fromarray((rng.random((60, 90, 3)) * 255).astype("uint8"))
    if rank == 0:  # more samples, with images, than rank 1
        return [{"prompt": "What is it?", "completion": "x" * (k + 1), "images": [image]} for k in range(5)] + [
            {"prompt": "Text only.", "completion": "Fine, thanks."}
        ]
    return [{"prompt": "Hello?", "completion": "Hi."}]  # one text-only sample


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def break_the_device(rm: ShardedRewardModel) -> None:
    """Every forward pass fails from here on, as on a GPU after an illegal memory access."""

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    rm.model.backbone.language_model.norm.forward = broken


def main():
    checkpoint, out, mode = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    if mode == "no-fp16":
        from deepspeed.accelerator import get_accelerator

        get_accelerator().is_fp16_supported = lambda: False  # the accelerator object is a process singleton
        assert not get_accelerator().is_fp16_supported()
    config = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    if mode == "trl":
        # A trainer's accelerate set-up with its DeepSpeed plugin: the reward model reuses its config.
        from accelerate import Accelerator
        from accelerate.utils import DeepSpeedPlugin

        Accelerator(cpu=True, deepspeed_plugin=DeepSpeedPlugin(hf_ds_config={**config, "train_batch_size": "auto",
                                                                             "train_micro_batch_size_per_gpu": "auto"}))
        config = None
    # Import the model code and read the processor first, so rss_before..peak is the load itself.
    from rewardplug import RewardModel

    RewardModel.from_pretrained(checkpoint, device="meta", image_roots=None)
    rss_before = psutil.Process().memory_info().rss
    rm = ShardedRewardModel.from_pretrained(checkpoint, ds_config=config, batch_size=2, timeout_s=15,
                                            dtype="float32", image_roots=None)
    result = {"rank": rank, "local": rm.local_parameters(), "total": rm.total_parameters(),
              "local_bytes": rm.local_bytes(), "rss_before": rss_before, "peak_rss_after_load": peak_rss()}  # fmt: skip
    samples = samples_for(rank)
    result["samples"] = len(samples)
    result["dtypes"] = sorted({str(p.dtype) for p in rm.model.backbone.parameters()})
    result["head_dtypes"] = sorted({str(p.dtype) for p in rm.model.value_head.parameters()})
    if mode in ("score", "memory", "no-fp16"):
        result["scores"] = rm.score(samples)
        result["peak_rss_after_score"] = peak_rss()
    if mode == "score":
        result["attention"] = rm.model.backbone.language_model.config._attn_implementation
        result["again"] = rm.score(samples[:1] if rank == 0 else [])  # an empty list still takes part
        result["fallback"] = rm.score([BAD] + samples[:1], on_invalid=-7.5)
        result["none"] = rm.score([BAD], on_invalid="none")
        try:
            rm.score([BAD] + samples[:1])
        except Exception as e:
            result["raised"] = {"type": type(e).__name__, "errors": {str(k): v for k, v in e.errors.items()},
                                "scores": e.scores}  # fmt: skip
        # A system failure on every rank: ScoringError, from the model and through the TRL reward function.
        from rewardplug.integrations.trl import RewardFunction

        break_the_device(rm)
        for name, call in (("score", lambda: rm.score(samples, on_invalid="none")),
                           ("trl", lambda: RewardFunction(rm)(prompts=["q"], completions=["a"], completion_ids=[[1]]))):  # fmt: skip
            try:
                value = call()
                result[f"broken_{name}"] = {"returned": value}
            except ScoringError as e:
                result[f"broken_{name}"] = {"type": type(e).__name__, "message": str(e), "cause": repr(e.__cause__)}
    elif mode == "trl":
        # What TRL's GRPOTrainer does on every rank: call the reward function with that rank's rows.
        from rewardplug.integrations.trl import RewardFunction

        reward = RewardFunction(rm)
        images = [s.get("images") or [] for s in samples]
        result["scores"] = reward(prompts=[s["prompt"] for s in samples], completions=[s["completion"] for s in samples],
                                  completion_ids=[[1, 2]] * len(samples), images=images, trainer_state=None)
    elif mode == "misuse":
        if rank == 0:
            try:
                rm.score(samples)
                result["error"] = None
            except CollectiveTimeoutError as e:
                result["error"] = str(e)
                result["is_scoring_error"] = isinstance(e, ScoringError)
        # rank 1 never calls score()
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    if mode != "misuse":  # there rank 1 never entered the collective rank 0 timed out in
        # Tear the gloo groups down before the interpreter does: a rank that exits with them alive can die
        # in C++ ("terminate called without an active exception", once in a CI run of the memory mode).
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
