"""What a pool request carries to a replica: its samples cut into parts by prompt group, each distinct
in-memory image put once in the object store, and one content key per part.

A prompt group (the G completions of a GRPO prompt) is one part, so it lands on one replica and its
vision and prefix caches hit. The key is a content digest of everything before the answer, images by
``rewardplug.images.image_digest`` (the digest the engine's vision cache uses): the same prompt and
images give the same key in every process, so every rank sends a group to the same replica. Samples
alone in their group are packed into parts that go by their first sample's key (a one-sample call, as
verl and OpenRLHF make, goes by its own key).
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable

from PIL import Image

from ..images import image_digest


@dataclass(frozen=True)
class ImageRef:
    """An image in the object store, standing where the image stood in the sample."""

    ref: Any = field(repr=False, compare=False)  # ray.ObjectRef
    key: str = ""  # content digest


@dataclass
class Part:
    """Samples of one request that go to one replica in one call."""

    indices: list[int]  # positions in the request
    samples: list  # with ImageRefs
    key: str  # content key: the router's session id


def _digest(value: Any) -> str:
    if isinstance(value, Image.Image):
        return image_digest(value)
    h = hashlib.blake2b(digest_size=16)
    if hasattr(value, "__array_interface__"):
        import numpy as np

        array = np.ascontiguousarray(value)
        h.update(f"{array.dtype}{array.shape}".encode())
        h.update(array.tobytes())
    else:
        h.update(value.encode() if isinstance(value, str) else bytes(value))
    return h.hexdigest()


def _is_inline_image(value: Any) -> bool:
    return (isinstance(value, Image.Image | bytes | bytearray) or hasattr(value, "__array_interface__")
            or (isinstance(value, str) and value.startswith("data:")))  # fmt: skip


def externalize(samples: list, put: Callable[[Any], Any]) -> list:
    """Copies of the samples with each distinct in-memory image replaced by one ImageRef."""
    refs: dict[Any, ImageRef] = {}

    def swap(value):
        if isinstance(value, dict) and value.get("bytes") is not None:
            return swap(value["bytes"])
        if not _is_inline_image(value):
            return value
        key = value if isinstance(value, str) else id(value)
        if key not in refs:
            refs[key] = ImageRef(put(value), _digest(value))
        return refs[key]

    def walk(messages):
        if not isinstance(messages, list):
            return messages
        out = []
        for m in messages:
            if isinstance(m, dict) and isinstance(m.get("content"), list):
                m = {**m, "content": [{**it, "image": swap(it["image"])} if isinstance(it, dict) and "image" in it
                                      else it for it in m["content"]]}  # fmt: skip
            out.append(m)
        return out

    result = []
    for s in samples:
        if not isinstance(s, dict):
            result.append(s)
            continue
        s = dict(s)
        for key in ("images", "image"):
            if isinstance(s.get(key), list | tuple):
                s[key] = [swap(v) for v in s[key]]
            elif s.get(key) is not None:
                s[key] = swap(s[key])
        for key in ("messages", "prompt", "completion"):
            if key in s:
                s[key] = walk(s[key])
        result.append(s)
    return result


async def internalize(samples: list) -> list:
    """Replica side: fetch every ImageRef once and put the images back in place."""
    found: dict[Any, Any] = {}

    def collect(value):
        if isinstance(value, ImageRef):
            found[value.ref] = None
        elif isinstance(value, dict):
            for v in value.values():
                collect(v)
        elif isinstance(value, list | tuple):
            for v in value:
                collect(v)

    def restore(value):
        if isinstance(value, ImageRef):
            return found[value.ref]
        if isinstance(value, dict):
            return {k: restore(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [restore(v) for v in value]
        return value

    collect(samples)
    if not found:
        return samples
    refs = list(found)
    for ref, obj in zip(refs, await asyncio.gather(*refs)):
        found[ref] = obj
    return restore(samples)


def _image_keys(value: Any) -> list:
    if isinstance(value, ImageRef):
        return [value.key]
    if isinstance(value, list | tuple):
        return [k for v in value for k in _image_keys(v)]
    if isinstance(value, dict):
        return [k for v in value.values() for k in _image_keys(v)]
    return [value] if isinstance(value, str) else []


def group_key(sample: Any, im_start: int | None = None) -> str:
    """Samples with the same prompt (everything before the answer) and the same images share a key.
    Token samples: the ids up to the last ``<|im_start|>`` (the answer's turn)."""
    h = hashlib.blake2b(digest_size=12)
    if not isinstance(sample, dict):
        h.update(repr(id(sample)).encode())
    elif "input_ids" in sample:
        ids = list(sample["input_ids"]) if not hasattr(sample["input_ids"], "tolist") else sample["input_ids"].tolist()
        cut = len(ids) - ids[::-1].index(im_start) if im_start in ids else len(ids)
        h.update(repr(ids[:cut]).encode())
        h.update(repr(_image_keys(sample.get("images"))).encode())
    else:
        head = sample["messages"][:-1] if isinstance(sample.get("messages"), list) else sample.get("prompt")
        h.update(repr(_strip_images(head)).encode())
        h.update(repr(_image_keys([head, sample.get("images"), sample.get("image")])).encode())
    return h.hexdigest()


def _strip_images(value: Any) -> Any:
    if isinstance(value, ImageRef):
        return "<image>"
    if isinstance(value, dict):
        return {k: _strip_images(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strip_images(v) for v in value]
    return value


def split(samples: list, max_samples: int, im_start: int | None = None) -> list[Part]:
    """Cut externalized samples into parts of at most ``max_samples``: each prompt group of two or more
    samples a part of its own (cut only when larger), the lone samples packed together."""
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault(group_key(s, im_start), []).append(i)
    parts: list[Part] = []
    singles: list[tuple[int, str]] = []
    for key, indices in groups.items():
        if len(indices) == 1:
            singles.append((indices[0], key))
            continue
        for start in range(0, len(indices), max_samples):
            parts.append(Part(indices[start : start + max_samples], [], key))
    for start in range(0, len(singles), max_samples):
        chunk = singles[start : start + max_samples]
        parts.append(Part([i for i, _ in chunk], [], chunk[0][1]))
    for part in parts:
        part.samples = [samples[i] for i in part.indices]
    return parts
