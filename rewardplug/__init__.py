"""rewardplug: a multimodal reward model (Skywork-VL-Reward and checkpoints of its shape) as a reward
service for online RL of vision-language models."""

from .errors import CheckpointError, InvalidSampleError, RewardPlugError, SampleError
from .images import ImagePolicy
from .engine import RewardEngine
from .model import RewardModel
from .serving.pool import PoolBusyError, PoolTimeoutError, ReplicaError, RewardPool
from .samples import Sample

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ImagePolicy",
    "InvalidSampleError",
    "PoolBusyError",
    "PoolTimeoutError",
    "ReplicaError",
    "RewardEngine",
    "RewardModel",
    "RewardPool",
    "RewardPlugError",
    "Sample",
    "SampleError",
]
