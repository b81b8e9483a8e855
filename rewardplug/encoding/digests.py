"""Content keys: the digests that name cached or shared work, each over the whole of its content.

An image's digest covers its mode, size and every pixel byte (``rewardplug.images.image_digest``); a
resized image's key is that digest with the resize options and settings; a prompt group's key is
everything the chat template sees of a sample except the answer's text, images by content digest; a
source key tells two image sources of one request apart by all their bytes, path or URI. A key that
read only part of its content would hand one picture's or prompt's work to another: a wrong reward.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Sequence

from PIL import Image

from ..images import image_digest

__all__ = ["digest", "image_digest", "prompt_key", "source_key"]


def digest(*parts: Any) -> str:
    """A 128-bit digest of values whose ``repr`` is their whole content (strings, numbers, tuples)."""
    return hashlib.blake2b(repr(parts).encode(), digest_size=16).hexdigest()


def source_key(source: Any) -> Any:
    """Identity of an image source within one request: same bytes, path or URI, or the same object."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return ("bytes", bytes(source))
    if isinstance(source, str):
        return ("str", source)
    if isinstance(source, os.PathLike):
        return ("str", os.fspath(source))
    if isinstance(source, dict):
        if source.get("bytes") is not None:
            data = source["bytes"]
            return ("bytes", bytes(data)) if isinstance(data, (bytes, bytearray, memoryview)) else None
        for k in ("path", "url"):
            if isinstance(source.get(k), str) and source[k]:
                return ("str", source[k])
        return None
    return ("object", id(source))  # numpy arrays and the like: the object itself


def prompt_key(prompt: list[dict], answer: dict, images: Sequence[Image.Image], image_digests: Sequence[str]) -> str:
    """Everything the template sees of a sample except the answer's text; images by content digest."""
    digests = {id(im): d for im, d in zip(images, image_digests)}

    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return tuple(sorted((str(k), plain(v)) for k, v in value.items()))
        if isinstance(value, (list, tuple)):
            return tuple(plain(v) for v in value)
        if isinstance(value, Image.Image):
            return ("image", digests.get(id(value), id(value)))
        if value is None or isinstance(value, (str, int, float, bool)):
            return value
        return ("object", type(value).__name__, id(value))  # never equal to another object's

    shape = {k: v for k, v in answer.items() if k != "content"}
    form = "str" if isinstance(answer["content"], str) else plain([{k: v for k, v in answer["content"][0].items() if k != "text"}])
    return repr((plain(prompt), plain(shape), form))
