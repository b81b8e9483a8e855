"""Encoder workers: turn whole requests into work items (tokens, pixels, sharing keys), outside the
engine's loop. Host work (images, chat template) runs here while the model thread runs the device.

Requests are taken in arrival order, several at a time (one per worker), so a small request never
waits behind a large one being encoded. A request's items are handed over together, so its prompt
groups stay whole. A failure fails the request at hand, never the worker.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from typing import Callable

from ..errors import ScoringError
from .pending import PendingRequest
from .scheduler import WorkItem, make_item
from .stats import Stats

logger = logging.getLogger(__name__)


@dataclass
class Job:
    samples: list
    pending: PendingRequest


class EncoderPool:
    """``workers`` threads reading one intake queue (bounded by the engine's admission, in samples).

    deliver: receives each request's items, together. on_stopped: called once per worker that stops
    (after ``close``, once every queued request is encoded). encode: what encodes a request (the
    contract of ``RewardModel.encode_many``); default the model's own, in these threads; an
    ``EncoderProcesses``' ``encode_many`` makes each thread hand its request to a worker process.
    after_request: called by a worker after each request (the engine's ``cpu_cores="dedicated"``
    frees the thread's idle OpenMP workers there)."""

    def __init__(self, model, workers: int, stats: Stats, deliver: Callable[[list[WorkItem]], None],
                 on_stopped: Callable[[], None], encode: Callable | None = None,
                 after_request: Callable[[], object] | None = None):  # fmt: skip
        self.model = model
        self._encode_many = encode
        self._after_request = after_request
        self.stats = stats
        self._deliver = deliver
        self._on_stopped = on_stopped
        self._turn_start = model.turn_start_token_id  # the family's own (None: no prefix sharing)
        self._intake: queue.Queue[Job | None] = queue.Queue()
        self.threads = [
            threading.Thread(target=self._loop, name=f"rewardplug-encoder-{k}", daemon=True) for k in range(workers)
        ]
        for thread in self.threads:
            thread.start()

    def put(self, job: Job) -> None:
        self._intake.put(job)

    def close(self) -> None:
        """Stop every worker after the requests already queued (they are encoded first)."""
        for _ in self.threads:
            self._intake.put(None)

    def queued(self) -> int:
        return self._intake.qsize()

    def alive(self) -> bool:
        return any(t.is_alive() for t in self.threads)

    def _loop(self) -> None:
        try:
            while (job := self._intake.get()) is not None:
                try:
                    self._encode(job)
                except Exception as error:  # noqa: BLE001 - fail the request at hand, never the thread
                    logger.exception("encoding a request failed")
                    if isinstance(error, ScoringError):  # already says what failed (the encoder's own)
                        fail(job.pending, str(error), error.__cause__ or error)
                    else:
                        fail(job.pending, f"encoding a request of {len(job.samples)} samples failed", error)
                if self._after_request is not None:
                    self._after_request()
        finally:
            self._on_stopped()

    def _encode(self, job: Job) -> None:
        pending = job.pending
        if pending.done:
            return  # failed already (closed)
        encode_many = self._encode_many or self.model.encode_many
        encoded, errors = encode_many(job.samples)
        items = [make_item(e, self._turn_start, pending, i) for i, e in enumerate(encoded) if e is not None and i not in errors]
        bad = sorted(set(errors) | {i for i, e in enumerate(encoded) if e is None})
        if bad:
            self.stats.add(invalid_samples=len(bad))
            reasons = {k: errors.get(i, "could not be encoded") for k, i in enumerate(bad)}
            pending.resolve(bad, [None] * len(bad), reasons)
        if items:
            self._deliver(items)


def fail(pending: PendingRequest, message: str, cause: BaseException) -> None:
    """Fail a whole request with ``ScoringError(message)`` caused by ``cause`` (named once)."""
    error = ScoringError(message if str(cause) in message else f"{message} ({type(cause).__name__}: {cause})")
    error.__cause__ = cause
    pending.fail(error)
