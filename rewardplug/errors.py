"""Errors a user can act on: each names what is wrong and where.

Two kinds, never mixed:
- a bad sample (``InvalidSampleError``, per sample, with the reason): the others are still scored;
- a system failure (``ScoringError`` and its subclasses: a device error, a bug, a replica lost for good,
  a timeout): the whole request fails with the cause. It is never turned into None or 0.0.
"""

from __future__ import annotations


class RewardPlugError(Exception):
    """Base class of rewardplug's own errors."""


class CheckpointError(RewardPlugError, ValueError):
    """A checkpoint folder is missing a file, or a file has the wrong keys or shapes."""


class InvalidSampleError(RewardPlugError, ValueError):
    """One or more samples cannot be scored.

    ``errors`` maps each bad sample's index (in the caller's list) to the reason. ``scores`` holds the
    other samples' scores (None for the bad ones) when they were scored anyway, else None.
    """

    def __init__(self, errors: dict[int, str], scores: list | None = None):
        self.errors = dict(sorted(errors.items()))
        self.scores = scores
        self.index = next(iter(self.errors))
        lines = [f"sample {i}: {reason}" for i, reason in self.errors.items()]
        shown = lines[:10] + ([f"... and {len(lines) - 10} more"] if len(lines) > 10 else [])
        noun = "sample" if len(lines) == 1 else "samples"
        super().__init__(f"{len(lines)} invalid {noun}:\n  " + "\n  ".join(shown))

    def __reduce__(self):  # keeps the error picklable across processes (Ray, multiprocessing)
        return (type(self), (self.errors, self.scores))


class SampleError(RewardPlugError, ValueError):
    """Why one sample cannot be scored; the caller adds the sample's index."""


class ScoringError(RewardPlugError, RuntimeError):
    """Scoring failed for a reason that is not the sample's: a device error, a bug, a lost replica, a
    timeout. The request fails as a whole with the cause (``__cause__``); a trainer step that gets it
    must fail, never train on a missing reward."""


class EngineClosedError(ScoringError):
    """The engine is closed, or its threads are gone: nothing submitted now would ever be scored."""


class BusyError(RewardPlugError):
    """Backpressure: the engine or pool holds as many queued samples as it allows (``busy="raise"``,
    or no room within the wait). Not a failure of the samples; try again later."""


class PoolBusyError(BusyError):
    """The pool's replicas hold as many in-flight samples as they allow (``busy="raise"``)."""


class PoolTimeoutError(ScoringError, TimeoutError):
    """A request took longer than ``request_timeout_s``."""


class ReplicaError(ScoringError):
    """A replica could not start (for example the model failed to load), or no replica is left."""


class PoolNotFoundError(RewardPlugError, LookupError):
    """``RewardPool.connect(name)``: no pool of that name runs on the cluster."""


class PoolConfigError(RewardPlugError, ValueError):
    """A named pool already runs with another model or other options than the ones asked for."""
