"""Built-in model names that every command and loader accepts beside hub ids and folders.

``tiny`` is the embedded tiny checkpoint (random weights, the exact hub format, built in seconds);
``bench-cpu`` a CPU-sized model with the 7B's proportions; ``random-7b`` the Qwen2.5-VL-7B
architecture with random weights built on the target device (no download). Their scores mean
nothing: ``is_random`` says so and ``BANNER`` is what a command prints when one is used.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

TINY = "tiny"
BENCH_CPU = "bench-cpu"
RANDOM_7B = "random-7b"
RANDOM_WEIGHTS = (TINY, BENCH_CPU, RANDOM_7B)


def banner(model: str) -> str:
    """The warning a command prints whenever a random-weight model is used."""
    return (
        "=" * 78
        + f"\n  model {model!r}: RANDOM WEIGHTS, the scores mean nothing.\n"
        "  It runs the same loading and scoring code as the real model. With the real weights:\n"
        "    --model Skywork/Skywork-VL-Reward-7B\n"
        + "=" * 78
    )


def is_random(model: str | os.PathLike) -> bool:
    """True for the built-in random-weight names."""
    return str(model) in RANDOM_WEIGHTS


def checkpoint_path(model: str | os.PathLike) -> str:
    """A model argument as something ``RewardModel.from_pretrained`` reads: ``tiny`` and ``bench-cpu``
    become folders written once per process (cached); hub ids and folders are returned unchanged.
    ``random-7b`` has no folder: load it with ``load``."""
    model = str(model)
    if model == TINY:
        from .testing import cached_tiny_checkpoint

        return str(cached_tiny_checkpoint())
    if model == BENCH_CPU:
        return str(_bench_cpu_checkpoint())
    if model == RANDOM_7B:
        raise ValueError("'random-7b' is built on the device, not read from a folder: use rewardplug.named_models.load")
    return model


def load(model: str | os.PathLike, **options: Any):
    """``RewardModel.from_pretrained`` for a hub id, a folder or a built-in name."""
    from .model import RewardModel

    if str(model) == RANDOM_7B:
        raise NotImplementedError("random-7b is not built yet")
    return RewardModel.from_pretrained(checkpoint_path(model), **options)


_BENCH_CPU_DIR: Path | None = None


def _bench_cpu_checkpoint() -> Path:
    global _BENCH_CPU_DIR
    if _BENCH_CPU_DIR is None or not (_BENCH_CPU_DIR / "config.json").is_file():
        import tempfile

        from .bench import bench_cpu_config
        from .testing import make_tiny_checkpoint

        folder = Path(tempfile.mkdtemp(prefix="rewardplug-bench-cpu-"))
        _BENCH_CPU_DIR = make_tiny_checkpoint(folder / "bench-cpu", seed=0, config=bench_cpu_config(),
                                              max_pixels=12845056)  # fmt: skip
    return _BENCH_CPU_DIR
