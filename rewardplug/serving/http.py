"""The HTTP door of a pool: ``HttpDoor``, a Ray Serve ingress deployment in front of the pool's
replicas (``door_application``), served by Serve's proxy when the pool has an HTTP port
(``RewardPool(..., http_port=8000)``, ``rewardplug serve``). The replicas only score; the door holds
the HTTP policy, decodes every image itself and sends each prompt group to a replica by its content key,
as the Python handle does (``rewardplug.serving.transport``), so HTTP traffic gets the same affinity.

Endpoints:
- ``POST /v1/score``: ``{"samples": [...], "on_invalid": "none"}`` -> ``{"scores": [...], "errors": {...}}``.
  Samples use the Python API's schema; images as base64 data URIs, or paths/URLs the server allows.
  A sample that cannot be scored gets a null score and its reason in ``errors``; the others are scored.
- ``POST /get_reward``: OpenRLHF's remote reward model protocol (see ``rewardplug.get_reward``):
  images come from the labels. A query that cannot be scored follows ``HttpSettings.on_invalid``:
  ``"raise"`` (the default) answers 422 with each bad query's reason under ``detail.errors`` (OpenRLHF
  retries, then its step fails); a float is that query's reward, flagged in ``extra_logs``.
- ``GET /healthz``: 200 once a replica has loaded the model (503 before).
- ``GET /metrics``: the door's counters in the Prometheus text format (requests by route and status,
  samples); the engines' figures are in Ray's metrics export (one target per node).

Secure by default: loopback only, an optional API key compared in constant time, body size and
samples-per-request limits, no image URL fetches unless hosts are allowed, local image paths only
under configured roots (this door does not share the Python API's trust of its caller), decompression
bomb limits, image digests computed here from the decoded pixels (never taken from a client, so no
client can poison a cache other clients read), and error bodies that never carry server paths or secrets.
"""

# No `from __future__ import annotations`: FastAPI reads the routes' parameter types at class creation.
import asyncio
import hmac
import json
import logging
import uuid
import warnings
from dataclasses import dataclass, field
from typing import Any

import ray
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from ray import serve

from ..errors import SampleError
from ..images import ImagePolicy, load_image
from ..on_invalid import DEFAULT as ON_INVALID_DEFAULT
from ..on_invalid import parse_on_invalid

logger = logging.getLogger(__name__)

# Why /get_reward refuses on_invalid="none" (as the OpenRLHF adapter does).
NO_MASK = "OpenRLHF cannot mask a reward: a null reward fails its step"


@dataclass
class HttpSettings:
    """Limits and trust of the HTTP door (the Python door is not affected)."""

    api_key: str | None = None
    max_body_bytes: int = 64 * 2**20
    max_samples: int = 4096
    image_roots: list[str] = field(default_factory=list)  # none: no local files
    image_url_hosts: list[str] = field(default_factory=list)  # none: no URL fetches
    # /get_reward: a query that cannot be scored. "raise": 422 with the reasons; a float: its reward.
    on_invalid: str | float = ON_INVALID_DEFAULT
    # Requests the door holds at once (each up to max_body_bytes, and its decoded images); more wait
    # in Serve's proxy.
    max_ongoing_requests: int = 32
    invalid_reward: float | None = None  # deprecated: on_invalid=<float>

    def __post_init__(self) -> None:
        if self.invalid_reward is not None:
            warnings.warn("HttpSettings(invalid_reward=x) is deprecated: use on_invalid=x ('raise' is the default)",
                          DeprecationWarning, stacklevel=3)  # fmt: skip
            self.on_invalid, self.invalid_reward = float(self.invalid_reward), None
        self.on_invalid = parse_on_invalid(self.on_invalid, where="HttpSettings.on_invalid", none_refused=NO_MASK)

    def policy(self) -> ImagePolicy:
        return ImagePolicy(local_roots=tuple(self.image_roots), url_hosts=tuple(self.image_url_hosts))


door = FastAPI(title="rewardplug", description="Multimodal reward model service")


@door.exception_handler(Exception)
async def _internal_error(request: Request, error: Exception):  # never leak paths or secrets
    request_id = uuid.uuid4().hex[:12]
    logger.error("request %s failed", request_id, exc_info=error)
    return JSONResponse({"error": "internal error", "request_id": request_id}, status_code=500)


def authorize(request: Request, key: str | None) -> None:
    if not key:
        return
    given = request.headers.get("x-api-key") or ""
    auth = request.headers.get("authorization") or ""
    if auth.lower().startswith("bearer "):
        given = auth[7:]
    if not hmac.compare_digest(given.encode(), key.encode()):
        raise HTTPException(401, "missing or wrong API key", headers={"WWW-Authenticate": "Bearer"})


