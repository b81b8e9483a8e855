"""RewardEngine: many callers submit samples; background threads batch them and resolve futures.

Around the loop, one job each:
- admission (``admission.py``) bounds the samples accepted and not yet resolved; callers wait there;
- encoder workers (``encoders.py``) turn whole requests into work items (host work: images, chat
  template), several requests at a time, so a small request never waits behind a large one;
- the scheduler (``scheduler.py``) gathers ready items into rounds and plans token-budget batches.

The loop itself, on the model thread, is one step per batch (``_step``): schedule the next batch, run
it (``runner.launch``: its passes are queued with their scores left on the device), then postprocess
the batch before it (``runner.finish`` reads its scores, the one synchronisation; resolve its
requests). Batch k+1 is launched before batch k is read, across rounds too, so the device never waits
for the host's planning, collation and resolution between batches.

The loop stays on its own thread even for a blocking ``score()`` (nano-vllm runs it on the caller's):
on a CPU the caller's thread has an OpenMP pool that spins at full count, which on a busy host ran a
score 3-7x slower than the model thread's throttled pool (bench-cpu, 448 px, load 15 on 2 cores). On a
CPU whose cores are the engine's alone, ``cpu_cores="dedicated"`` lifts that throttle (``openmp.py``).

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
import threading
import time
from concurrent.futures import Future
from typing import Any, Sequence

from ..encoding import collate
from ..errors import EngineClosedError, ScoringError
from ..model import RewardModel
from ..samples import token_samples
from .admission import Admission
from .caches import VisionCache
from .encoders import EncoderPool, Job, fail
from .metrics import make_sink
from .openmp import free_idle_workers
from .pending import PendingRequest, check_on_invalid
from .runner import Launched, ModelRunner, SampleTooLarge
from .scheduler import PlanningFailed, ScheduledBatch, Scheduler, WorkItem
from .stats import Stats

logger = logging.getLogger(__name__)

PROBE_SAMPLE = {"prompt": "ping", "completion": "pong"}

InFlight = tuple[ScheduledBatch, Launched]


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
            each suffix pass holds ``rows x (padded prefix + padded suffix)`` of them, at most this many
            tokens (default ``max_batch_tokens``: a larger group runs its suffixes in several passes over
            its one prefix pass), i.e. at most ``max_kv_tokens x kv_bytes_per_token``
            bytes (``stats()["kv_budget_bytes"]``: 56 KiB per token for the 7B in bf16, 0.875 GiB at the
            default). Decided before running, never found by running out of memory.
        The pixel cache in front of the image processor belongs to the model's encoder
        (``RewardModel.from_pretrained(pixel_cache_mb=...)``, default 256 MiB).
        Stats keep at most 10,000 latencies and 64 ``stats(since=...)`` consumers.

    Encoding:
        encode_workers: encoder workers (default ``min(4, os.cpu_count())``).
        encode_processes: False (default): the workers are threads of this process (Python-bound host
            work then shares one interpreter lock); True: each worker thread hands its request to one of
            ``encode_workers`` encoder processes (``rewardplug.encoding.EncoderProcesses``), so host
            encoding scales with cores: the same token ids and pixels, returned through shared memory.
            A process that dies fails the request it held with ``ScoringError`` and is replaced.
            Each process keeps ``1/encode_workers`` of the model's pixel cache budget.

    Bad samples and failures:
        on_invalid: "raise" (default): a request with bad samples fails with InvalidSampleError, whose
            ``errors`` name each bad sample and whose ``scores`` hold the others' scores; "none": bad
            samples get None. A sample out of memory even alone is a bad sample (too large).
        A system failure (device error, bug) fails every request with samples in the failing batch with
        ``ScoringError`` (cause attached) and marks the engine unhealthy until a batch succeeds;
        ``check_health()`` raises while it stays broken. Only out of memory splits batches.

    CPU threads (no effect on a GPU):
        cpu_cores: "shared" (default): libgomp's own waiting between kernels, which sleeps at once
            while the process holds more OpenMP threads than the machine has cores (the right wait
            when other processes use them too); "dedicated": nothing else uses this machine's cores,
            so the encoder threads (after each request) and a caller waiting in ``score()`` free
            their idle OpenMP workers, and the model thread's workers spin between kernels: 1.1-1.3x
            faster on an idle machine, about 2x slower with two busy processes on its 2 cores
            (bench-cpu, ``benchmarks/cpu_threads.py``). A caller thread that runs torch kernels
            while the engine works (``submit``, then compute) keeps its workers, and the throttle.

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
        encode_processes: bool = False,
        max_queued_samples: int = 4096,
        busy: str = "wait",
        queue_timeout_s: float | None = None,
        max_kv_tokens: int | None = None,
        cpu_cores: str = "shared",
        metrics: Any = "prometheus",
        name: str = "default",
    ):
        check_on_invalid(on_invalid)
        if cpu_cores not in ("shared", "dedicated"):
            raise ValueError(f"cpu_cores must be 'shared' or 'dedicated', not {cpu_cores!r}")
        # Dedicated CPU cores: threads other than the model's give back their idle OpenMP workers.
        self._free_workers = cpu_cores == "dedicated" and model.device.type == "cpu"
        if self._free_workers:
            free_idle_workers()  # the thread that built the model and this engine
        self.model = model
        self.name = name
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = max_batch_size
        self.max_kv_tokens = max_batch_tokens if max_kv_tokens is None else max_kv_tokens
        self.share_prefix = share_prefix
        self.on_invalid = on_invalid
        self.queue_timeout_s = queue_timeout_s
        self.encode_workers = encode_workers or min(4, os.cpu_count() or 1)
        self._admission = Admission(max_queued_samples, busy)
        self._stats = Stats(sink=make_sink(metrics, name))
        self.vision_cache = VisionCache(int(vision_cache_mb * 2**20))
        self.runner = ModelRunner(model, self.vision_cache, self._stats, max_kv_tokens=self.max_kv_tokens)
        self.scheduler = Scheduler(
            max_batch_tokens=max_batch_tokens, max_batch_size=max_batch_size, max_kv_tokens=self.max_kv_tokens,
            max_wait_s=max_wait_ms / 1e3, share_prefix=share_prefix, producers=self.encode_workers, stats=self._stats,
        )  # fmt: skip
        self._probe_batch = None
        self._broken: BaseException | None = None  # the last system failure, until a batch succeeds
        self._lifecycle = threading.Lock()

        self._processes = None
        if encode_processes:
            from ..encoding import EncoderProcesses

            self._processes = EncoderProcesses.for_model(model, workers=self.encode_workers)
        self._encoders = EncoderPool(model, self.encode_workers, self._stats, self.scheduler.add,
                                     self.scheduler.producer_stopped,
                                     self._processes.encode_many if self._processes else None,
                                     after_request=free_idle_workers if self._free_workers else None)  # fmt: skip
        self._worker = threading.Thread(target=self._model_loop, name="rewardplug-model", daemon=True)
        self._worker.start()

    @property
    def max_queued_samples(self) -> int:
        return self._admission.max_queued_samples

    @property
    def busy(self) -> str:
        return self._admission.busy

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
        self._admission.admit(len(samples), self.queue_timeout_s if timeout is None else timeout)
        return self._enqueue(samples, on_invalid)

    def score(self, samples: Sequence[Any], *, on_invalid: str | None = None, timeout: float | None = None) -> list:
        """Scores of ``samples`` in order (blocking). ``timeout`` bounds the wait for room and result."""
        start = time.monotonic()
        future = self.submit(samples, on_invalid=on_invalid, timeout=timeout)
        if self._free_workers:
            free_idle_workers()  # this thread only waits now
        return future.result(None if timeout is None else max(0.0, timeout - (time.monotonic() - start)))

    async def ascore(self, samples: Sequence[Any], *, on_invalid: str | None = None, timeout: float | None = None) -> list:
        """Scores of ``samples``; waiting for room and for the result never blocks the event loop."""
        samples = self._check(samples, on_invalid)
        await self._admission.admit_async(len(samples), self.queue_timeout_s if timeout is None else timeout)
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
        out.update(
            queue_depth=self._encoders.queued() + self.scheduler.ready(),
            queued_samples=self._admission.queued,
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
        config = self.model.config
        text = config.get_text_config() if hasattr(config, "get_text_config") else getattr(config, "text_config", config)
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
            first = not self._admission.closed
            self._admission.close()
            if first:
                self._encoders.close()  # after every queued request: they are encoded first
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in [*self._encoders.threads, self._worker]:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        self._admission.fail_all(EngineClosedError, "the engine was closed before this request was scored")
        if self._processes is not None:  # after its threads: a thread still stuck on a process gets an error
            self._processes.close(timeout=10.0 if deadline is None else max(0.5, deadline - time.monotonic()))

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
        if self._admission.closed:
            raise EngineClosedError("the RewardEngine is closed")
        if not self._worker.is_alive() or not self._encoders.alive():
            raise EngineClosedError("the RewardEngine's threads are gone; nothing submitted would be scored")

    def _enqueue(self, samples: list, on_invalid: str | None) -> Future:
        pending = PendingRequest(len(samples), on_invalid or self.on_invalid, on_done=self._on_done)
        self._stats.add(requests=1, samples=len(samples))
        if not samples:
            return pending.future  # resolved already ([]); on_done gave back its (zero) room
        with self._lifecycle:  # no request may slip in behind close()'s stop markers
            if self._admission.closed:
                self._admission.release(pending)
                raise EngineClosedError("the RewardEngine is closed")
            self._admission.track(pending)
            self._encoders.put(Job(samples, pending))
        return pending.future

    def _on_done(self, pending: PendingRequest) -> None:
        self._stats.latency(time.perf_counter() - pending.submitted)
        if pending.failed is not None:
            self._stats.add(scoring_errors=1)
        self._admission.release(pending)

    # ---- the model thread: schedule, run, postprocess --------------------------------------------

    def _model_loop(self) -> None:
        inflight: InFlight | None = None
        try:
            while inflight is not None or not self.scheduler.finished:
                inflight = self._step(inflight)
        finally:
            # Normally nothing is left here; if this thread ever stops otherwise, nobody waits forever.
            self._admission.fail_all(EngineClosedError, "the engine's model thread stopped")

    def _step(self, inflight: InFlight | None) -> InFlight | None:
        """Launch the next batch, then read and resolve the one in flight; returns what is now in flight.

        With a batch in flight the scheduler does not wait for more samples: if none are ready, the batch
        in flight is read at once (on a CPU it has already run)."""
        batch = self._schedule(wait=inflight is None)
        launched = self.runner.launch(batch.units) if batch is not None else None
        if inflight is not None:
            self._postprocess(*inflight)
        return (batch, launched) if batch is not None else None

    def _schedule(self, wait: bool) -> ScheduledBatch | None:
        try:
            return self.scheduler.schedule(wait)
        except PlanningFailed as error:  # a bug in planning: fail that round's requests, go on
            logger.error("planning a round failed", exc_info=error.__cause__)
            self._system_failure(error.items, error.__cause__ or error, len(error.items))
            return None

    def _postprocess(self, batch: ScheduledBatch, launched: Launched) -> None:
        """Read a launched batch's scores (out of memory: run again, split) and resolve its requests."""
        planned = batch.items
        try:
            results = self.runner.finish(launched)
        except Exception as error:  # noqa: BLE001 - system failure: these requests fail, later ones run
            logger.error("scoring a batch failed: %s", error, exc_info=error)
            self._system_failure([t for i in planned for t in batch.targets(i)], error, len(planned))
            return
        self._broken = None
        try:
            outcomes: dict[PendingRequest, tuple[list, list, dict]] = {}
            for item, value in results:
                for target in batch.targets(item):
                    indices, scores, errors = outcomes.setdefault(target.owner, ([], [], {}))
                    if isinstance(value, SampleTooLarge):
                        self._stats.add(failed_samples=1)
                        errors[len(indices)] = str(value)
                    indices.append(target.index)
                    scores.append(None if isinstance(value, BaseException) else value)
            for owner, (indices, scores, errors) in outcomes.items():
                owner.resolve(indices, scores, errors)
        except Exception as error:  # noqa: BLE001 - a bug outside the runner: fail these, go on
            logger.exception("resolving a batch failed")
            self._system_failure([t for i in planned for t in batch.targets(i)], error, len(planned))

    def _system_failure(self, items: list[WorkItem], error: BaseException, batch_size: int) -> None:
        self._broken = error
        cause = error.__cause__ if isinstance(error, ScoringError) and error.__cause__ is not None else error
        message = str(error) if isinstance(error, ScoringError) else (
            f"scoring a batch of {batch_size} samples failed ({type(error).__name__}: {error})"
        )
        for owner in {id(i.owner): i.owner for i in items}.values():
            fail(owner, message, cause)
