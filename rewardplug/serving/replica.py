"""The replica: one RewardModel and its RewardEngine as a Ray Serve deployment, with two doors: the
pool handle calls ``score_samples``; the HTTP routes (``rewardplug.serving.http``) are its other methods.

What Serve does for it: placement (``num_gpus`` per replica), routing (``ContentKeyRouter``), the one
admission bound (``max_ongoing_requests`` calls per replica; beyond it calls wait in Serve's router
queue), health checks (``check_health``) and restarts, autoscaling. What it adds: ``sleep``/``wake``
(weights to host memory and back, called on every replica by ``RewardPool.offload``/``onload``), and its
figures reported to the pool directory (on Serve's routing-stats and health-check calls, which run on
this replica's event loop, beside requests: a snapshot, never a structure read while it changes).
"""

# No `from __future__ import annotations`: FastAPI reads the routes' parameter types at class creation.
import asyncio
import collections
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from fastapi import HTTPException, Request
from fastapi.responses import PlainTextResponse
from ray import serve

from ..errors import InvalidSampleError
from .get_reward import GetRewardInvalidError, GetRewardRequestError, get_reward
from .http import HttpSettings, app, authorize, check_count, read_json, resolve_images
from .transport import internalize

logger = logging.getLogger(__name__)

DEPLOYMENT = "RewardReplica"


@dataclass
class ReplicaSettings:
    """Everything a replica is built from."""

    model: str
    model_options: dict = field(default_factory=dict)
    engine_options: dict = field(default_factory=dict)
    http: dict = field(default_factory=lambda: asdict(HttpSettings()))


def _move_to_host(model) -> list:
    """Every parameter and buffer of the model to (pinned, where CUDA exists) host memory; returns where
    each one lived, so a device map over several GPUs comes back as it was."""
    import torch

    homes = []
    for module in (model.backbone, model.value_head):
        for tensor in [*module.parameters(), *module.buffers()]:
            homes.append((tensor, tensor.device))
            if tensor.device.type != "cpu":
                host = tensor.data.to("cpu")
                tensor.data = host.pin_memory() if torch.cuda.is_available() else host
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return homes


def _move_home(homes: list) -> None:
    for tensor, device in homes:
        if tensor.device != device:
            tensor.data = tensor.data.to(device, non_blocking=True)


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


