"""RewardEngine: many callers submit samples; background threads batch them and resolve futures.

Threads, one job each:
- encoder workers (``encode_workers``) take whole requests in arrival order, several at a time, and turn
  their samples into tokens and pixels (host work: images, chat template); a small request never waits
  behind a large one being encoded;
- the model thread gathers encoded samples for up to ``max_wait_ms``, drops duplicates, plans
  token-budget batches with prompt groups kept together, runs them and resolves the requests. A round
  takes at most ``4 x max_batch_tokens`` of ready samples, by turns from each request, so a small request
  never waits behind all of a large one being scored either.

Failures of two kinds, never mixed: a bad sample gets its own reason (``InvalidSampleError`` or None);
anything else (a device error, a bug, a closed engine) fails the whole request with ``ScoringError``
whose ``__cause__`` is the original. No thread dies of a failure: it fails the request at hand and goes on.

>>> from rewardplug import RewardEngine, RewardModel
>>> engine = RewardEngine(RewardModel.from_pretrained(path))  # doctest: +SKIP
>>> future = engine.submit([{"prompt": "Hi", "completion": "Hello!"}])  # doctest: +SKIP
>>> future.result()  # doctest: +SKIP
[0.42]
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Sequence

from ..encoding import collate
from ..errors import BusyError, EngineClosedError, ScoringError
from ..model import RewardModel
from ..samples import token_samples
from .caches import VisionCache
from .metrics import make_sink
from .pending import PendingRequest, check_on_invalid
from .runner import ModelRunner, SampleTooLarge
from .scheduler import WorkItem, make_item, make_units, plan_batches
from .stats import Stats

logger = logging.getLogger(__name__)

PROBE_SAMPLE = {"prompt": "ping", "completion": "pong"}


@dataclass
class _Job:
    samples: list
    pending: PendingRequest


class RewardEngine:
    """In-process async batching over one RewardModel.

    Batching:
        max_batch_tokens: padded tokens per forward pass (batch rows x longest row); default 16384.
        max_batch_size: rows per forward pass; default 64.
        max_wait_ms: how long the first sample waits for others to join its batch; default 5.
        share_prefix: encode a prompt shared by several completions once (key/value reuse); default on.

    Memory budgets (every cache and queue is bounded):
        max_queued_samples: samples accepted and not yet resolved (default 4096). When full, ``submit``
            waits for room (``busy="wait"``, up to ``queue_timeout_s``, default forever) or raises
            ``BusyError`` (``busy="raise"``); ``ascore`` waits without blocking its event loop. A single
            request larger than the whole bound is admitted only when the engine holds nothing else.
        vision_cache_mb: vision tower outputs kept by image content, in MiB (default 1024).
        max_kv_tokens: prefix sharing expands each prompt's key/value cache once per completion row;
            the planner keeps ``suffix rows x (longest prefix + longest suffix)`` of a batch under this
            many tokens (default ``max_batch_tokens``), i.e. at most ``max_kv_tokens x kv_bytes_per_token``
            bytes (``stats()["kv_budget_bytes"]``: 56 KiB per token for the 7B in bf16, 0.875 GiB at the
            default). Decided before running, never found by running out of memory.
        The pixel cache in front of the image processor belongs to the model's encoder
        (``RewardModel.from_pretrained(pixel_cache_mb=...)``, default 256 MiB).
        Stats keep at most 10,000 latencies and 64 ``stats(since=...)`` consumers.

    Threads:
        encode_workers: encoder threads (default ``min(4, os.cpu_count())``).

    Bad samples and failures:
        on_invalid: "raise" (default): a request with bad samples fails with InvalidSampleError, whose
            ``errors`` name each bad sample and whose ``scores`` hold the others' scores; "none": bad
            samples get None. A sample out of memory even alone is a bad sample (too large).
        A system failure (device error, bug) fails every request with samples in the failing batch with
        ``ScoringError`` (cause attached) and marks the engine unhealthy until a batch succeeds;
        ``check_health()`` raises while it stays broken. Only out of memory splits batches.

    Metrics:
        metrics: "prometheus" (default; prometheus_client's default registry), "ray" (Ray's metrics
            API, for Serve replicas), None, or a sink object (see ``rewardplug.engine.metrics``).
        name: the ``engine`` label of this engine's series (default "default").
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
        encode_workers: int | None = None,
        max_queued_samples: int = 4096,
        busy: str = "wait",
        queue_timeout_s: float | None = None,
        max_kv_tokens: int | None = None,
        metrics: Any = "prometheus",
        name: str = "default",
    ):
        check_on_invalid(on_invalid)
        if busy not in ("wait", "raise"):
            raise ValueError(f"busy must be 'wait' or 'raise', got {busy!r}")
        if max_queued_samples < 1:
            raise ValueError(f"max_queued_samples must be at least 1, got {max_queued_samples}")
        self.model = model
        self.name = name
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = max_batch_size
        self.max_kv_tokens = max_batch_tokens if max_kv_tokens is None else max_kv_tokens
        self.max_wait_s = max_wait_ms / 1e3
        self.share_prefix = share_prefix
        self.on_invalid = on_invalid
        self.max_queued_samples = max_queued_samples
        self.busy = busy
        self.queue_timeout_s = queue_timeout_s
        self.encode_workers = encode_workers or min(4, os.cpu_count() or 1)
        self._stats = Stats(sink=make_sink(metrics, name))
        self.vision_cache = VisionCache(int(vision_cache_mb * 2**20))
        self.runner = ModelRunner(model, self.vision_cache, self._stats)
        self._im_start = model.processor.tokenizer.convert_tokens_to_ids("<|im_start|>")
        self._probe_batch = None
        self._broken: BaseException | None = None  # the last system failure, until a batch succeeds

        self._intake: queue.Queue[_Job | None] = queue.Queue()  # bounded by the admission below
        self._ready: list[WorkItem] = []
        self._cond = threading.Condition()  # guards _ready and _encoders_done
        self._encoders_done = 0
        # Admission: samples accepted and not yet resolved, and who waits for room.
        self._room = threading.Condition()
        self._queued = 0
        self._pending: set[PendingRequest] = set()
        self._async_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []
        self._closed = False
        self._lifecycle = threading.Lock()

        self._encoders = [
            threading.Thread(target=self._encode_loop, name=f"rewardplug-encoder-{k}", daemon=True)
            for k in range(self.encode_workers)
        ]
        self._worker = threading.Thread(target=self._model_loop, name="rewardplug-model", daemon=True)
        for thread in [*self._encoders, self._worker]:
            thread.start()

    # ---- public API ----------------------------------------------------------------------------

    def submit(
        self, samples: Sequence[Any], *, on_invalid: str | None = None, timeout: float | None = None
    ) -> Future:
        """Queue samples for scoring; returns a Future of their scores, in input order.

        Returns at once while there is room (``max_queued_samples``); otherwise waits up to ``timeout``
        (default ``queue_timeout_s``) or raises ``BusyError`` (``busy="raise"``, or no room in time).
        Raises ``EngineClosedError`` once the engine is closed or its threads are gone.
        """
        samples = self._check(samples, on_invalid)
        self._admit_sync(len(samples), self.queue_timeout_s if timeout is None else timeout)
        return self._enqueue(samples, on_invalid)

    def score(self, samples: Sequence[Any], *, on_invalid: str | None = None, timeout: float | None = None) -> list:
        """Scores of ``samples`` in order (blocking). ``timeout`` bounds the wait for room and result."""
        start = time.monotonic()
        future = self.submit(samples, on_invalid=on_invalid, timeout=timeout)
        return future.result(None if timeout is None else max(0.0, timeout - (time.monotonic() - start)))

    async def ascore(self, samples: Sequence[Any], *, on_invalid: str | None = None, timeout: float | None = None) -> list:
        """Scores of ``samples``; waiting for room and for the result never blocks the event loop."""
        samples = self._check(samples, on_invalid)
        await self._admit_async(len(samples), self.queue_timeout_s if timeout is None else timeout)
        return await asyncio.wrap_future(self._enqueue(samples, on_invalid))

    def score_tokens(self, input_ids: Any, images: list | None = None, attention_mask: Any = None, **kw) -> list:
        """Score conversations given as token ids (see ``rewardplug.samples.token_samples``)."""
        return self.score(token_samples(input_ids, images, attention_mask), **kw)

    def stats(self, since: str | None = None) -> dict:
        """Counters, padding efficiency, cache and prefix hits, latency percentiles, queue and health.

        since=None: cumulative since the engine started. since="<consumer>": what changed since that
        consumer's previous call (since start on its first). Trainers should log the latter once per
        step (e.g. ``engine.stats(since="trainer")``): TRL averages logged values over a step, so
        cumulative counters are the wrong figure. Gauges (queue, cache bytes, health) are current.
        """
        out = self._stats.snapshot() if since is None else self._stats.delta(since)
        with self._cond:
            ready = len(self._ready)
        with self._room:
            queued = self._queued
        out.update(
            queue_depth=self._intake.qsize() + ready,
            queued_samples=queued,
            max_queued_samples=self.max_queued_samples,
            vision_cache_bytes=self.vision_cache.bytes,
            vision_cache_entries=len(self.vision_cache),
            kv_budget_bytes=self.max_kv_tokens * self.kv_bytes_per_token,
            healthy=self._broken is None,
        )
        return out

    @property
    def kv_bytes_per_token(self) -> int:
        """Key/value bytes one token takes over all layers (the unit of ``max_kv_tokens``)."""
        text = self.model.config.text_config
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        return 2 * text.num_hidden_layers * heads * head_dim * self.model.dtype.itemsize

    def check_health(self) -> None:
        """Raise while the engine cannot score; return quietly otherwise.

        Raises ``EngineClosedError`` when closed or its threads are gone, and ``ScoringError`` when the
        last batch failed with a system failure and a tiny probe forward fails too (so a Serve replica's
        ``check_health`` gets it restarted). A probe that passes clears the broken state.
        """
        self._check_open()
        broken = self._broken
        if broken is None:
            return
        try:
            if self._probe_batch is None:
                self._probe_batch = collate([self.model.encode(PROBE_SAMPLE)], self.model.pad_token_id, "right")
            self.model.forward(self._probe_batch)
        except Exception as error:
            raise ScoringError(
                f"the engine is broken: {broken}; a probe forward fails too ({type(error).__name__}: {error})"
            ) from error
        if self._broken is broken:
            self._broken = None
        logger.info("probe forward passed: the engine serves again")

    def close(self, timeout: float | None = None) -> None:
        """Finish queued work, then stop the threads; never hangs past ``timeout`` (seconds).

        Requests still unresolved when the threads are joined (or the timeout passes) fail with
        ``EngineClosedError``; later submits raise it.
        """
        with self._lifecycle:
            first = not self._closed
            self._closed = True
            if first:
                for _ in self._encoders:
                    self._intake.put(None)  # after every queued request: they are encoded first
        self._wake_waiters()
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in [*self._encoders, self._worker]:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        self._fail_pending(EngineClosedError, "the engine was closed before this request was scored")

    def __enter__(self) -> "RewardEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- admission -----------------------------------------------------------------------------

    def _check(self, samples: Sequence[Any], on_invalid: str | None) -> list:
        check_on_invalid(on_invalid, allow_none=True)
        if isinstance(samples, dict):
            raise TypeError("submit() takes a list of samples; wrap a single sample in a list")
        self._check_open()
        return list(samples)

    def _check_open(self) -> None:
        if self._closed:
            raise EngineClosedError("the RewardEngine is closed")
        if not self._worker.is_alive() or not any(t.is_alive() for t in self._encoders):
            raise EngineClosedError("the RewardEngine's threads are gone; nothing submitted would be scored")

    def _fits(self, size: int) -> bool:
        return self._queued == 0 or self._queued + size <= self.max_queued_samples

    def _busy(self, size: int, waited: float | None) -> BusyError:
        how = "busy='raise'" if waited is None else f"no room within {waited} s"
        return BusyError(
            f"the engine holds {self._queued} queued samples (max_queued_samples={self.max_queued_samples}); "
            f"a request of {size} does not fit ({how})"
        )

    def _admit_sync(self, size: int, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._room:
            while not self._fits(size):
                if self._closed:
                    raise EngineClosedError("the RewardEngine is closed")
                if self.busy == "raise":
                    raise self._busy(size, None)
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise self._busy(size, timeout)
                self._room.wait(remaining)
            self._queued += size

    async def _admit_async(self, size: int, timeout: float | None) -> None:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._room:  # checking and registering under one lock: no wake-up is lost
                if self._closed:
                    raise EngineClosedError("the RewardEngine is closed")
                if self._fits(size):
                    self._queued += size
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

    def _wake_waiters(self) -> None:
        with self._room:
            self._room.notify_all()
            waiters, self._async_waiters = self._async_waiters, []
        for loop, future in waiters:
            try:
                loop.call_soon_threadsafe(_set_done, future)
            except RuntimeError:  # that loop is closed: nobody waits there any more
                pass

    def _enqueue(self, samples: list, on_invalid: str | None) -> Future:
        pending = PendingRequest(len(samples), on_invalid or self.on_invalid, on_done=self._on_done)
        self._stats.add(requests=1, samples=len(samples))
        if not samples:
            return pending.future  # resolved already ([]); on_done gave back its (zero) room
        with self._lifecycle:  # no request may slip in behind close()'s stop markers
            if self._closed:
                self._release(pending)
                raise EngineClosedError("the RewardEngine is closed")
            with self._room:
                self._pending.add(pending)
            self._intake.put(_Job(samples, pending))
        return pending.future

    def _on_done(self, pending: PendingRequest) -> None:
        self._stats.latency(time.perf_counter() - pending.submitted)
        if pending.failed is not None:
            self._stats.add(scoring_errors=1)
        self._release(pending)

    def _release(self, pending: PendingRequest) -> None:
        with self._room:
            self._queued -= pending.size
            self._pending.discard(pending)
        self._wake_waiters()

    def _fail_pending(self, kind: type[ScoringError], message: str, cause: BaseException | None = None) -> None:
        with self._room:
            left = list(self._pending)
        for pending in left:
            error = kind(message)
            error.__cause__ = cause
            pending.fail(error)

    # ---- threads -------------------------------------------------------------------------------

    def _encode_loop(self) -> None:
        try:
            while (job := self._intake.get()) is not None:
                try:
                    self._encode(job)
                except Exception as error:  # noqa: BLE001 - fail the request at hand, never the thread
                    logger.exception("encoding a request failed")
                    if isinstance(error, ScoringError):  # already says what failed (the encoder's own)
                        _fail(job.pending, str(error), error.__cause__ or error)
                    else:
                        _fail(job.pending, f"encoding a request of {len(job.samples)} samples failed", error)
        finally:
            with self._cond:
                self._encoders_done += 1
                self._cond.notify_all()

    def _encode(self, job: _Job) -> None:
        pending = job.pending
        if pending.done:
            return  # failed already (closed)
        encoded, errors = self.model.encode_many(job.samples)
        items = [make_item(e, self._im_start, pending, i) for i, e in enumerate(encoded) if e is not None and i not in errors]
        bad = sorted(set(errors) | {i for i, e in enumerate(encoded) if e is None})
        if bad:
            self._stats.add(invalid_samples=len(bad))
            reasons = {k: errors.get(i, "could not be encoded") for k, i in enumerate(bad)}
            pending.resolve(bad, [None] * len(bad), reasons)
        if items:
            with self._cond:  # a request's items arrive together, so its prompt group stays whole
                self._ready.extend(items)
                self._cond.notify_all()

    def _model_loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._ready and self._encoders_done < len(self._encoders):
                        self._cond.wait()
                    if not self._ready:
                        return  # closed and drained
                    deadline = time.perf_counter() + self.max_wait_s
                    while self._encoders_done < len(self._encoders) and not self._window_full():
                        remaining = deadline - time.perf_counter()
                        if remaining <= 0:
                            break
                        self._cond.wait(remaining)
                    items = self._take_window()
                items = [i for i in items if not i.owner.done]  # requests failed meanwhile (closed)
                try:
                    self._score(items)
                except Exception as error:  # noqa: BLE001 - a bug outside the runner: fail these, go on
                    logger.exception("engine batch failed")
                    self._system_failure(items, error, len(items))
        finally:
            # Normally nothing is left here; if this thread ever stops otherwise, nobody waits forever.
            self._fail_pending(EngineClosedError, "the engine's model thread stopped")

    def _take_window(self) -> list[WorkItem]:
        """Ready items for one round of batches, at most ``4 x max_batch_tokens`` (past that, planning
        gains nothing): whole prompt groups taken by turns from each request, so a request that arrives
        while a large one is being scored joins the next round instead of waiting for all of it. The
        rest stay ready, in order. Called with ``_cond`` held."""
        budget = 4 * self.max_batch_tokens
        if sum(i.num_tokens for i in self._ready) <= budget:
            items, self._ready = self._ready, []
            return items
        requests: dict[int, dict[Any, list[WorkItem]]] = {}  # request -> its prompt groups and singles, in order
        for k, item in enumerate(self._ready):
            units = requests.setdefault(id(item.owner), {})
            units.setdefault(item.prefix_key or k, []).append(item)
        turns = [list(units.values()) for units in requests.values()]
        taken: set[int] = set()
        tokens = 0
        while tokens < budget:
            for units in turns:
                if units and tokens < budget:
                    unit = units.pop(0)
                    taken.update(id(i) for i in unit)
                    tokens += sum(i.num_tokens for i in unit)
            turns = [u for u in turns if u]
            if not turns:
                break
        items = [i for i in self._ready if id(i) in taken]
        self._ready = [i for i in self._ready if id(i) not in taken]
        return items

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
        # Batch k+1 is launched before batch k's scores are read: the device never waits for the host to
        # plan, collate and resolve between batches.
        waiting: tuple[list[WorkItem], Any] | None = None
        for plan in plan_batches(units, self.max_batch_tokens, self.max_batch_size, self.max_kv_tokens):
            launched = self.runner.launch(plan.units)
            if waiting is not None:
                self._resolve(*waiting, copies)
            waiting = ([i for u in plan.units for i in u.items], launched)
        if waiting is not None:
            self._resolve(*waiting, copies)

    def _resolve(self, planned: list[WorkItem], launched: Any, copies: dict[bytes, list[WorkItem]]) -> None:
        """Finish a launched batch (out of memory: run again, split) and resolve its requests."""
        try:
            results = self.runner.finish(launched)
        except Exception as error:  # noqa: BLE001 - system failure: these requests fail, later ones run
            logger.error("scoring a batch failed: %s", error, exc_info=error)
            self._system_failure([t for i in planned for t in [i, *copies.get(i.key, [])]], error, len(planned))
            return
        self._broken = None
        outcomes: dict[PendingRequest, tuple[list, list, dict]] = {}
        for item, value in results:
            for target in [item, *copies.get(item.key, [])]:
                indices, scores, errors = outcomes.setdefault(target.owner, ([], [], {}))
                if isinstance(value, SampleTooLarge):
                    self._stats.add(failed_samples=1)
                    errors[len(indices)] = str(value)
                indices.append(target.index)
                scores.append(None if isinstance(value, BaseException) else value)
        for owner, (indices, scores, errors) in outcomes.items():
            owner.resolve(indices, scores, errors)

    def _system_failure(self, items: list[WorkItem], error: BaseException, batch_size: int) -> None:
        self._broken = error
        cause = error.__cause__ if isinstance(error, ScoringError) and error.__cause__ is not None else error
        message = str(error) if isinstance(error, ScoringError) else (
            f"scoring a batch of {batch_size} samples failed ({type(error).__name__}: {error})"
        )
        for owner in {id(i.owner): i.owner for i in items}.values():
            _fail(owner, message, cause)


def _fail(pending: PendingRequest, message: str, cause: BaseException) -> None:
    error = ScoringError(message if str(cause) in message else f"{message} ({type(cause).__name__}: {cause})")
    error.__cause__ = cause
    pending.fail(error)


def _set_done(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)
