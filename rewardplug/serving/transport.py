"""What a pool request carries to a replica: its samples cut into parts by prompt group, each distinct
in-memory image put once in the object store, a routing key and a token estimate per part.

A prompt group (the G completions of a GRPO prompt) is one part, so it lands on one replica and its
vision and prefix caches hit. The routing key is a content digest: the same prompt and images give
the same key in every process, so every rank of a training job sends a group to the same replica.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable

from PIL import Image

# Tokens an image is assumed to cost before it is encoded (a 448x448 picture is 256 LLM tokens).
IMAGE_TOKENS_ESTIMATE = 256


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
    route_key: str
    tokens: int


@dataclass(frozen=True)
class TokenFormat:
    """Special token ids of the reward model, for keys of token-level samples."""

    im_start: int
    image_pad: int


def _digest(value: Any) -> str:
    h = hashlib.blake2b(digest_size=16)
    if isinstance(value, Image.Image):
        h.update(f"{value.mode}{value.size}".encode())
        h.update(value.tobytes())
    elif hasattr(value, "__array_interface__"):
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


def group_key(sample: Any, tokens: TokenFormat | None = None) -> str:
    """Samples with the same prompt (everything before the answer) and the same images share a key."""
    h = hashlib.blake2b(digest_size=12)
    if not isinstance(sample, dict):
        h.update(repr(id(sample)).encode())
    elif "input_ids" in sample:
        ids = list(sample["input_ids"]) if not hasattr(sample["input_ids"], "tolist") else sample["input_ids"].tolist()
        cut = len(ids)
        if tokens is not None and tokens.im_start in ids:
            cut = len(ids) - ids[::-1].index(tokens.im_start)  # up to the last <|im_start|>: the answer's turn
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


def estimate_tokens(sample: Any, tokens: TokenFormat | None = None) -> int:
    """A sample's cost for routing: its token count for token-level samples, else characters / 3 plus
    a fixed cost per image (the replica knows the real count only after encoding)."""
    if not isinstance(sample, dict):
        return 64
    n_images = len(_image_keys([sample.get("images"), sample.get("image"), sample.get("messages"),
                                sample.get("prompt")]))  # fmt: skip
    if "input_ids" in sample:
        ids = sample["input_ids"]
        n = len(ids) if not hasattr(ids, "shape") else int(ids.shape[-1])
        pads = 0
        if tokens is not None:
            pads = sum(1 for t in (ids.tolist() if hasattr(ids, "tolist") else ids) if t == tokens.image_pad)
        return n + max(0, IMAGE_TOKENS_ESTIMATE * n_images - pads)
    text = repr(sample.get("completion", "")) + repr(_strip_images(sample.get("messages", "")))
    return len(text) // 3 + IMAGE_TOKENS_ESTIMATE * n_images + 64


def split(samples: list, max_samples: int, tokens: TokenFormat | None = None) -> list[Part]:
    """Cut externalized samples into parts of at most ``max_samples``.

    A prompt group of two or more samples is a part of its own (cut only when larger than
    ``max_samples``), routed by its key: it lands on the replica that has, or will keep, its vision and
    prefix caches, whichever request or process sends it. Samples alone in their group share nothing;
    they are packed together and go to the least loaded replica (no key).
    """
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault(group_key(s, tokens), []).append(i)
    parts: list[Part] = []
    singles: list[int] = []
    for key, indices in groups.items():
        if len(indices) == 1:
            singles += indices
            continue
        for start in range(0, len(indices), max_samples):
            parts.append(_part(samples, indices[start : start + max_samples], key, tokens))
    for start in range(0, len(singles), max_samples):
        parts.append(_part(samples, singles[start : start + max_samples], "", tokens))
    return parts


def _part(samples: list, indices: list[int], key: str, tokens: TokenFormat | None) -> Part:
    indices = sorted(indices)
    chosen = [samples[i] for i in indices]
    return Part(indices, chosen, key, sum(estimate_tokens(s, tokens) for s in chosen))
