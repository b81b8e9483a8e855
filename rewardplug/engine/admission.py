"""Admission: samples accepted and not yet resolved, bounded by ``max_queued_samples``, and who waits
for room (threads and event loops). Outside the engine's loop: callers wait here, never in the loop."""

from __future__ import annotations

import asyncio
import threading
import time

from ..errors import BusyError, EngineClosedError, ScoringError
from .pending import PendingRequest


class Admission:
    """``busy="wait"``: a request waits for room (up to its timeout); ``busy="raise"``: ``BusyError`` at once.
    A single request larger than the whole bound is admitted only when nothing else is queued."""

    def __init__(self, max_queued_samples: int, busy: str):
        if busy not in ("wait", "raise"):
            raise ValueError(f"busy must be 'wait' or 'raise', got {busy!r}")
        if max_queued_samples < 1:
            raise ValueError(f"max_queued_samples must be at least 1, got {max_queued_samples}")
        self.max_queued_samples = max_queued_samples
        self.busy = busy
        self.closed = False
        self.queued = 0
        self._pending: set[PendingRequest] = set()
        self._room = threading.Condition()
        self._async_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []

    def admit(self, size: int, timeout: float | None) -> None:
        """Take room for ``size`` samples, waiting up to ``timeout`` (None: forever)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._room:
            while not self._fits(size):
                if self.closed:
                    raise EngineClosedError("the RewardEngine is closed")
                if self.busy == "raise":
                    raise self._busy(size, None)
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise self._busy(size, timeout)
                self._room.wait(remaining)
            self.queued += size

    async def admit_async(self, size: int, timeout: float | None) -> None:
        """``admit`` without blocking the event loop."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._room:  # checking and registering under one lock: no wake-up is lost
                if self.closed:
                    raise EngineClosedError("the RewardEngine is closed")
                if self._fits(size):
                    self.queued += size
                    return
                if self.busy == "raise":
                    raise self._busy(size, None)
                waiter = (loop, loop.create_future())
                self._async_waiters.append(waiter)
            remaining = None if deadline is None else deadline - time.monotonic()
            try:
                if remaining is not None and remaining <= 0:
                    raise asyncio.TimeoutError
                await asyncio.wait_for(asyncio.shield(waiter[1]), remaining)
            except asyncio.TimeoutError:
                raise self._busy(size, timeout) from None
            finally:
                with self._room:
                    if waiter in self._async_waiters:
                        self._async_waiters.remove(waiter)

    def track(self, pending: PendingRequest) -> None:
        """Remember an admitted request until ``release`` (so ``fail_all`` reaches it)."""
        with self._room:
            self._pending.add(pending)

    def release(self, pending: PendingRequest) -> None:
        """A request is resolved: give back its room."""
        with self._room:
            self.queued -= pending.size
            self._pending.discard(pending)
        self.wake()

    def close(self) -> None:
        with self._room:
            self.closed = True
        self.wake()

    def wake(self) -> None:
        with self._room:
            self._room.notify_all()
            waiters, self._async_waiters = self._async_waiters, []
        for loop, future in waiters:
            try:
                loop.call_soon_threadsafe(_set_done, future)
            except RuntimeError:  # that loop is closed: nobody waits there any more
                pass

    def fail_all(self, kind: type[ScoringError], message: str) -> None:
        """Fail every request still unresolved (the engine closed or its threads stopped)."""
        with self._room:
            left = list(self._pending)
        for pending in left:
            pending.fail(kind(message))

    def _fits(self, size: int) -> bool:
        return self.queued == 0 or self.queued + size <= self.max_queued_samples

    def _busy(self, size: int, waited: float | None) -> BusyError:
        how = "busy='raise'" if waited is None else f"no room within {waited} s"
        return BusyError(
            f"the engine holds {self.queued} queued samples (max_queued_samples={self.max_queued_samples}); "
            f"a request of {size} does not fit ({how})"
        )


def _set_done(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)
