"""HTTP reward service on Ray Serve: each Serve replica holds a RewardModel and its RewardEngine.

Endpoints:
- ``POST /v1/score``: ``{"samples": [...], "on_invalid": "none"}`` -> ``{"scores": [...], "errors": {...}}``.
  Samples use the Python API's schema; images as base64 data URIs, or paths/URLs the server allows.
  A sample that cannot be scored gets a null score and its reason in ``errors``; the others are scored.
- ``POST /get_reward``: OpenRLHF's remote reward model protocol. ``{"query": [...], "prompts": [...],
  "labels": [...], "images": [[...], ...]}`` -> ``{"rewards": [...], "scores": [...], "extra_logs": {...}}``.
  Each query is the whole conversation text in the Qwen chat format (what OpenRLHF decodes from its
  sequences); its images come in ``images`` (one list per query, data URIs), one
  ``<|vision_start|><|image_pad|><|vision_end|>`` per image in the text. A bad query fails the request
  with 422 and the per-query reasons (OpenRLHF has no way to mask a reward).
- ``GET /healthz``: 200 once the model is loaded (Serve routes nothing to a replica before that).
- ``GET /metrics``: this replica's counters in the Prometheus text format.

Secure by default: loopback only, an optional API key compared in constant time, body size and
samples-per-request limits, no image URL fetches unless hosts are allowed, local image paths only
under configured roots, decompression-bomb limits, and error bodies that never carry server paths or
secrets (internal errors answer with a request id; the details go to the server log).
"""


import hmac
import json
import logging
import os
import uuid
from dataclasses import asdict, dataclass, field
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from ray import serve

logger = logging.getLogger(__name__)


@dataclass
class ServiceSettings:
    model: str
    api_key: str | None = None
    max_body_bytes: int = 64 * 2**20
    max_samples: int = 4096
    image_roots: list[str] = field(default_factory=list)  # none: no local files
    image_url_hosts: list[str] = field(default_factory=list)  # none: no URL fetches
    model_options: dict = field(default_factory=dict)
    engine_options: dict = field(default_factory=dict)


app = FastAPI(title="rewardplug", description="Multimodal reward model service")


@app.exception_handler(Exception)
async def _internal_error(request: Request, error: Exception):  # never leak paths or secrets
    request_id = uuid.uuid4().hex[:12]
    logger.exception("request %s failed", request_id)
    return JSONResponse({"error": "internal error", "request_id": request_id}, status_code=500)


