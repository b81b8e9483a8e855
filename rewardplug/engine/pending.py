"""A request's future, resolved exactly once: one type for the engine and the pool.

Each sample gets one outcome, its score or the reason it cannot be scored (the first outcome counts);
a system failure ends the whole request with the error. When every sample has an outcome, or at the
first failure, the future is resolved: scores, ``InvalidSampleError`` (``on_invalid="raise"`` and some
sample was bad) or the failure. Later outcomes are ignored, so retries and late answers are harmless.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from typing import Callable, Sequence

from ..errors import InvalidSampleError

logger = logging.getLogger(__name__)

ON_INVALID = ("raise", "none")


def check_on_invalid(value: str | None, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value not in ON_INVALID:
        raise ValueError(f"on_invalid must be 'raise' or 'none', got {value!r}")


class PendingRequest:
    """The outcome of ``size`` samples, filled in by any thread, resolved once."""

    def __init__(self, size: int, on_invalid: str = "raise", on_done: Callable[["PendingRequest"], None] | None = None):
        check_on_invalid(on_invalid)
        self.size = size
        self.on_invalid = on_invalid
        self.future: Future = Future()
        self.future.set_running_or_notify_cancel()
        self.submitted = time.perf_counter()
        self.scores: list[float | None] = [None] * size
        self.errors: dict[int, str] = {}
        self.failed: BaseException | None = None
        self._decided = bytearray(size)  # 1 once a sample has its outcome
        self._remaining = size
        self._lock = threading.Lock()
        self._on_done = on_done
        if size == 0:
            self._resolve()

    @property
    def done(self) -> bool:
        return self.future.done()

    def set_score(self, index: int, score: float) -> bool:
        return self.resolve([index], [score], {})

    def set_invalid(self, index: int, reason: str) -> bool:
        return self.resolve([index], [None], {0: reason})

    def resolve(self, indices: Sequence[int], scores: Sequence[float | None], errors: dict[int, str]) -> bool:
        """Outcomes of the samples at ``indices`` (``errors`` keyed by position in ``indices``).
        True when this call completed the request."""
        with self._lock:
            if self._remaining == 0:
                return False
            for k, i in enumerate(indices):
                if self._decided[i]:
                    continue
                self._decided[i] = 1
                self._remaining -= 1
                if k in errors:
                    self.errors[i] = errors[k]
                else:
                    self.scores[i] = scores[k]
            if self._remaining:
                return False
        self._resolve()
        return True

    def fail(self, error: BaseException) -> bool:
        """End the whole request with a system failure (the first one counts). True if it did."""
        with self._lock:
            if self._remaining == 0:
                return False
            self._remaining = 0
            self.failed = error
        self._resolve()
        return True

    def _resolve(self) -> None:
        # Bookkeeping first (admission room, counters): a caller woken by the answer may submit again at
        # once and must find the room this request held, and counters that include it.
        if self._on_done is not None:
            try:
                self._on_done(self)
            except Exception:  # noqa: BLE001 - bookkeeping must never keep a request from resolving
                logger.exception("on_done callback of a pending request failed")
        if self.failed is not None:
            self.future.set_exception(self.failed)
        elif self.errors and self.on_invalid == "raise":
            self.future.set_exception(InvalidSampleError(self.errors, scores=self.scores))
        else:
            self.future.set_result(self.scores)
