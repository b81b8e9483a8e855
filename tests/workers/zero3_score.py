"""Run by the deepspeed launcher (2 ranks, gloo, CPU) from tests/test_deepspeed.py.

argv: checkpoint, output folder, mode ("score" or "misuse"). Each rank writes rank{r}.json.
"""

import json
import sys
from pathlib import Path

import deepspeed
import numpy as np
import torch.distributed as dist
from PIL import Image

from rewardplug.integrations.deepspeed import CollectiveTimeoutError, ShardedRewardModel


def samples_for(rank: int) -> list:
    rng = np.random.default_rng(rank)
    image = Image.fromarray((rng.random((60, 90, 3)) * 255).astype("uint8"))
    if rank == 0:  # more samples, with images, than rank 1
        return [{"prompt": "What is it?", "completion": "x" * (k + 1), "images": [image]} for k in range(5)] + [
            {"prompt": "Text only.", "completion": "Fine, thanks."}
        ]
    return [{"prompt": "Hello?", "completion": "Hi."}]  # one text-only sample


def main():
    checkpoint, out, mode = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    config = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    if mode == "trl":
        # A trainer's accelerate set-up with its DeepSpeed plugin: the reward model reuses its config.
        from accelerate import Accelerator
        from accelerate.utils import DeepSpeedPlugin

        Accelerator(cpu=True, deepspeed_plugin=DeepSpeedPlugin(hf_ds_config={**config, "train_batch_size": "auto",
                                                                             "train_micro_batch_size_per_gpu": "auto"}))
        config = None
    rm = ShardedRewardModel.from_pretrained(checkpoint, ds_config=config, batch_size=2, timeout_s=15,
                                            dtype="float32", image_roots=None)
    result = {"rank": rank, "local": rm.local_parameters(), "total": rm.total_parameters()}
    samples = samples_for(rank)
    result["samples"] = len(samples)
    if mode == "score":
        result["scores"] = rm.score(samples)
        result["again"] = rm.score(samples[:1] if rank == 0 else [])  # an empty list still takes part
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
        # rank 1 never calls score()
    (out / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