@serve.ingress(app)  # at import, so that each Serve replica sets up the routes the same way
class RewardService:
    """The Serve deployment body (made a deployment by ``deployment``)."""

    def __init__(self, settings: dict):
        import ray

        from ..engine import RewardEngine
        from .placement import load_on_assigned_gpus

        self.settings = s = ServiceSettings(**settings)
        self.model = load_on_assigned_gpus(
            s.model, [str(g) for g in ray.get_gpu_ids()], image_roots=list(s.image_roots),
            image_url_hosts=list(s.image_url_hosts), **s.model_options,
        )  # fmt: skip
        self.engine = RewardEngine(self.model, on_invalid="none", **s.engine_options)
        self.requests = {"score": 0, "get_reward": 0, "rejected": 0}

    # ---- request checks -------------------------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        key = self.settings.api_key
        if not key:
            return
        given = request.headers.get("x-api-key") or ""
        auth = request.headers.get("authorization") or ""
        if auth.lower().startswith("bearer "):
            given = auth[7:]
        if not hmac.compare_digest(given.encode(), key.encode()):
            self.requests["rejected"] += 1
            raise HTTPException(401, "missing or wrong API key", headers={"WWW-Authenticate": "Bearer"})

    async def _json(self, request: Request) -> dict:
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise HTTPException(413, f"body over {limit} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise HTTPException(413, f"body over {limit} bytes")
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise HTTPException(400, f"body is not valid JSON ({e.__class__.__name__})") from None
        if not isinstance(data, dict):
            raise HTTPException(422, "body must be a JSON object")
        return data

    def _check_count(self, n: int) -> None:
        if n > self.settings.max_samples:
            raise HTTPException(413, f"{n} samples in one request, over the limit of {self.settings.max_samples}")

    # ---- endpoints ------------------------------------------------------------------------------

    @app.post("/v1/score")
    async def score(self, request: Request) -> dict:
        self._authorize(request)
        data = await self._json(request)
        samples = data.get("samples")
        if not isinstance(samples, list):
            raise HTTPException(422, "'samples' must be a list of samples")
        self._check_count(len(samples))
        if data.get("on_invalid", "none") not in ("none", "raise"):
            raise HTTPException(422, "'on_invalid' must be 'none' or 'raise'")
        scores, errors = await self._score(samples)
        self.requests["score"] += 1
        if errors and data.get("on_invalid") == "raise":
            raise HTTPException(422, {"errors": errors})
        return {"scores": scores, "errors": errors}

    @app.post("/get_reward")
    async def get_reward(self, request: Request) -> dict:
        self._authorize(request)
        data = await self._json(request)
        queries = data.get("query")
        if not isinstance(queries, list) or not all(isinstance(q, str) for q in queries):
            raise HTTPException(422, "'query' must be a list of strings")
        self._check_count(len(queries))
        images = data.get("images") or [[] for _ in queries]
        if not isinstance(images, list) or len(images) != len(queries):
            raise HTTPException(422, "'images' must hold one list of images per query")
        tok = self.model.processor.tokenizer
        samples = [{"input_ids": tok.encode(q, add_special_tokens=False), "images": ims or []}
                   for q, ims in zip(queries, images)]  # fmt: skip
        scores, errors = await self._score(samples)
        self.requests["get_reward"] += 1
        if errors:
            raise HTTPException(422, {"errors": errors})
        return {"rewards": scores, "scores": scores, "extra_logs": {"reward_model_score": scores}}

    async def _score(self, samples: list) -> tuple[list, dict]:
        from ..errors import InvalidSampleError

        try:
            return await self.engine.ascore(samples, on_invalid="raise"), {}
        except InvalidSampleError as e:
            return e.scores, {str(i): reason for i, reason in e.errors.items()}

    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "model": os.path.basename(str(self.settings.model).rstrip("/")),
                "device": str(self.model.device)}  # fmt: skip

    @app.get("/metrics")
    async def metrics(self, request: Request) -> PlainTextResponse:
        self._authorize(request)
        stats = self.engine.stats()
        lines = []
        for name, value in sorted({**stats, **{f"http_requests_{k}": v for k, v in self.requests.items()}}.items()):
            if isinstance(value, int | float):
                metric = f"rewardplug_{name}"
                lines += [f"# TYPE {metric} gauge", f"{metric} {float(value)}"]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")


def deployment(settings: ServiceSettings, *, replicas: int = 1, gpus_per_replica: float = 0, cpus_per_replica: float = 1):
    """The Serve application: ``serve.run(deployment(...))``."""
    service = serve.deployment(
        RewardService,
        name="rewardplug",
        num_replicas=replicas,
        ray_actor_options={"num_gpus": gpus_per_replica, "num_cpus": cpus_per_replica},
        max_ongoing_requests=256,
    )
    return service.bind(asdict(settings))


def serve_forever(settings: ServiceSettings, *, host: str = "127.0.0.1", port: int = 8000, replicas: int = 1,
                  gpus_per_replica: float = 0, cpus_per_replica: float = 1, address: str | None = None) -> None:  # fmt: skip
    """Start Ray (or join ``address``), run the application on host:port, block until interrupted."""
    import time

    import ray

    if not ray.is_initialized():
        ray.init(address=address, namespace="rewardplug")
    serve.start(http_options={"host": host, "port": port})
    serve.run(deployment(settings, replicas=replicas, gpus_per_replica=gpus_per_replica,
                         cpus_per_replica=cpus_per_replica), name="rewardplug", route_prefix="/")  # fmt: skip
    logger.warning("rewardplug is serving %s on http://%s:%d", settings.model, host, port)
    print(f"rewardplug is serving on http://{host}:{port} (POST /v1/score, POST /get_reward, GET /healthz)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()