async def read_json(request: Request, limit: int) -> dict:
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


def check_count(n: int, limit: int) -> None:
    if n > limit:
        raise HTTPException(413, f"{n} samples in one request, over the limit of {limit}")


def resolve_images(samples: list, policy: ImagePolicy) -> tuple[list, dict[int, str]]:
    """Load every image source of the samples under the HTTP door's policy (roots, URL hosts, size
    limits), so the replica's engine only ever sees decoded images from this door. A sample with an
    image that may not or cannot be loaded gets its reason; its entry becomes None."""
    errors: dict[int, str] = {}
    out: list = []

    def load(value: Any, where: str):
        if value is None or isinstance(value, dict) and not any(value.values()):  # no image (a datasets null)
            return value
        try:
            return load_image(value, policy)
        except SampleError as e:
            raise SampleError(f"{where}: {e}") from None

    for i, s in enumerate(samples):
        if not isinstance(s, dict):
            out.append(s)
            continue
        try:
            s = dict(s)
            for key in ("images", "image"):
                if isinstance(s.get(key), list):
                    s[key] = [load(v, f"image {k}") for k, v in enumerate(s[key])]
                elif s.get(key) is not None:
                    s[key] = load(s[key], "image")
            for key in ("messages", "prompt", "completion"):
                if isinstance(s.get(key), list):
                    s[key] = [_load_in_message(m, load) for m in s[key]]
            out.append(s)
        except SampleError as e:
            errors[i] = str(e)
            out.append(None)
    return out, errors


def _load_in_message(message: Any, load) -> Any:
    if not isinstance(message, dict) or not isinstance(message.get("content"), list):
        return message
    items = []
    for item in message["content"]:
        if isinstance(item, dict) and item.get("image") is not None:
            item = {**item, "image": load(item["image"], "image in the messages")}
        elif isinstance(item, dict) and item.get("image_url") is not None:
            url = item["image_url"].get("url") if isinstance(item["image_url"], dict) else item["image_url"]
            item = {k: v for k, v in item.items() if k != "image_url"} | {"type": "image",
                                                                          "image": load(url, "image_url")}  # fmt: skip
        items.append(item)
    return {**message, "content": items}


# ---- the door: an ingress deployment in front of the replicas ------------------------------------------

# The door's own figures, in a registry of its own (the engines' are in Ray's metrics export).
METRICS = CollectorRegistry()
ROUTES = ("/v1/score", "/get_reward", "/healthz", "/metrics")  # any other path counts as "other"
REQUESTS = Counter("rewardplug_http_requests", "HTTP requests answered, by route and status", ["route", "status"],
                   registry=METRICS)  # fmt: skip
SAMPLES = Counter("rewardplug_http_samples", "samples received, by route and outcome (scored, invalid)",
                  ["route", "outcome"], registry=METRICS)  # fmt: skip
HEDGES = Counter("rewardplug_http_resends", "parts sent again: after hedge_after_s without an answer, or after "
                 "their replica died", ["reason"], registry=METRICS)  # fmt: skip


@door.middleware("http")
async def _count(request: Request, call_next):
    route = request.url.path if request.url.path in ROUTES else "other"
    status = 500  # an exception that escapes is answered 500
    try:
        response = await call_next(request)
        status = response.status_code
        return response
    finally:
        REQUESTS.labels(route, str(status)).inc()


# Serve copies the door class by value, with copies of the globals its methods read: they reach the
# metrics only through these functions, which travel by reference (the middleware's module globals).
def _tally(route: str, scored: int, invalid: int) -> None:
    SAMPLES.labels(route, "scored").inc(scored)
    SAMPLES.labels(route, "invalid").inc(invalid)


def _resent(kind: str, error: BaseException | None) -> None:
    HEDGES.labels(kind).inc()
    logger.warning("HTTP door: a part sent again (%s%s)", kind, f": {error}" if error else "")


def _exposition() -> bytes:
    return generate_latest(METRICS)


