"""RewardEngine: many callers submit samples; background threads batch them and resolve futures.

Two threads, one job each:
- the encoder turns each request's samples into tokens and pixels (CPU work: images, template);
- the model loop gathers encoded samples for up to ``max_wait_ms``, drops duplicates, plans
  token-budget batches with prompt groups kept together, runs them, and resolves the futures.

>>> from rewardplug import RewardEngine, RewardModel
>>> engine = RewardEngine(RewardModel.from_pretrained(path))  # doctest: +SKIP
>>> future = engine.submit([{"prompt": "Hi", "completion": "Hello!"}])  # doctest: +SKIP
>>> future.result()  # doctest: +SKIP
[0.42]
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Sequence

from ..errors import InvalidSampleError
from ..model import RewardModel
from .runner import ModelRunner
from ..samples import token_samples
from .scheduler import WorkItem, make_item, make_units, plan_batches
from .stats import Stats
from .caches import VisionCache

logger = logging.getLogger(__name__)


@dataclass
class _Request:
    samples: list
    future: Future
    on_invalid: str
    submitted: float = field(default_factory=time.perf_counter)
    scores: list = field(default_factory=list)
    errors: dict = field(default_factory=dict)
    remaining: int = 0
    done: set = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def resolve_one(self, index: int, value: "float | BaseException") -> bool:
        """Record one sample's outcome (the first one counts); True when the last sample gets one."""
        with self.lock:
            if index in self.done:
                return False
            self.done.add(index)
            if isinstance(value, BaseException):
                self.errors[index] = str(value)
            else:
                self.scores[index] = value
            self.remaining -= 1
            return self.remaining == 0


