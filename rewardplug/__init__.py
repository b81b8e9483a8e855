"""rewardplug: a multimodal reward model (Skywork-VL-Reward and checkpoints of its shape) as a reward
service for online RL of vision-language models.

The errors import at once; the rest (torch, transformers, Ray) on first use, so that importing the
package (``rewardplug --help``, a reward process that only unpickles a pool handle) stays fast.
"""

from .errors import (
    BusyError, CheckpointError, EngineClosedError, InvalidSampleError, PoolBusyError, PoolConfigError, PoolNotFoundError,
    PoolTimeoutError, ReplicaError, RewardPlugError, SampleError, ScoringError,
)  # fmt: skip

__version__ = "0.1.0"

_LAZY = {
    "ImagePolicy": ".images",
    "RewardEngine": ".engine",
    "RewardModel": ".model",
    "RewardPool": ".serving.pool",
    "Sample": ".samples",
}

__all__ = [
    "BusyError", "CheckpointError", "EngineClosedError", "ImagePolicy", "InvalidSampleError", "PoolBusyError",
    "PoolConfigError", "PoolNotFoundError", "PoolTimeoutError", "ReplicaError", "RewardEngine", "RewardModel",
    "RewardPlugError", "RewardPool", "Sample", "SampleError", "ScoringError",
]  # fmt: skip


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'rewardplug' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
