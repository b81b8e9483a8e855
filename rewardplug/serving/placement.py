"""Where a replica's weights go: one GPU, several GPUs of one node (a balanced device map), or the CPU.

``plan_device_map`` works on the meta device, so the split of the real 7B over N GPUs can be computed
(and checked) on any machine, and is the same computation a replica runs on its GPUs.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

NO_SPLIT = ["Qwen2_5_VLDecoderLayer", "Qwen2_5_VLVisionBlock", "Qwen2VLDecoderLayer", "Qwen2VLVisionBlock"]


@dataclass
class DevicePlan:
    device: str | None  # "cuda", "cpu" (one device), or None when device_map is set
    device_map: dict | None
    bytes_per_device: dict  # device index -> parameter bytes placed there


def plan_device_map(checkpoint: str | os.PathLike, num_gpus: int, gpu_memory_bytes: int | list[int],
                    dtype: torch.dtype = torch.bfloat16, headroom: float = 0.85) -> DevicePlan:  # fmt: skip
    """Balanced split of a checkpoint's full model (vision tower, decoder layers, lm_head) over GPUs.

    Built on the meta device from config.json alone. ``headroom`` is the share of each GPU's memory
    the weights may take; the rest is left for activations and the key/value cache.
    Raises ValueError if the weights do not fit.
    """
    from accelerate.utils import compute_module_sizes, get_balanced_memory, infer_auto_device_map
    from transformers import AutoConfig

    from ..checkpoint import resolve_checkpoint
    from ..model import _backbone_class

    folder = resolve_checkpoint(checkpoint)
    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        full = _backbone_class(config.model_type)._from_config(config, dtype=dtype)
    sizes = gpu_memory_bytes if isinstance(gpu_memory_bytes, list) else [gpu_memory_bytes] * num_gpus
    max_memory = {i: int(s * headroom) for i, s in enumerate(sizes)}
    total = compute_module_sizes(full, dtype=dtype)[""]
    if total > sum(max_memory.values()):
        raise ValueError(
            f"the model needs {total / 2**30:.1f} GiB of weights in {dtype}, more than {num_gpus} GPUs of "
            f"{[round(s / 2**30, 1) for s in sizes]} GiB give at {headroom:.0%} headroom"
        )
    if num_gpus > 1:
        max_memory = get_balanced_memory(full, max_memory=max_memory, no_split_module_classes=NO_SPLIT, dtype=dtype)
    device_map = infer_auto_device_map(full, max_memory=max_memory, no_split_module_classes=NO_SPLIT, dtype=dtype)
    if any(not isinstance(d, int) for d in device_map.values()):
        raise ValueError(f"the model does not fit on {num_gpus} GPUs: some modules went to {set(device_map.values())}")
    module_sizes = compute_module_sizes(full, dtype=dtype)
    placed: dict = {}
    for name, dev in device_map.items():
        placed[dev] = placed.get(dev, 0) + module_sizes[name]
    return DevicePlan(None, device_map, dict(sorted(placed.items())))


def load_on_assigned_gpus(checkpoint: str | os.PathLike, gpu_ids: list, **options):
    """A RewardModel on the GPUs Ray assigned (one, several split by a balanced map, or none: CPU).

    ``checkpoint`` may be a built-in name (``rewardplug.named_models``): ``tiny`` and ``bench-cpu`` are
    written on the replica's node; ``random-7b`` is built on the planned device (one device only; its
    ``layers`` option keeps the first N language layers)."""
    from .. import named_models
    from ..model import _resolve_dtype

    dtype = options.get("dtype", "auto")
    plan_dtype = torch.bfloat16 if dtype in (None, "auto") else _resolve_dtype(dtype, None)
    options = {k: v for k, v in options.items() if k not in ("device", "device_map")}
    if str(checkpoint) == named_models.RANDOM_7B:
        if len(gpu_ids) > 1:
            raise ValueError(f"{named_models.RANDOM_7B!r} is built on one device, but this replica was given "
                             f"{len(gpu_ids)} GPUs: use gpus_per_replica=1 (or 0 for the CPU)")  # fmt: skip
        plan = replica_device_plan(None, gpu_ids, plan_dtype)
        return named_models.load(checkpoint, device=plan.device, **options)
    plan = replica_device_plan(named_models.checkpoint_path(checkpoint), gpu_ids, plan_dtype)
    return named_models.load(checkpoint, device=plan.device, device_map=plan.device_map, **options)


def replica_device_plan(checkpoint: str | os.PathLike | Path | None, gpu_ids: list, dtype: torch.dtype) -> DevicePlan:
    """What a pool replica uses, given the GPUs Ray assigned to it (``checkpoint`` is read only to split
    the model over several GPUs)."""
    if not gpu_ids:
        return DevicePlan("cpu", None, {})
    if not torch.cuda.is_available():
        logger.warning("Ray assigned GPUs %s but CUDA is not available in this process: running on the CPU", gpu_ids)
        return DevicePlan("cpu", None, {})
    count = torch.cuda.device_count()
    if count <= 1:
        return DevicePlan("cuda", None, {})
    memory = [torch.cuda.mem_get_info(i)[1] for i in range(count)]
    return plan_device_map(checkpoint, count, memory, dtype=dtype)
