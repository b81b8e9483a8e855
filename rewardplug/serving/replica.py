"""The replica: one RewardModel and its RewardEngine as a Ray Serve deployment. Both doors call its
``score_samples``: the pool's Python handle and the HTTP door (``rewardplug.serving.http.HttpDoor``).

What Serve does for it: placement (``num_gpus`` per replica), routing (``ContentKeyRouter``), admission
(``max_ongoing_requests``: the pool's bound of parts plus ``CONTROL_SLOTS`` for control calls; a part
beyond the bound is refused at once and sent again: ``transport.send``), health checks (``check_health``)
and restarts, autoscaling. What it adds: the pool's identity (the
``PoolConfig`` it was built from: the pool's options live in Serve, with its replicas), its figures
on request (``info``) and ``sleep``/``wake`` (weights to host memory and back), each called on every
replica by the pool. They run on the replica's event loop, beside requests: a snapshot, never a
structure read while it changes.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
from ray import serve

from ..errors import InvalidSampleError
from ..offload import move_home, move_to_host
from .config import PoolConfig
from .transport import internalize

logger = logging.getLogger(__name__)

DEPLOYMENT = "RewardReplica"
CONTROL_SLOTS = 2  # calls a replica takes beyond the pool's bound: identity, info, sleep/wake never queue behind parts


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


class RewardReplica:
    def __init__(self, config: dict):
        import ray
        import torch

        from ..engine import RewardEngine
        from .placement import load_on_assigned_gpus

        self.config = c = PoolConfig(**config)
        self.gpu_ids = [str(g) for g in ray.get_gpu_ids()]
        context = serve.get_replica_context()
        self.replica_id = context.replica_id.unique_id if context else f"pid{os.getpid()}"
        # Host threads as many as the CPUs Ray gave this replica: replicas sharing a node must not each
        # run a thread per core of the machine (they would slow each other down).
        cpus = max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))
        torch.set_num_threads(cpus)
        self.model = load_on_assigned_gpus(c.model, self.gpu_ids, **c.model_options)
        # Metrics through Ray: one scrape target per node. On a GPU node with CPUs to spare, images are
        # encoded in worker processes (the GIL would otherwise slow the loop that feeds the GPU).
        engine_options = {"metrics": "ray", "name": context.app_name if context else "replica", "encode_workers": cpus,
                          "encode_processes": bool(self.gpu_ids) and cpus > 1, **c.engine_options}  # fmt: skip
        self.engine = RewardEngine(self.model, on_invalid="none", **engine_options)
        self.parts = 0  # calls of score_samples held
        self.inflight = 0
        self.peak_inflight = 0
        self._awake: asyncio.Event | None = None  # cleared while the weights are in host memory
        self._homes: list = []
        self._started = time.time()
        self._history = collections.deque([(self._started, 0)], maxlen=16)  # (time, samples) per health check

    # ---- the Python door ----------------------------------------------------------------------------

    async def score_samples(self, samples: list) -> tuple[list, dict] | None:
        """Scores (None for a bad sample) and the reasons of the bad ones, by position; None when this
        replica holds its bound of parts already (the pool's one bound; Serve's leaves room for control
        calls). Waits while the replica sleeps. A system failure raises (ScoringError)."""
        if self.parts >= self.config.max_ongoing_requests:
            return None
        self.parts += 1
        try:
            await self._event().wait()
            return await self._held(await internalize(samples))
        finally:
            self.parts -= 1

    async def _held(self, samples: list) -> tuple[list, dict]:
        self.inflight += len(samples)
        self.peak_inflight = max(self.peak_inflight, self.inflight)
        try:
            return await self.engine.ascore(samples, on_invalid="raise"), {}
        except InvalidSampleError as e:
            return e.scores, e.errors
        finally:
            self.inflight -= len(samples)

    def _event(self) -> asyncio.Event:
        if self._awake is None:  # made on the replica's event loop
            self._awake = asyncio.Event()
            self._awake.set()
        return self._awake

    # ---- control calls (RewardPool: on attach, stats/health, offload/onload) ------------------------

    async def identity(self) -> dict:
        """What this replica was built from (``PoolConfig.identity()``) and its tokenizer's turn marker."""
        return {"config": self.config.identity(),
                "im_start": self.model.processor.tokenizer.convert_tokens_to_ids("<|im_start|>")}  # fmt: skip

    async def sleep(self) -> dict:
        """Weights to host memory once the samples in hand are scored; requests wait until ``wake``."""
        awake = self._event()
        if awake.is_set():
            awake.clear()
            self._homes = []
        while self.inflight:
            await asyncio.sleep(0.01)
        before = _rss()
        self._homes = self._homes or move_to_host(self.model)
        return {"replica": self.replica_id, "offloaded": True, "rss_before": before, "rss_after": _rss()}

    async def wake(self) -> dict:
        t0 = time.perf_counter()
        awake = self._event()
        if not awake.is_set():
            move_home(self._homes)
            self._homes = []
            awake.set()
        return {"replica": self.replica_id, "offloaded": False, "onload_s": time.perf_counter() - t0}

    async def check_health(self) -> None:
        """Serve calls this periodically; raising marks the replica unhealthy, and Serve replaces it."""
        self.engine.check_health()
        self._history.append((time.time(), self.engine.stats().get("samples", 0)))

    async def info(self) -> dict:
        """This replica's figures now: engine counters, samples held, device, samples of the last minute."""
        import ray

        engine, now = self.engine.stats(), time.time()
        then, before = next((t, s) for t, s in [*self._history, (now, None)] if now - t <= 70)
        recent = engine.get("samples", 0) - (before if before is not None else engine.get("samples", 0))
        return {
            "replica": self.replica_id,
            "pid": os.getpid(),
            "node": ray.get_runtime_context().get_node_id(),
            "gpu_ids": self.gpu_ids,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "device": str(self.model.device),
            "offloaded": not self._event().is_set(),
            "inflight_samples": self.inflight,
            "peak_inflight_samples": self.peak_inflight,
            "uptime_s": now - self._started,
            "engine": engine,
            "recent": {"window_s": round(now - then, 1), "samples": recent,
                       "samples_per_s": round(recent / (now - then), 2) if now > then else 0.0},
            "reported_at": now,
        }