class RewardEngine:
    """In-process async batching over one RewardModel.

    max_batch_tokens: padded tokens per forward pass (batch rows x longest row).
    max_batch_size: rows per forward pass.
    max_wait_ms: how long the first sample waits for others to join its batch.
    vision_cache_mb: vision tower outputs kept by image content.
    share_prefix: encode a prompt shared by several completions once (key/value reuse).
    on_invalid: "raise" (default): a request with bad samples fails with InvalidSampleError, whose
        ``errors`` name each bad sample and whose ``scores`` hold the others' scores; "none": bad
        samples get None.
    """

    def __init__(
        self,
        model: RewardModel,
        *,
        max_batch_tokens: int = 16384,
        max_batch_size: int = 64,
        max_wait_ms: float = 5.0,
        vision_cache_mb: float = 1024,
        share_prefix: bool = True,
        on_invalid: str = "raise",
    ):
        if on_invalid not in ("raise", "none"):
            raise ValueError(f"on_invalid must be 'raise' or 'none', got {on_invalid!r}")
        self.model = model
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1e3
        self.share_prefix = share_prefix
        self.on_invalid = on_invalid
        self._stats = Stats()
        self.vision_cache = VisionCache(int(vision_cache_mb * 2**20))
        self.runner = ModelRunner(model, self.vision_cache, self._stats)
        self._im_start = model.processor.tokenizer.convert_tokens_to_ids("<|im_start|>")
        self._intake: queue.Queue[_Request | None] = queue.Queue()
        self._ready: list[WorkItem] = []
        self._cond = threading.Condition()
        self._closed = False
        self._lifecycle = threading.Lock()
        self._encoding_done = False
        self._encoder = threading.Thread(target=self._encode_loop, name="rewardplug-encoder", daemon=True)
        self._worker = threading.Thread(target=self._model_loop, name="rewardplug-model", daemon=True)
        self._encoder.start()
        self._worker.start()

    # ---- public API ----------------------------------------------------------------------------

    def submit(self, samples: Sequence[Any], *, on_invalid: str | None = None) -> Future:
        """Queue samples for scoring; returns at once a Future of their scores, in input order."""
        if on_invalid not in (None, "raise", "none"):
            raise ValueError(f"on_invalid must be 'raise' or 'none', got {on_invalid!r}")
        if isinstance(samples, dict):
            raise TypeError("submit() takes a list of samples; wrap a single sample in a list")
        samples = list(samples)
        request = _Request(samples, Future(), on_invalid or self.on_invalid)
        request.future.set_running_or_notify_cancel()
        request.scores = [None] * len(samples)
        request.remaining = len(samples)
        self._stats.add(requests=1, samples=len(samples))
        with self._lifecycle:  # no request may slip in behind close()'s stop marker
            if self._closed:
                raise RuntimeError("RewardEngine is closed")
            if not samples:
                request.future.set_result([])
            else:
                self._intake.put(request)
        return request.future

    def score(self, samples: Sequence[Any], *, on_invalid: str | None = None, timeout: float | None = None) -> list:
        return self.submit(samples, on_invalid=on_invalid).result(timeout)

    async def ascore(self, samples: Sequence[Any], *, on_invalid: str | None = None) -> list:
        return await asyncio.wrap_future(self.submit(samples, on_invalid=on_invalid))

    def score_tokens(self, input_ids: Any, images: list | None = None, attention_mask: Any = None, **kw) -> list:
        """Score conversations given as token ids (see ``rewardplug.samples.token_samples``)."""
        return self.score(token_samples(input_ids, images, attention_mask), **kw)

    def stats(self) -> dict:
        """Counters since start: samples, tokens, padding efficiency, cache and prefix hits, latency."""
        out = self._stats.snapshot()
        with self._cond:
            ready = len(self._ready)
        out.update(
            queue_depth=self._intake.qsize() + ready,
            vision_cache_bytes=self.vision_cache.bytes,
            vision_cache_entries=len(self.vision_cache),
        )
        return out

    def close(self, timeout: float | None = None) -> None:
        """Finish queued work, then stop the threads. Later submits raise."""
        with self._lifecycle:
            if self._closed:
                return
            self._closed = True
            self._intake.put(None)
        self._encoder.join(timeout)
        self._worker.join(timeout)

    def __enter__(self) -> "RewardEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- threads -------------------------------------------------------------------------------

    def _encode_loop(self) -> None:
        while (request := self._intake.get()) is not None:
            items = []
            for i, sample in enumerate(request.samples):
                encoded, errors = self.model.encode_many([sample])
                if errors:
                    self._stats.add(invalid_samples=1)
                    self._finish(request, i, ValueError(errors[0]))
                else:
                    items.append(make_item(encoded[0], self._im_start, request, i))
            with self._cond:  # a request's items arrive together, so its prompt group stays whole
                self._ready.extend(items)
                self._cond.notify()
        with self._cond:
            self._encoding_done = True
            self._cond.notify()

    def _model_loop(self) -> None:
        while True:
            with self._cond:
                while not self._ready and not self._encoding_done:
                    self._cond.wait()
                if not self._ready:
                    return  # closed and drained
                deadline = time.perf_counter() + self.max_wait_s
                while not self._encoding_done and not self._window_full():
                    remaining = deadline - time.perf_counter()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                items, self._ready = self._ready, []
            try:
                self._score(items)
            except Exception as error:  # noqa: BLE001 - never let the loop die; fail these samples
                logger.exception("engine batch failed")
                for item in items:
                    self._finish(item.owner, item.index, error)

    def _window_full(self) -> bool:
        tokens = sum(i.num_tokens for i in self._ready)
        return tokens >= self.max_batch_tokens or len(self._ready) >= 4 * self.max_batch_size

    def _score(self, items: list[WorkItem]) -> None:
        unique: dict[bytes, WorkItem] = {}
        copies: dict[bytes, list[WorkItem]] = {}
        for item in items:
            if item.key in unique:
                copies.setdefault(item.key, []).append(item)
            else:
                unique[item.key] = item
        self._stats.add(duplicate_hits=len(items) - len(unique))
        units = make_units(list(unique.values()), self.share_prefix)
        for plan in plan_batches(units, self.max_batch_tokens, self.max_batch_size):
            for item, value in self.runner.run(plan.units):
                for target in [item, *copies.get(item.key, [])]:
                    if isinstance(value, BaseException):
                        self._stats.add(failed_samples=1)
                    self._finish(target.owner, target.index, value)

    def _finish(self, request: _Request, index: int, value: "float | BaseException") -> None:
        if not request.resolve_one(index, value):
            return
        self._stats.latency(time.perf_counter() - request.submitted)
        if request.errors and request.on_invalid == "raise":
            request.future.set_exception(InvalidSampleError(request.errors, scores=request.scores))
        else:
            request.future.set_result(request.scores)