# Serve copies the methods with the module globals of this moment: helpers must be defined above.
@serve.ingress(app)
class RewardReplica:
    def __init__(self, settings: dict, pool_name: str = ""):
        import ray
        import torch

        from ..engine import RewardEngine
        from .placement import load_on_assigned_gpus

        self.settings = s = ReplicaSettings(**settings)
        self.http = HttpSettings(**s.http)
        self.http_policy = self.http.policy()
        self.pool_name = pool_name
        self.gpu_ids = [str(g) for g in ray.get_gpu_ids()]
        context = serve.get_replica_context()
        self.replica_id = context.replica_id.unique_id if context else f"pid{os.getpid()}"
        # Host threads as many as the CPUs Ray gave this replica: replicas sharing a node must not each
        # run a thread per core of the machine (they would slow each other down).
        cpus = max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))
        torch.set_num_threads(cpus)
        self.model = load_on_assigned_gpus(s.model, self.gpu_ids, **s.model_options)
        engine_options = {"metrics": "ray", "name": pool_name or "replica", "encode_workers": cpus,
                          **s.engine_options}  # metrics through Ray: one scrape target per node
        self.engine = RewardEngine(self.model, on_invalid="none", **engine_options)
        self.inflight = 0
        self.peak_inflight = 0
        self.requests = {"score": 0, "get_reward": 0}
        self._awake: asyncio.Event | None = None  # cleared while the weights are in host memory
        self._homes: list = []
        self._started = time.time()
        self._directory = None
        self._history: collections.deque = collections.deque(maxlen=256)  # (time, samples scored) per report

    # ---- the Python door ----------------------------------------------------------------------------

    async def score_samples(self, samples: list) -> tuple[list, dict]:
        """Scores (None for a bad sample) and the reasons of the bad ones, by position. Waits while the
        replica sleeps. A system failure raises (ScoringError)."""
        await self._wait_awake()
        self._hold(len(samples))
        try:
            return await self._score(await internalize(samples))
        finally:
            self.inflight -= len(samples)

    async def _score(self, samples: list) -> tuple[list, dict]:
        try:
            return await self.engine.ascore(samples, on_invalid="raise"), {}
        except InvalidSampleError as e:
            return e.scores, e.errors

    def _hold(self, n: int) -> None:
        self.inflight += n
        self.peak_inflight = max(self.peak_inflight, self.inflight)

    def _event(self) -> asyncio.Event:
        if self._awake is None:  # made on the replica's event loop
            self._awake = asyncio.Event()
            self._awake.set()
        return self._awake

    async def _wait_awake(self) -> None:
        await self._event().wait()

    def token_format(self) -> dict:
        return {"im_start": self.model.processor.tokenizer.convert_tokens_to_ids("<|im_start|>")}

    # ---- sleep and wake (called on every replica: RewardPool.offload / onload) ----------------------

    async def sleep(self) -> dict:
        """Weights to host memory once the samples in hand are scored; requests wait until ``wake``."""
        awake = self._event()
        if awake.is_set():
            awake.clear()
            self._homes = []
        while self.inflight:
            await asyncio.sleep(0.01)
        before = _rss()
        self._homes = self._homes or _move_to_host(self.model)
        self._report()
        return {"replica": self.replica_id, "offloaded": True, "rss_before": before, "rss_after": _rss()}

    async def wake(self) -> dict:
        t0 = time.perf_counter()
        awake = self._event()
        if not awake.is_set():
            _move_home(self._homes)
            self._homes = []
            awake.set()
        self._report()
        return {"replica": self.replica_id, "offloaded": False, "onload_s": time.perf_counter() - t0}

    @property
    def offloaded(self) -> bool:
        return self._awake is not None and not self._awake.is_set()

    # ---- Serve's hooks (on this replica's event loop) -----------------------------------------------

    async def check_health(self) -> None:
        """Serve calls this periodically; raising marks the replica unhealthy, and Serve replaces it."""
        self.engine.check_health()
        self._report()

    async def record_routing_stats(self) -> dict:
        self._report()
        return {"inflight_samples": self.inflight}

    # ---- what the pool reads ------------------------------------------------------------------------

    def _recent(self, samples: int, window_s: float = 60.0) -> dict:
        """Samples scored over about the last minute (reports come about once a second)."""
        now = time.time()
        self._history.append((now, samples))
        while len(self._history) > 1 and now - self._history[1][0] >= window_s:
            self._history.popleft()
        then, before = self._history[0]
        span = max(now - then, 1e-9)
        return {"window_s": round(span, 1), "samples": samples - before,
                "samples_per_s": round((samples - before) / span, 2) if now > then else 0.0}

    def info(self) -> dict:
        import ray

        engine = self.engine.stats()
        return {
            "replica": self.replica_id,
            "pid": os.getpid(),
            "node": ray.get_runtime_context().get_node_id(),
            "gpu_ids": self.gpu_ids,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "device": str(self.model.device),
            "offloaded": self.offloaded,
            "inflight_samples": self.inflight,
            "peak_inflight_samples": self.peak_inflight,
            "uptime_s": time.time() - self._started,
            "engine": engine,
            "recent": self._recent(engine.get("samples", 0)),
        }

    async def counters(self) -> dict:
        """This replica's engine counters now (``RewardPool.stats(fresh=True)`` asks every replica)."""
        return {"replica": self.replica_id, "engine": self.engine.stats(), "inflight_samples": self.inflight}

    def _report(self) -> None:
        """Send this replica's figures to the pool directory (fire and forget)."""
        if not self.pool_name:
            return
        try:
            if self._directory is None:
                from .directory import directory

                self._directory = directory()
            self._directory.report.remote(self.pool_name, self.replica_id, self.info())
        except Exception:  # noqa: BLE001 - reporting must never break serving
            logger.debug("stats report failed", exc_info=True)

    # ---- the HTTP door ------------------------------------------------------------------------------

    @app.post("/v1/score")
    async def http_score(self, request: Request) -> dict:
        authorize(request, self.http.api_key)
        data = await read_json(request, self.http.max_body_bytes)
        samples = data.get("samples")
        if not isinstance(samples, list):
            raise HTTPException(422, "'samples' must be a list of samples")
        check_count(len(samples), self.http.max_samples)
        if data.get("on_invalid", "none") not in ("none", "raise"):
            raise HTTPException(422, "'on_invalid' must be 'none' or 'raise'")
        scores, errors = await self._score_http(samples)
        self.requests["score"] += 1
        if errors and data.get("on_invalid") == "raise":
            raise HTTPException(422, {"errors": errors})
        return {"scores": scores, "errors": errors}

    @app.post("/get_reward")
    async def http_get_reward(self, request: Request) -> dict:
        """OpenRLHF's remote reward protocol; images come from the labels (see ``get_reward``)."""
        authorize(request, self.http.api_key)
        data = await read_json(request, self.http.max_body_bytes)
        if isinstance(data.get("query"), list):
            check_count(len(data["query"]), self.http.max_samples)
        try:
            out = await get_reward(data, self._score_http, on_invalid=self.http.on_invalid)
        except GetRewardRequestError as e:
            raise HTTPException(422, str(e)) from None
        except GetRewardInvalidError as e:  # on_invalid="raise": the reasons, per query
            self.requests["get_reward"] += 1
            raise HTTPException(422, {"errors": {str(i): r for i, r in e.errors.items()}}) from None
        self.requests["get_reward"] += 1
        return out

    async def _score_http(self, samples: list) -> tuple[list, dict]:
        """Images loaded under the HTTP policy, then scored like a pool request (same admission)."""
        loaded, errors = resolve_images(samples, self.http_policy)
        keep = [i for i in range(len(samples)) if i not in errors]
        scores: list = [None] * len(samples)
        if keep:
            await self._wait_awake()
            self._hold(len(keep))
            try:
                got, bad = await self._score([loaded[i] for i in keep])
            finally:
                self.inflight -= len(keep)
            for k, i in enumerate(keep):
                scores[i] = got[k]
                if k in bad:
                    errors[i] = bad[k]
        return scores, {str(i): reason for i, reason in sorted(errors.items())}

    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "model": os.path.basename(str(self.settings.model).rstrip("/")),
                "device": str(self.model.device)}  # fmt: skip

    @app.get("/metrics")
    async def metrics(self, request: Request) -> PlainTextResponse:
        authorize(request, self.http.api_key)
        stats = self.engine.stats()
        lines = []
        values = {**stats, **{f"http_requests_{k}": v for k, v in self.requests.items()},
                  "inflight_samples": self.inflight, "peak_inflight_samples": self.peak_inflight}  # fmt: skip
        for name, value in sorted(values.items()):
            if isinstance(value, int | float) and not isinstance(value, bool):
                metric = f"rewardplug_{name}"
                lines += [f"# TYPE {metric} gauge", f"{metric} {float(value)}"]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

