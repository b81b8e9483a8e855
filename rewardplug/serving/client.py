"""RewardClient: call a rewardplug HTTP service from any trainer (sync and async).

>>> from rewardplug.client import RewardClient
>>> client = RewardClient("http://127.0.0.1:8000", api_key="...")  # doctest: +SKIP
>>> client.score([{"prompt": "What is it?", "completion": "A cat.", "images": [pil_image]}])  # doctest: +SKIP
[1.23]

PIL images and bytes are sent as base64 PNG data URIs. Connection errors and 5xx answers are retried
with exponential backoff (tenacity); 4xx answers are not (the request itself is wrong).
"""

from __future__ import annotations

import base64
import io
from typing import Any

import httpx
from tenacity import AsyncRetrying, Retrying, retry_if_exception, stop_after_attempt, wait_exponential

from ..errors import InvalidSampleError, RewardPlugError


class ServiceError(RewardPlugError):
    """The service answered with an error status."""

    def __init__(self, status: int, detail: Any):
        self.status, self.detail = status, detail
        super().__init__(f"HTTP {status}: {detail}")


def _retryable(error: BaseException) -> bool:
    if isinstance(error, ServiceError):
        return error.status >= 500
    return isinstance(error, httpx.TransportError)


def to_data_uri(image: Any) -> str:
    from PIL import Image

    if isinstance(image, bytes | bytearray):
        return "data:image/png;base64," + base64.b64encode(bytes(image)).decode()
    if hasattr(image, "__array_interface__"):  # numpy arrays (uint8 HxW[x3|4])
        import numpy as np

        image = Image.fromarray(np.asarray(image))
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.save(buf, format="PNG", compress_level=1)  # lossless; fast beats small on loopback and LANs
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    return image  # already a string (data URI, path or URL the server allows)


def to_json_samples(samples: list) -> list:
    """Samples with every in-memory image turned into a data URI (each distinct image encoded once)."""
    cache: dict[int, str] = {}

    def conv(value):
        if isinstance(value, str | int | float | bool) or value is None:
            return value
        if isinstance(value, dict):
            if value.get("bytes") is not None:
                return conv(value["bytes"])
            return {k: conv(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [conv(v) for v in value]
        if id(value) not in cache:
            cache[id(value)] = to_data_uri(value)
        return cache[id(value)]

    return [conv(s) for s in samples]


class RewardClient:
    def __init__(self, url: str, api_key: str | None = None, *, timeout: float = 600.0, retries: int = 4):
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = timeout
        self.retry = dict(
            retry=retry_if_exception(_retryable), stop=stop_after_attempt(retries + 1),
            wait=wait_exponential(multiplier=0.2, max=10), reraise=True,
        )  # fmt: skip
        self._client = httpx.Client(timeout=timeout, headers=self.headers)
        self._aclient: httpx.AsyncClient | None = None
        self._aloop = None  # the event loop _aclient's connections belong to

    def score(self, samples: list, *, on_invalid: str = "raise") -> list:
        """Scores in input order; with on_invalid="raise" a bad sample raises InvalidSampleError."""
        body = {"samples": to_json_samples(samples)}
        for attempt in Retrying(**self.retry):
            with attempt:
                data = self._answer(self._client.post(f"{self.url}/v1/score", json=body))
        return self._result(data, on_invalid)

    async def ascore(self, samples: list, *, on_invalid: str = "raise") -> list:
        import asyncio

        loop = asyncio.get_running_loop()
        if self._aclient is None or self._aloop is not loop:  # connections cannot move between loops
            self._aclient, self._aloop = httpx.AsyncClient(timeout=self.timeout, headers=self.headers), loop
        body = {"samples": to_json_samples(samples)}
        async for attempt in AsyncRetrying(**self.retry):
            with attempt:
                data = self._answer(await self._aclient.post(f"{self.url}/v1/score", json=body))
        return self._result(data, on_invalid)

    def health(self) -> dict:
        return self._answer(self._client.get(f"{self.url}/healthz"))

    @staticmethod
    def _answer(response: httpx.Response) -> dict:
        if response.status_code >= 400:
            try:
                body = response.json()
                detail = body.get("detail", response.text) if isinstance(body, dict) else body
            except ValueError:
                detail = response.text
            raise ServiceError(response.status_code, detail)
        return response.json()

    @staticmethod
    def _result(data: dict, on_invalid: str) -> list:
        errors = {int(k): v for k, v in (data.get("errors") or {}).items()}
        if errors and on_invalid == "raise":
            raise InvalidSampleError(errors, scores=data["scores"])
        return data["scores"]

    def close(self) -> None:
        """Close the sync connections (use ``await aclose()`` for those of ``ascore``)."""
        self._client.close()

    async def aclose(self) -> None:
        if self._aclient is not None:
            await self._aclient.aclose()
            self._aclient = None

    def __enter__(self) -> "RewardClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
