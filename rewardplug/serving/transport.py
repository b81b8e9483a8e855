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
import contextvars
import hashlib
import itertools
from dataclasses import dataclass, field
from typing import Any, Callable

from PIL import Image

from ..encoding.request_images import with_digest
from ..images import content_hash, image_digest


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


MAX_HEDGES = 3  # sends of one part at once: one more each hedge_after_s without an answer
MAX_ATTEMPTS = 5  # sends of one part whose replica died, before the part fails


async def answer(handle: Any, part: Part, hedge_after_s: float, *, resend_dead: Callable[[], bool] = lambda: True,
                 on_event: Callable[[str, BaseException | None], None] = lambda kind, error: None) -> tuple[list, dict]:
    """The part's first answer, for both doors. Sent again each ``hedge_after_s`` without one (at most
    MAX_HEDGES sends at once; the router passes over a replica that holds requests and completes none: a
    hung device or host) and when its replica died (MAX_ATTEMPTS in all, while ``resend_dead()``: scores
    are a pure function of the samples). Sends still running then are left to finish, their answers
    dropped (a send cancelled on a hung replica would look like progress there to the router). Another
    error is raised once no send runs. ``on_event("hedge" | "retry", error)`` for the caller's counters."""
    from ray.exceptions import RayActorError  # ActorDiedError, ActorUnavailableError

    loop = asyncio.get_running_loop()
    running: set[asyncio.Task] = set()
    error: BaseException | None = None
    attempts, resend = 1, False
    try:
        while True:
            if error is None and len(running) < MAX_HEDGES:
                if running and not resend:
                    on_event("hedge", None)
                # A context of its own: Serve gives calls made while handling a request that request's id,
                # and the router (no FIFO hand-off) tells concurrent calls apart by their ids.
                running.add(loop.create_task(send(handle, part), context=contextvars.Context()))
            done, running = await asyncio.wait(running, timeout=hedge_after_s, return_when=asyncio.FIRST_COMPLETED)
            resend = False
            for task in done:
                if task.exception() is None:
                    return task.result()
                if isinstance(task.exception(), RayActorError) and attempts < MAX_ATTEMPTS and resend_dead():
                    attempts, resend = attempts + 1, True
                    on_event("retry", task.exception())
                    await asyncio.sleep(min(2.0, 0.2 * attempts))
                else:
                    error = error or task.exception()
            if error is not None and not running:
                raise error
    except asyncio.CancelledError:
        for task in running:
            task.cancel()
        raise
    finally:
        for task in running:
            task.add_done_callback(lambda t: t.cancelled() or t.exception())


async def send(handle: Any, part: Part) -> tuple[list, dict]:
    """Score one part on the pool's replicas (``handle``: the replica deployment's) by its content key:
    scores and the reasons of bad samples, by position in the part. A part a full replica refused (it
    answers None: it holds its bound of parts) is sent again after a short backoff (the router passes a
    full replica over while it knows it full)."""
    for attempt in itertools.count():
        got = await call(handle, part.key, "score_samples", part.samples)
        if got is not None:
            return got
        await asyncio.sleep(min(1.0, 0.02 * 2**attempt))
    raise AssertionError("unreachable")


async def call(handle: Any, session_id: str, method: str, *args: Any) -> Any:
    """One call through Serve; when the caller is cancelled (a deadline, a sibling's failure), so is the
    call, which frees its place at the replica."""
    response = getattr(handle.options(session_id=session_id), method).remote(*args)
    try:
        return await response
    except asyncio.CancelledError:
        response.cancel()
        raise


def _digest(value: Any) -> str:
    if isinstance(value, Image.Image):
        return image_digest(value)
    h = content_hash()
    if hasattr(value, "__array_interface__"):
        import numpy as np

        array = np.ascontiguousarray(value)
        h.update(f"{array.dtype}{array.shape}".encode())
        h.update(array.tobytes())
    else:
        h.update(value.encode() if isinstance(value, str) else bytes(value))
    return h.hexdigest(length=16)


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
    """Replica side: fetch every ImageRef once and put the images back in place, each PIL image with
    the digest its sender computed (``with_digest``: the engine does not hash it again). Only the pool's
    Python door calls this: its callers are trusted; the HTTP door's images are digested here."""
    refs: dict[Any, ImageRef] = {}
    _map(samples, lambda v: refs.setdefault(v.ref, v) if isinstance(v, ImageRef) else v)
    if not refs:
        return samples
    found = {ref: with_digest(obj, refs[ref].key) if isinstance(obj, Image.Image) else obj
             for ref, obj in zip(refs, await asyncio.gather(*refs))}  # fmt: skip
    return _map(samples, lambda v: found[v.ref] if isinstance(v, ImageRef) else v)


def _map(value: Any, leaf: Callable[[Any], Any]) -> Any:
    """``value`` with ``leaf`` applied to each value inside its dicts, lists and tuples (tuples become lists)."""
    if isinstance(value, dict):
        return {k: _map(v, leaf) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_map(v, leaf) for v in value]
    return leaf(value)


def group_key(sample: Any, im_start: int | None = None) -> str:
    """Samples with the same prompt (everything before the answer) and the same images share a key; an
    ImageRef's repr is its content digest. Token samples: the ids up to the last ``<|im_start|>`` (the
    answer's turn)."""
    h = hashlib.blake2b(digest_size=12)
    if not isinstance(sample, dict):
        h.update(repr(id(sample)).encode())
    elif "input_ids" in sample:
        ids = sample["input_ids"]
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids) if isinstance(ids, list | tuple) else ids
        if isinstance(ids, list):  # anything else is a bad sample: keyed as it is, the engine says why
            ids = ids[: len(ids) - ids[::-1].index(im_start) if im_start in ids else len(ids)]
        h.update(repr((ids, sample.get("images"))).encode())
    else:
        head = sample["messages"][:-1] if isinstance(sample.get("messages"), list) else sample.get("prompt")
        h.update(repr((head, sample.get("images"), sample.get("image"))).encode())
    return h.hexdigest()


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