@serve.ingress(door)
class HttpDoor:
    """Takes HTTP requests, decodes their images under ``HttpSettings``, and scores them on the replica
    deployment (``replicas``: its handle) one prompt group per call, each by its content key."""

    def __init__(self, replicas, settings: dict, part_samples: int, request_timeout_s: float, hedge_after_s: float):
        self.replicas, self.hedge_after_s = replicas, hedge_after_s
        self.http = HttpSettings(**settings)
        self.policy = self.http.policy()
        self.part_samples, self.request_timeout_s = max(1, part_samples), request_timeout_s
        self.im_start: int | None = None
        self.ready = False  # a replica has answered: its model is loaded

    async def _token_format(self) -> int | None:
        """The replicas' turn marker, asked once as a control call (it never waits behind parts)."""
        from .router import TO_REPLICA
        from .transport import call

        if not self.ready:
            self.im_start = (await call(self.replicas, TO_REPLICA, "identity"))["im_start"]
            self.ready = True
        return self.im_start

    async def _score(self, samples: list, route: str) -> tuple[list, dict]:
        """Images loaded under the HTTP policy, then the samples scored on the replicas by the deadline.
        Scores (None for a bad sample) and reasons by position."""
        loaded, errors = await asyncio.to_thread(resolve_images, samples, self.policy)
        keep = [i for i in range(len(samples)) if i not in errors]
        scores: list = [None] * len(samples)
        if keep:
            try:
                parts, answers = await asyncio.wait_for(self._parts([loaded[i] for i in keep]), self.request_timeout_s)
            except TimeoutError:
                raise HTTPException(504, f"no answer within request_timeout_s={self.request_timeout_s}") from None
            for part, (got, bad) in zip(parts, answers):
                for k, position in enumerate(part.indices):
                    scores[keep[position]] = got[k]
                    if k in bad:
                        errors[keep[position]] = bad[k]
        _tally(route, len(samples) - len(errors), len(errors))
        return scores, {str(i): reason for i, reason in sorted(errors.items())}

    async def _parts(self, samples: list) -> tuple[list, list]:
        """The samples cut by prompt group (keys and digests computed here, from the decoded images),
        each part sent by its key; answers by part."""
        from .transport import answer, externalize, split

        parts = split(externalize(samples, ray.put), self.part_samples, await self._token_format())
        tasks = [asyncio.ensure_future(answer(self.replicas, part, self.hedge_after_s, on_event=_resent))
                 for part in parts]  # fmt: skip
        try:
            return parts, await asyncio.gather(*tasks)
        finally:  # a part failed: its siblings are not needed
            for task in tasks:
                task.cancel()

    @door.post("/v1/score")
    async def score(self, request: Request) -> dict:
        authorize(request, self.http.api_key)
        data = await read_json(request, self.http.max_body_bytes)
        samples = data.get("samples")
        if not isinstance(samples, list):
            raise HTTPException(422, "'samples' must be a list of samples")
        check_count(len(samples), self.http.max_samples)
        if data.get("on_invalid", "none") not in ("none", "raise"):
            raise HTTPException(422, "'on_invalid' must be 'none' or 'raise'")
        scores, errors = await self._score(samples, "/v1/score")
        if errors and data.get("on_invalid") == "raise":
            raise HTTPException(422, {"errors": errors})
        return {"scores": scores, "errors": errors}

    @door.post("/get_reward")
    async def get_reward(self, request: Request) -> dict:
        """OpenRLHF's remote reward protocol; images come from the labels (see ``get_reward``)."""
        from ..get_reward import GetRewardInvalidError, GetRewardRequestError, get_reward

        authorize(request, self.http.api_key)
        data = await read_json(request, self.http.max_body_bytes)
        if isinstance(data.get("query"), list):
            check_count(len(data["query"]), self.http.max_samples)
        try:
            return await get_reward(data, lambda samples: self._score(samples, "/get_reward"),
                                    on_invalid=self.http.on_invalid)  # fmt: skip
        except GetRewardRequestError as e:
            raise HTTPException(422, str(e)) from None
        except GetRewardInvalidError as e:  # on_invalid="raise": the reasons, per query
            raise HTTPException(422, {"errors": {str(i): r for i, r in e.errors.items()}}) from None

    @door.get("/healthz")
    async def healthz(self) -> dict:
        try:
            await asyncio.wait_for(self._token_format(), 10)
        except TimeoutError:
            raise HTTPException(503, "no replica has loaded the model yet") from None
        return {"status": "ok"}

    @door.get("/metrics")
    async def metrics(self, request: Request) -> Response:
        authorize(request, self.http.api_key)
        return Response(_exposition(), media_type=CONTENT_TYPE_LATEST)


def door_application(replica_app, http_settings: dict, part_samples: int = 64, request_timeout_s: float = 600.0,
                     hedge_after_s: float = 30.0):
    """The HTTP door over a pool's replica application (``serving.pool._application``): the app to run
    with ``route_prefix="/"``. ``part_samples``, ``request_timeout_s`` and ``hedge_after_s`` as the
    pool's (PoolConfig): a part on a hung replica is sent again, as from the Python door."""
    settings = HttpSettings(**http_settings)
    return serve.deployment(HttpDoor).options(
        name="HttpDoor", num_replicas=1, max_ongoing_requests=settings.max_ongoing_requests,
        ray_actor_options={"num_cpus": 0},  # it decodes and forwards; the replicas hold the CPUs and GPUs
    ).bind(replica_app, http_settings, part_samples, request_timeout_s, hedge_after_s)  # fmt: skip
