"""Turn an image source into a decoded PIL image, safely.

Sources: a PIL image, a uint8 numpy array (H, W[, 3|4]), raw bytes, a local path, a ``file://`` URI, a ``data:image/...;base64,`` string,
a Hugging Face datasets dict ``{"bytes": ..., "path": ...}``, and http(s) URLs only when the policy
allows them.

Local paths: the in-process Python API trusts its caller, as the model card's own code (qwen-vl-utils)
does: by default any path the process can read is read. Give ``local_roots`` (``image_roots=[...]`` in
``RewardModel.from_pretrained``) to restrict reads to some folders. The HTTP service, whose samples
come from the network, reads only inside its configured roots (default: none but the ones it is given).

Every failure is a ``SampleError`` whose message says which source and why, without echoing file
contents.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from blake3 import blake3
from PIL import Image

from .errors import SampleError

ImageSource = Any  # PIL.Image.Image | bytes | str | os.PathLike | dict


@dataclass(frozen=True)
class ImagePolicy:
    """Where images may come from.

    local_roots: folders whose files may be read; None (the default: the in-process API trusts its
        caller) reads any path the process can read. Services that take samples from the network
        (the HTTP service) pass their roots.
    url_hosts: host names whose http(s) URLs may be fetched; ("*",) allows any host. Empty (the
        default) fetches nothing, so a sample cannot make the scorer reach into your network.
    max_image_pixels: decoded width x height above which an image is refused (decompression bombs).
    max_bytes: largest encoded image accepted from a URL, a data URI or a file.
    base_dir: folder that relative paths are read from (default: the current working directory).
    """

    local_roots: tuple[str, ...] | None = None
    url_hosts: tuple[str, ...] = ()
    max_image_pixels: int = 64 * 1024 * 1024
    max_bytes: int = 64 * 1024 * 1024
    url_timeout_s: float = 10.0
    base_dir: str | None = None

    def __post_init__(self):
        if self.local_roots is not None:
            roots = tuple(str(Path(r).expanduser().resolve()) for r in self.local_roots)
            object.__setattr__(self, "local_roots", roots)

    @classmethod
    def permissive(cls) -> "ImagePolicy":
        """Any local path and any URL: for trusted data only."""
        return cls(local_roots=None, url_hosts=("*",))


def load_image(source: ImageSource, policy: ImagePolicy) -> Image.Image:
    """Decode ``source`` into a fully loaded PIL image, or raise SampleError."""
    if isinstance(source, Image.Image):
        _check_pixels(source, policy)
        return source
    if isinstance(source, dict):
        if source.get("bytes") is not None:
            if not isinstance(source["bytes"], (bytes, bytearray, memoryview)):
                raise SampleError(f"image dict 'bytes' must be bytes, got {type(source['bytes']).__name__}")
            return _decode(bytes(source["bytes"]), policy, "image bytes")
        if source.get("path"):
            return load_image(source["path"], policy)
        if source.get("url"):
            return load_image(source["url"], policy)
        raise SampleError(f"image dict has none of 'bytes', 'path', 'url' (keys: {sorted(source)})")
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _decode(bytes(source), policy, "image bytes")
    if hasattr(source, "__array_interface__"):  # numpy arrays, as RL environments hand them out
        return _from_array(source, policy)
    if isinstance(source, os.PathLike):
        return _read_local(os.fspath(source), policy)
    if not isinstance(source, str):
        raise SampleError(f"unsupported image type {type(source).__name__}")
    if source.startswith("data:"):
        return _decode(_data_uri_bytes(source), policy, "data URI")
    if source.startswith(("http://", "https://")):
        return _fetch_url(source, policy)
    if source.startswith("file://"):
        return _read_local(source[len("file://"):], policy)
    if "://" in source[:16]:
        raise SampleError(f"unsupported image URI scheme {source.split('://', 1)[0]!r}")
    return _read_local(source, policy)


def image_digest(image: Image.Image, data: bytes | None = None) -> str:
    """Content hash of a decoded image: same pixels, same size and mode give the same digest.

    data: ``image.tobytes()`` when the caller has them already (all of them: the digest covers every byte).
    BLAKE3 (128 bits), a cryptographic hash: a crafted image cannot take another's cached features. It is
    the host's second cost per image after the resize: 1.27 ms against blake2b's 4.71 ms for a 1024 px
    picture, ``tobytes()`` included (``benchmarks/bench_encode.py``)."""
    h = content_hash(f"{image.mode}:{image.size}".encode())
    h.update(image.tobytes() if data is None else data)
    return h.hexdigest(length=16)


def content_hash(data: bytes = b""):
    """A BLAKE3 hasher for content keys (images, arrays): ``.update(...)``, ``.hexdigest(length=16)``.
    It lets go of the interpreter lock on large inputs, so encoder threads hash side by side."""
    return blake3(data, max_threads=1)


def _from_array(array, policy: ImagePolicy) -> Image.Image:
    import numpy as np

    array = np.asarray(array)
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
        raise SampleError(
            f"image array must be uint8 of shape (H, W), (H, W, 3) or (H, W, 4), got {array.dtype} {array.shape}"
        )
    image = Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[2] == 1 else array)
    _check_pixels(image, policy)
    return image


def _check_pixels(image: Image.Image, policy: ImagePolicy) -> None:
    w, h = image.size
    if w * h > policy.max_image_pixels:
        raise SampleError(f"image of {w}x{h} pixels is over the limit of {policy.max_image_pixels} pixels")
    if w < 1 or h < 1:
        raise SampleError(f"image has an empty size {w}x{h}")


def _decode(data: bytes, policy: ImagePolicy, what: str) -> Image.Image:
    if len(data) > policy.max_bytes:
        raise SampleError(f"{what} of {len(data)} bytes is over the limit of {policy.max_bytes} bytes")
    try:
        image = Image.open(io.BytesIO(data))
        _check_pixels(image, policy)  # before decoding the pixels: the header alone gives the size
        image.load()
    except SampleError:
        raise
    except Exception as e:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
        reason = re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(e))  # an address says nothing
        raise SampleError(f"{what} could not be decoded as an image ({type(e).__name__}: {reason})") from None
    return image


def _data_uri_bytes(uri: str) -> bytes:
    head, sep, payload = uri.partition(",")
    if not sep or not head.startswith("data:image/") or not head.endswith(";base64"):
        raise SampleError("data URI must look like 'data:image/<type>;base64,<data>'")
    try:
        return base64.b64decode("".join(payload.split()), validate=True)  # line-wrapped base64 is common
    except (binascii.Error, ValueError):
        raise SampleError("data URI holds invalid base64") from None


def _read_local(path: str, policy: ImagePolicy) -> Image.Image:
    try:
        resolved = Path(policy.base_dir or ".", Path(path).expanduser()).resolve()
    except (RuntimeError, OSError, ValueError):  # "~nobody/x.png": no such user; NUL bytes; loops
        raise SampleError(f"image path {path[:200]!r} cannot be resolved") from None
    if policy.local_roots is not None and not any(
        resolved.is_relative_to(root) for root in policy.local_roots
    ):
        # Name the path the user gave, not the resolved one, and not the server's roots.
        raise SampleError(
            f"image path {path!r} is outside the allowed image roots; "
            "allow its folder with image_roots=[...] (CLI and HTTP service: --image-root), or, in-process, "
            "image_roots=None for any readable path"
        )
    try:
        size = resolved.stat().st_size
    except OSError:
        raise SampleError(f"image file {path!r} does not exist or cannot be read") from None
    if size > policy.max_bytes:
        raise SampleError(f"image file {path!r} has {size} bytes, over the limit of {policy.max_bytes}")
    try:
        data = resolved.read_bytes()
    except OSError as e:
        raise SampleError(f"image file {path!r} cannot be read ({e.strerror})") from None
    return _decode(data, policy, f"image file {path!r}")


def _fetch_url(url: str, policy: ImagePolicy) -> Image.Image:
    host = urlparse(url).hostname or ""
    if "*" not in policy.url_hosts and host not in policy.url_hosts:
        raise SampleError(
            f"image URL host {host!r} is not allowed; fetching URLs is off unless you list hosts "
            "in image_url_hosts=[...] (CLI: --allow-url-host), or '*' for any host"
        )
    import requests  # a dependency of qwen-vl-utils; imported here since most runs never fetch

    try:
        # No redirects: a redirect could lead outside the allowed hosts.
        with requests.get(url, stream=True, timeout=policy.url_timeout_s, allow_redirects=False) as r:
            if r.status_code != 200:
                raise SampleError(f"image URL {url!r} answered HTTP {r.status_code}")
            data = bytearray()
            for chunk in r.iter_content(1 << 16):
                data += chunk
                if len(data) > policy.max_bytes:
                    raise SampleError(f"image URL {url!r} is larger than {policy.max_bytes} bytes")
    except requests.RequestException as e:
        raise SampleError(f"image URL {url!r} could not be fetched ({type(e).__name__})") from None
    return _decode(bytes(data), policy, f"image URL {url!r}")
