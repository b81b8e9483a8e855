"""Errors a user can act on: each names what is wrong and where."""

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
