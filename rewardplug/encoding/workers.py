"""Encoder processes: host encoding (decode, resize, pixel codes, chat template, tokens, positions) in
worker processes, so it scales with cores instead of sharing one interpreter's lock.

``EncoderProcesses(factory, workers=n)`` starts n processes (spawn); each builds its own encoder with
``factory()`` (a picklable callable; ``EncoderProcesses.for_model(model)`` makes the one for a
``RewardModel``) and encodes whole requests. ``encode_many(samples)`` has the contract of
``Encoder.encode_many``: it sends the request to an idle process, which returns the encoded samples
through shared memory (``handoff``): bitwise the same ids, positions and pixel codes as encoding in this
process. Safe to call from several threads at once (one request per process at a time); the engine's
encoder threads can call it instead of the model's own ``encode_many``.

Failures keep their two kinds: a bad sample comes back as None with its reason; a process that dies
(killed, out of memory) fails the request it held with ``ScoringError`` naming the process and its exit
code, is replaced by a new one, and what it left in /dev/shm is removed. Samples that cannot be pickled
(objects only this process can read) are encoded in this process instead, with the same result.

Budgets: each process keeps a pixel cache of ``pixel_cache_bytes // workers`` (the factory's
encoder's budget is divided, so the pool together stays within it); at most one request per process is
in flight; a segment lives only from a reply's send to its read.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import queue
import threading
import traceback
import uuid
from dataclasses import dataclass, fields
from multiprocessing.connection import wait
from typing import Any, Callable, Sequence

import torch

from ..errors import ScoringError
from . import handoff
from .encoded import EncodedSample

logger = logging.getLogger(__name__)

_ctx = multiprocessing.get_context("spawn")
_START_ATTEMPTS = 3  # a replacement that dies while starting is tried again this many times in all


# ---- what a process needs to build its encoder ----------------------------------------------------


class MetaRopeIndex:
    """M-RoPE positions from the model's own ``get_rope_index``, on a copy of its backbone built on the
    meta device from the config (no weights: positions are a pure function of ids, types and grids), with
    eager attention: the copy never attends, and the model's own implementation (rewardplug's grouped SDPA)
    may not be registered in this process."""

    def __init__(self, backbone_class: type, config: Any):
        self.backbone_class, self.config = backbone_class, config
        self._backbone = None

    def __getstate__(self):
        return {"backbone_class": self.backbone_class, "config": self.config, "_backbone": None}

    def __call__(self, ids: torch.Tensor, mm: torch.Tensor, grid: torch.Tensor | None) -> torch.Tensor:
        if self._backbone is None:
            with torch.device("meta"):
                self._backbone = self.backbone_class._from_config(self.config, attn_implementation="eager")
        return self._backbone.get_rope_index(ids, mm, image_grid_thw=grid)[0]


@dataclass
class EncoderFactory:
    """Builds, in another process, an ``Encoder`` with the same settings as ``encoder`` (its processor,
    image processor, policy and bounds) and positions from ``rope_index`` (picklable)."""

    settings: dict
    rope_index: Any = None

    @classmethod
    def like(cls, encoder: Any, rope_index: Any = None, pixel_cache_bytes: int | None = None) -> "EncoderFactory":
        settings = {f.name: getattr(encoder, f.name) for f in fields(encoder) if f.name != "rope_index"}
        if pixel_cache_bytes is not None:
            settings["pixel_cache_bytes"] = int(pixel_cache_bytes)
        settings["resize_on_device"] = bool(encoder.resize_on_device)
        return cls(settings, rope_index)

    def __call__(self):
        from .encoder import Encoder

        return Encoder(**self.settings, rope_index=self.rope_index)


# ---- the worker process -------------------------------------------------------------------------


def _worker_main(factory: Callable[[], Any], conn, prefix: str) -> None:
    torch.set_num_threads(1)  # one core per process: the pool is what scales
    try:
        encoder = factory()
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which fails loudly
        conn.send(("failed", f"{type(e).__name__}: {e}", traceback.format_exc()))
        return
    conn.send(("ready", os.getpid()))
    sent = 0
    while True:
        try:
            payload = conn.recv_bytes()
        except EOFError:  # the parent is gone
            return
        try:
            samples = pickle.loads(payload)
        except BaseException as e:  # noqa: BLE001 - e.g. a class this process cannot import
            conn.send(("unreadable", f"{type(e).__name__}: {e}", traceback.format_exc()))
            continue
        if samples is None:
            return
        try:
            before = encoder.counters.snapshot()
            encoded, errors = encoder.encode_many(samples)
            after = encoder.counters.snapshot()
            sent += 1
            packed = handoff.pack(encoded, f"{prefix}-{sent}")
            delta = {k: after[k] - before[k] for k in after if after[k] != before[k]}
            try:
                conn.send(("ok", packed, errors, delta))
            except BaseException:
                handoff.discard(packed)
                raise
        except BaseException as e:  # noqa: BLE001 - a system failure of this request, not of the process
            conn.send(("error", f"{type(e).__name__}: {e}" if not isinstance(e, ScoringError) else str(e),
                       traceback.format_exc()))  # fmt: skip


# ---- the pool -----------------------------------------------------------------------------------


class _Worker:
    def __init__(self, slot: int, factory: Callable[[], Any], pool_id: str):
        self.slot = slot
        self.ready = False  # set when the process has built its encoder
        self.prefix = f"rp-enc-{pool_id}-{slot}-{uuid.uuid4().hex[:6]}"
        self.conn, child = _ctx.Pipe()
        self.process = _ctx.Process(target=_worker_main, args=(factory, child, self.prefix),
                                    name=f"rewardplug-encoder-{slot}", daemon=True)  # fmt: skip
        self.process.start()
        child.close()  # only the child holds its end: its death closes the pipe

    def describe(self) -> str:
        return f"encoder process {self.slot} (pid {self.process.pid})"

    def stop(self, timeout: float) -> None:
        try:
            self.conn.send_bytes(pickle.dumps(None))
        except (OSError, ValueError):
            pass
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout)
        self.conn.close()
        handoff.sweep(self.prefix)


class EncoderProcesses:
    """A pool of ``workers`` encoder processes. ``encode_many`` as ``Encoder.encode_many``.

    factory: a picklable callable that returns an encoder (built once in each process).
    counters: where the processes' counts go: an object with ``count(**deltas)`` (the model's encoder).
    fallback: encodes requests whose samples cannot be pickled, in this process (same contract).
    start_timeout_s: how long a process may take to start (import, load the processor)."""

    def __init__(
        self,
        factory: Callable[[], Any],
        workers: int = 2,
        *,
        counters: Any = None,
        tables: dict[bytes, torch.Tensor] | None = None,
        fallback: Callable[[Sequence[Any]], tuple] | None = None,
        start_timeout_s: float = 300.0,
    ):
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self.factory = factory
        self.workers = int(workers)
        self.counters = counters
        self.fallback = fallback
        self.start_timeout_s = float(start_timeout_s)
        self.replaced = 0  # processes replaced after they died
        self._tables = {} if tables is None else tables
        self._id = uuid.uuid4().hex[:8]
        self._lock = threading.Lock()
        self._closed = False
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._all: dict[int, _Worker] = {}
        self._usable = self.workers  # processes running or starting
        started = [self._spawn(k) for k in range(self.workers)]
        try:
            for w in started:
                self._await_ready(w)
        except BaseException:
            self.close()
            raise

    @classmethod
    def for_model(cls, model: Any, workers: int = 2, **options: Any) -> "EncoderProcesses":
        """Processes that encode exactly as ``model.encode_many`` does (its encoder's settings, its
        backbone's positions); counts go to the model's encoder, pixel codes share its table."""
        encoder = model.encoder
        rope = MetaRopeIndex(type(model.backbone), model.backbone.config) if encoder.rope_index is not None else None
        factory = EncoderFactory.like(encoder, rope, pixel_cache_bytes=encoder.pixel_cache_bytes // workers)
        tables = {}
        fast = encoder.pixel_cache.fast
        if fast is not None and fast.enabled:
            tables[fast.table.numpy().tobytes()] = fast.table
        options.setdefault("counters", encoder)
        options.setdefault("fallback", model.encode_many)
        return cls(factory, workers, tables=tables, **options)

    # ---- public --------------------------------------------------------------------------------

    def encode_many(self, samples: Sequence[Any]) -> tuple[list[EncodedSample | None], dict[int, str]]:
        """Encode a request in one of the processes; see ``Encoder.encode_many``. A process that dies
        fails this request with ``ScoringError`` (and is replaced)."""
        samples = list(samples)
        try:
            payload = pickle.dumps(samples, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as e:  # noqa: BLE001 - objects only this process can read: encode them here
            if self.fallback is None:
                raise ScoringError(f"samples cannot be sent to an encoder process: {type(e).__name__}: {e}") from e
            logger.debug("encoding a request in this process: its samples cannot be pickled (%s)", e)
            return self.fallback(samples)
        worker = self._take()
        reply = self._ask(worker, payload, len(samples))
        self._idle.put(worker)
        kind = reply[0]
        if kind == "unreadable" and self.fallback is not None:
            logger.debug("encoding a request in this process: an encoder process cannot read it (%s)", reply[1])
            return self.fallback(samples)
        if kind in ("error", "unreadable"):
            raise ScoringError(reply[1]) from _RemoteTraceback(reply[2])
        _, packed, errors, delta = reply
        encoded = handoff.unpack(packed, self._tables)
        if delta and self.counters is not None:
            self.counters.count(**delta)
        return encoded, errors

    def alive(self) -> int:
        """How many processes are running and ready (a replacement counts once it has started)."""
        with self._lock:
            return sum(w.ready and w.process.is_alive() for w in self._all.values())

    def pids(self) -> list[int]:
        with self._lock:
            return [w.process.pid for w in self._all.values()]

    def close(self, timeout: float = 10.0) -> None:
        """Stop every process (after the request each one holds) and remove any segment left."""
        with self._lock:
            self._closed = True
            workers = list(self._all.values())
            self._all.clear()
        for w in workers:
            w.stop(timeout)
        handoff.sweep(f"rp-enc-{self._id}")

    def __enter__(self) -> "EncoderProcesses":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- processes -----------------------------------------------------------------------------

    def _spawn(self, slot: int) -> _Worker:
        worker = _Worker(slot, self.factory, self._id)
        with self._lock:
            self._all[slot] = worker
        return worker

    def _await_ready(self, worker: _Worker) -> None:
        ready = wait([worker.conn, worker.process.sentinel], self.start_timeout_s)
        message = None
        if worker.conn in ready:
            try:
                message = worker.conn.recv()
            except EOFError:
                pass
        if message is not None and message[0] == "ready":
            worker.ready = True
            self._idle.put(worker)
            return
        if message is not None:
            worker.stop(5.0)
            raise ScoringError(f"{worker.describe()} could not build its encoder: {message[1]}") from _RemoteTraceback(message[2])
        if ready:  # the process ended
            worker.process.join(5.0)
            handoff.sweep(worker.prefix)
            raise ScoringError(f"{worker.describe()} died while starting (exit code {worker.process.exitcode})")
        worker.stop(5.0)
        raise ScoringError(f"{worker.describe()} did not start within {self.start_timeout_s:.0f} s")

    def _take(self) -> _Worker:
        while True:
            if self._closed:
                raise ScoringError("the encoder processes are closed")
            if self._usable == 0:
                raise ScoringError("no encoder process is running (replacements failed to start; see the log)")
            try:
                worker = self._idle.get(timeout=1.0)
            except queue.Empty:
                continue
            if worker.process.is_alive():
                return worker
            self._lost(worker, "while idle")  # died between requests: replaced, and no request is failed

    def _ask(self, worker: _Worker, payload: bytes, n: int) -> tuple:
        try:
            worker.conn.send_bytes(payload)
            ready = wait([worker.conn, worker.process.sentinel])
            if worker.conn in ready:
                return worker.conn.recv()
        except (EOFError, OSError):
            pass
        except BaseException:  # interrupted while the process works: its reply would reach the next request
            worker.process.kill()
            self._replace(worker)
            raise
        # The process died with the request: fail the request, replace the process.
        code = self._lost(worker, f"while encoding a request of {n} samples")
        raise ScoringError(f"{worker.describe()} died (exit code {code}) while encoding a request of {n} "
                           "samples; a new process replaces it")  # fmt: skip

    def _lost(self, worker: _Worker, when: str) -> int | None:
        worker.process.join(5.0)
        code = worker.process.exitcode
        left = handoff.sweep(worker.prefix)
        logger.error("%s died (exit code %s) %s; starting a new one%s", worker.describe(), code, when,
                     f" (removed {len(left)} shared-memory segments)" if left else "")  # fmt: skip
        self._replace(worker)
        return code

    def _replace(self, dead: _Worker) -> None:
        dead.conn.close()
        with self._lock:
            if self._closed:
                return
            self.replaced += 1

        def start() -> None:
            for attempt in range(1, _START_ATTEMPTS + 1):
                try:
                    worker = self._spawn(dead.slot)
                    self._await_ready(worker)
                except Exception as e:  # noqa: BLE001 - tried again, then the pool works on with one less
                    logger.error("could not replace %s (attempt %d of %d): %s", dead.describe(), attempt,
                                 _START_ATTEMPTS, e)  # fmt: skip
                    continue
                if self._closed:
                    worker.stop(5.0)
                return
            with self._lock:
                self._usable -= 1

        threading.Thread(target=start, name=f"rewardplug-encoder-restart-{dead.slot}", daemon=True).start()


class _RemoteTraceback(Exception):
    """The traceback of a failure in an encoder process (the cause of the ScoringError raised here)."""

    def __str__(self) -> str:
        return "\n" + str(self.args[0]) if self.args else ""
