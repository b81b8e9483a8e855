"""The replica: one RewardModel and its RewardEngine as a Ray Serve deployment, with two doors: the
pool handle calls ``score_samples``; the HTTP routes (``rewardplug.serving.http``) are its other methods.

What Serve does for it: placement (``num_gpus`` per replica), routing (``PromptGroupRouter``), the bound
on ongoing requests, health checks (``check_health``) and restarts, autoscaling, lightweight
reconfiguration (``reconfigure``: offload/onload). What it adds: a bound on the samples it holds
(``max_inflight_samples``), counted whoever sends, and its stats reported to the pool directory.
"""

# No `from __future__ import annotations`: FastAPI reads the routes' parameter types at class creation.
import asyncio
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from fastapi import HTTPException, Request
from fastapi.responses import PlainTextResponse
from ray import serve

from ..errors import InvalidSampleError, PoolBusyError
from .get_reward import GetRewardRequestError, get_reward
from .http import HttpSettings, app, authorize, check_count, read_json, resolve_images
from .transport import internalize

logger = logging.getLogger(__name__)

DEPLOYMENT = "RewardReplica"


@dataclass
class ReplicaSettings:
    """Everything a replica is built from; a named pool's identity (with its deployment options)."""

    model: str
    model_options: dict = field(default_factory=dict)
    engine_options: dict = field(default_factory=dict)
    max_inflight_samples: int = 512
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
        self.outstanding_tokens = 0
        self.peak_inflight = 0
        self.rejected = 0
        self.requests = {"score": 0, "get_reward": 0, "rejected": 0}
        self.offloaded = False
        self._homes: list = []
        self._room: asyncio.Condition | None = None
        self._by_sender: dict[str | None, int] = {}  # outstanding tokens per sending process (routing stats)
        self._started = time.time()
        self._directory = None

    # ---- the Python door ----------------------------------------------------------------------------

    async def score_samples(self, samples: list, *, busy: str = "wait", route_key: str | None = None,
                            tokens: int = 0, sender: str | None = None, part: str | None = None) -> tuple[list, dict]:  # fmt: skip
        """Scores (None for a bad sample) and the reasons of the bad ones, by position.

        Waits for room under ``max_inflight_samples`` (or raises PoolBusyError with ``busy="raise"``),
        and while the replica is offloaded. A system failure raises (ScoringError). ``tokens`` and
        ``sender`` feed the routing stats (outstanding tokens per sending process); ``part`` is the
        sender's id of this call (its router's bookkeeping)."""
        n = len(samples)
        await self._admit(n, tokens, busy)
        self._by_sender[sender] = self._by_sender.get(sender, 0) + tokens
        try:
            samples = await internalize(samples)
            return await self._score(samples)
        finally:
            left = self._by_sender.pop(sender, 0) - tokens
            if left > 0:
                self._by_sender[sender] = left
            await self._release(n, tokens)

    async def _score(self, samples: list) -> tuple[list, dict]:
        try:
            return await self.engine.ascore(samples, on_invalid="raise"), {}
        except InvalidSampleError as e:
            return e.scores, e.errors

    def _has_room(self, n: int) -> bool:
        return not self.offloaded and (self.inflight == 0 or self.inflight + n <= self.settings.max_inflight_samples)

    async def _admit(self, n: int, tokens: int, busy: str) -> None:
        if self._room is None:
            self._room = asyncio.Condition()
        async with self._room:
            if not self._has_room(n):
                if busy == "raise":
                    self.rejected += 1
                    state = "offloaded" if self.offloaded else f"holds {self.inflight} samples"
                    raise PoolBusyError(f"replica {self.replica_id} {state} (bound {self.settings.max_inflight_samples})")
                await self._room.wait_for(lambda: self._has_room(n))
            self.inflight += n
            self.outstanding_tokens += tokens
            self.peak_inflight = max(self.peak_inflight, self.inflight)

    async def _release(self, n: int, tokens: int) -> None:
        async with self._room:
            self.inflight -= n
            self.outstanding_tokens -= tokens
            self._room.notify_all()

    def token_format(self) -> dict:
        tok = self.model.processor.tokenizer
        return {"im_start": tok.convert_tokens_to_ids("<|im_start|>"), "image_pad": tok.convert_tokens_to_ids("<|image_pad|>")}

    # ---- Serve's hooks ------------------------------------------------------------------------------

    def check_health(self) -> None:
        """Serve calls this periodically; raising marks the replica unhealthy, and Serve replaces it."""
        self.engine.check_health()
        self._report()

    def record_routing_stats(self) -> dict:
        """Read by every handle's router (global least-outstanding-tokens routing)."""
        self._report()
        return {"outstanding_tokens": self.outstanding_tokens, "inflight_samples": self.inflight,
                "outstanding_by_sender": {k: v for k, v in self._by_sender.items() if k is not None}}  # fmt: skip

    async def reconfigure(self, user_config: dict) -> None:
        """Serve applies ``user_config`` to every replica without restarting it: offload and onload."""
        want = bool((user_config or {}).get("offloaded", False))
        if want == self.offloaded:
            return
        if want:
            self.offloaded = True  # new requests wait from now on
            while self.inflight:
                await asyncio.sleep(0.01)
            self._homes = _move_to_host(self.model)
        else:
            _move_home(self._homes)
            self.offloaded = False
            if self._room is not None:
                async with self._room:
                    self._room.notify_all()
        self._report()

    # ---- what the pool reads ------------------------------------------------------------------------

    def info(self) -> dict:
        import ray

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
            "outstanding_tokens": self.outstanding_tokens,
            "rejected_requests": self.rejected,
            "uptime_s": time.time() - self._started,
            "engine": self.engine.stats(),
        }

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
            out = await get_reward(data, self._score_http, fallback=self.http.invalid_reward)
        except GetRewardRequestError as e:
            raise HTTPException(422, str(e)) from None
        self.requests["get_reward"] += 1
        return out

    async def _score_http(self, samples: list) -> tuple[list, dict]:
        """Images loaded under the HTTP policy, then scored like a pool request (same admission)."""
        loaded, errors = resolve_images(samples, self.http_policy)
        keep = [i for i in range(len(samples)) if i not in errors]
        scores: list = [None] * len(samples)
        if keep:
            await self._admit(len(keep), 0, "wait")
            try:
                got, bad = await self._score([loaded[i] for i in keep])
            finally:
                await self._release(len(keep), 0)
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

