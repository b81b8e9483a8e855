"""The reward model inside a DeepSpeed ZeRO-3 trainer: each rank holds 1/N of its parameters.

>>> from rewardplug.integrations.deepspeed import ShardedRewardModel
>>> rm = ShardedRewardModel.from_pretrained("Skywork/Skywork-VL-Reward-7B")  # doctest: +SKIP
>>> rm.score(my_rank_samples)  # every rank calls it, with its own samples (an empty list is fine)  # doctest: +SKIP

Under ZeRO-3 a forward pass gathers each layer's parameters from all ranks, so scoring is collective:
every rank must run the same forward passes in the same order. ``score`` first agrees with the other
ranks (over a gloo group with a timeout) on how many batches to run, then runs that many on every rank:
a rank with fewer samples runs filler batches, and every batch carries at least one image so every
rank calls the vision tower the same way. A rank that does not call ``score`` makes the others fail
with CollectiveTimeoutError after ``timeout_s``, instead of hanging.

The DeepSpeed config: the trainer's when accelerate's DeepSpeed plugin is active (its ZeRO settings,
without optimizer and scheduler, stage forced to 3), else the one given, else a plain ZeRO-3 config.
"""

from __future__ import annotations

import copy
import datetime
import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from PIL import Image

from ..encoding import collate
from ..errors import InvalidSampleError, RewardPlugError
from ..model import RewardModel

logger = logging.getLogger(__name__)


class CollectiveTimeoutError(RewardPlugError, TimeoutError):
    """Not every rank called the collective scoring call in time."""


def zero3_config(ds_config: dict | str | None = None, hidden_size: int | None = None) -> dict:
    """An inference ZeRO-3 config: the active trainer's (accelerate), the given one, or a default."""
    import json

    if ds_config is None:
        ds_config = _trainer_config()
    if isinstance(ds_config, str):
        with open(ds_config) as f:
            ds_config = json.load(f)
    # Only what shapes the sharding and precision carries over; batch sizes and the optimizer are the
    # trainer's business (inference runs its own batches).
    source = ds_config or {}
    config = {k: copy.deepcopy(source[k]) for k in ("zero_optimization", "bf16", "fp16") if k in source}
    zero = config.setdefault("zero_optimization", {})
    zero.pop("offload_optimizer", None)
    zero["stage"] = 3
    if hidden_size:
        for key, value in (("stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size)),
                           ("stage3_param_persistence_threshold", 10 * hidden_size)):  # fmt: skip
            if zero.get(key) in (None, "auto"):
                zero[key] = value
    zero = {k: v for k, v in zero.items() if v != "auto"}
    config["zero_optimization"] = zero
    for key in ("bf16", "fp16"):
        if isinstance(config.get(key), dict) and config[key].get("enabled") == "auto":
            config[key]["enabled"] = False
    config.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1)
    return config


def _trainer_config() -> dict | None:
    """The DeepSpeed config of the accelerate-launched trainer in this process, without creating
    accelerate's state (that would pre-empt the trainer's own set-up)."""
    import os

    try:
        from accelerate.state import AcceleratorState
        from accelerate.utils import DeepSpeedPlugin
    except ImportError:
        return None
    if AcceleratorState._shared_state:  # the trainer's Accelerator exists
        plugin = AcceleratorState().deepspeed_plugin
        return plugin.deepspeed_config if plugin is not None else None
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return DeepSpeedPlugin().deepspeed_config  # read from the same launcher settings the trainer reads
    return None


@dataclass
class ShardedRewardModel:
    """A RewardModel whose backbone is partitioned by ZeRO-3 across the ranks of the process group."""

    model: RewardModel
    engine: Any  # deepspeed engine (holds the hooks that gather parameters)
    batch_size: int = 8
    timeout_s: float = 300.0
    _group: Any = None

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, ds_config: dict | str | None = None, batch_size: int = 8,
                        timeout_s: float = 300.0, **options: Any) -> "ShardedRewardModel":  # fmt: skip
        """Load on every rank, then partition with ZeRO-3 (torch.distributed must be initialized)."""
        import deepspeed
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError("initialize torch.distributed first (deepspeed.init_distributed() or the trainer)")
        if "device" not in options and "device_map" not in options:
            options["device"] = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
        model = RewardModel.from_pretrained(name_or_path, **options)
        config = zero3_config(ds_config, model.config.text_config.hidden_size)
        engine, *_ = deepspeed.initialize(model=model.backbone, config=config)
        engine.eval()
        group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
        return cls(model, engine, batch_size, timeout_s, group)

    # ---- partition figures ----------------------------------------------------------------------

    def local_parameters(self) -> int:
        """Elements of the backbone's parameters stored on this rank."""
        return sum(_local_numel(p) for p in self.model.backbone.parameters())

    def total_parameters(self) -> int:
        return sum(getattr(p, "ds_numel", p.numel()) for p in self.model.backbone.parameters())

    # ---- scoring --------------------------------------------------------------------------------

    def score(self, samples: Sequence[Any], *, on_invalid: str = "raise") -> list[float | None]:
        """Collective: every rank calls this with its own samples. Returns this rank's scores.

        Bad samples are left out of the compute; with on_invalid="raise" the error (naming them, with the
        other scores in ``.scores``) is raised only after the collective steps, so other ranks go on.
        """
        import torch.distributed as dist

        samples = list(samples)
        encoded, errors = self.model.encode_many(samples)
        valid = [i for i, e in enumerate(encoded) if e is not None]
        valid.sort(key=lambda i: encoded[i].num_tokens)
        batches = [valid[k : k + self.batch_size] for k in range(0, len(valid), self.batch_size)]
        counts = torch.tensor([len(batches)], dtype=torch.long)
        try:
            dist.monitored_barrier(group=self._group, timeout=datetime.timedelta(seconds=self.timeout_s))
            dist.all_reduce(counts, op=dist.ReduceOp.MAX, group=self._group)
        except RuntimeError as e:
            raise CollectiveTimeoutError(
                f"rank {dist.get_rank()}: not every rank called score() within {self.timeout_s:.0f}s ({e}); in "
                "sharded mode every rank must call it, with its own samples (an empty list is fine)"
            ) from None
        scores: list[float | None] = [None] * len(samples)
        filler = self._filler()
        for step in range(int(counts.item())):
            rows = batches[step] if step < len(batches) else []
            batch_samples = [encoded[i] for i in rows]
            if not any(s.image_grid_thw is not None for s in batch_samples):
                batch_samples.append(filler)  # every rank runs the vision tower in every step
            values = self.model.forward(collate(batch_samples, self.model.pad_token_id, "right"))
            for i, v in zip(rows, values.tolist()):
                scores[i] = v
        if errors and on_invalid == "raise":  # after the collective steps, so the other ranks went on
            raise InvalidSampleError(errors, scores=scores)
        return scores

    def _filler(self):
        """A tiny image sample whose score is thrown away."""
        image = Image.new("RGB", (28, 28), (127, 127, 127))
        return self.model.encode({"prompt": "", "completion": "", "images": [image]})


def _local_numel(p: torch.nn.Parameter) -> int:
    tensor = getattr(p, "ds_tensor", None)
    return tensor.numel() if tensor is not None else p.numel()
