"""The HTTP door to the pool's replicas: a FastAPI app whose routes live on the replica class
(``rewardplug.serving.replica.RewardReplica``), served by Ray Serve's proxy when the pool is started
with an HTTP port (``RewardPool(..., http_port=8000)``, ``rewardplug serve``).

Endpoints:
- ``POST /v1/score``: ``{"samples": [...], "on_invalid": "none"}`` -> ``{"scores": [...], "errors": {...}}``.
  Samples use the Python API's schema; images as base64 data URIs, or paths/URLs the server allows.
  A sample that cannot be scored gets a null score and its reason in ``errors``; the others are scored.
- ``POST /get_reward``: OpenRLHF's remote reward model protocol (see ``rewardplug.serving.get_reward``):
  images come from the labels. A query that cannot be scored follows ``HttpSettings.on_invalid``:
  ``"raise"`` (the default) answers 422 with each bad query's reason under ``detail.errors`` (OpenRLHF
  retries, then its step fails); a float is that query's reward, flagged in ``extra_logs``.
- ``GET /healthz``: 200 once the model is loaded (Serve routes nothing to a replica before that).
- ``GET /metrics``: this replica's counters in the Prometheus text format (the cluster-wide figures are
  Ray's metrics export: one target per node for all replicas).

Secure by default: loopback only, an optional API key compared in constant time, body size and
samples-per-request limits, no image URL fetches unless hosts are allowed, local image paths only
under configured roots (this door does not share the Python API's trust of its caller), decompression
bomb limits, and error bodies that never carry server paths or secrets.
"""

from __future__ import annotations

import hmac
import json
import logging
import uuid
import warnings
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse

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
    invalid_reward: float | None = None  # deprecated: on_invalid=<float>

    def __post_init__(self) -> None:
        if self.invalid_reward is not None:
            warnings.warn("HttpSettings(invalid_reward=x) is deprecated: use on_invalid=x ('raise' is the default)",
                          DeprecationWarning, stacklevel=3)  # fmt: skip
            self.on_invalid, self.invalid_reward = float(self.invalid_reward), None
        self.on_invalid = parse_on_invalid(self.on_invalid, where="HttpSettings.on_invalid", none_refused=NO_MASK)

    def policy(self) -> ImagePolicy:
        return ImagePolicy(local_roots=tuple(self.image_roots), url_hosts=tuple(self.image_url_hosts))


app = FastAPI(title="rewardplug", description="Multimodal reward model service")


@app.exception_handler(Exception)
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
        if value is None or isinstance(value, dict) and not value.get("bytes") and not value.get("path"):
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
