"""RewardPool: replicas of the reward model as Ray actors, with the engine's calls.

Each replica is an async Ray actor holding a RewardModel and a RewardEngine; concurrent requests to
one replica are batched together by its engine. The driver side (this process) routes requests:

- samples of one prompt group go to one replica (its vision and prefix caches hit), groups spread by
  least outstanding tokens;
- images go once per request through the object store (``ray.put`` per distinct image), not once
  per sample;
- in-flight samples are bounded (``max_inflight_per_replica``): ``submit`` waits or raises
  PoolBusyError;
- a replica that dies has its in-flight requests re-run on another replica; Ray restarts it; each
  request resolves exactly once; a request past ``request_timeout_s`` fails with PoolTimeoutError.

``submit`` only queues: routing, ``ray.put`` and the actor calls happen on a dispatcher thread, so it
returns in well under a millisecond.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import re
import os
import queue
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Sequence

from PIL import Image

from ..errors import InvalidSampleError, RewardPlugError
from ..samples import token_samples

logger = logging.getLogger(__name__)

NAMESPACE = "rewardplug"


class PoolBusyError(RewardPlugError):
    """The pool holds as many in-flight samples as it allows (``busy="raise"``)."""


class PoolTimeoutError(RewardPlugError, TimeoutError):
    """A request took longer than ``request_timeout_s``."""


class ReplicaError(RewardPlugError):
    """A replica could not start (for example the model failed to load) or no replica is left."""


# ---- images through the object store ---------------------------------------------------------------


@dataclass(frozen=True)
class _ImageRef:
    ref: Any = field(repr=False, compare=False)  # ray.ObjectRef of a PIL image, bytes or a long string
    key: str = ""  # content digest: the same image gives the same routing key in every request


def _digest(value) -> str:
    h = hashlib.blake2b(digest_size=16)
    if isinstance(value, Image.Image):
        h.update(f"{value.mode}{value.size}".encode())
        h.update(value.tobytes())
    else:
        h.update(value.encode() if isinstance(value, str) else bytes(value))
    return h.hexdigest()


def _externalize(samples: list, put) -> list:
    """Copy samples, replacing each distinct in-memory image by one object-store reference."""
    refs: dict[Any, _ImageRef] = {}

    def swap(value):
        if isinstance(value, Image.Image | bytes | bytearray) or (isinstance(value, str) and len(value) > 4096):
            key = id(value) if not isinstance(value, str) else value
            if key not in refs:
                refs[key] = _ImageRef(put(value), _digest(value))
            return refs[key]
        if isinstance(value, dict) and "bytes" in value and value["bytes"] is not None:
            return swap(value["bytes"])
        return value

    def walk_messages(messages):
        if not isinstance(messages, list):
            return messages
        out = []
        for m in messages:
            if isinstance(m, dict) and isinstance(m.get("content"), list):
                items = [{**it, "image": swap(it["image"])} if isinstance(it, dict) and "image" in it else it
                         for it in m["content"]]  # fmt: skip
                m = {**m, "content": items}
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
                s[key] = walk_messages(s[key])
        result.append(s)
    return result


async def _internalize(samples: list) -> list:
    """Replica side: fetch every _ImageRef (once each) and put the objects back."""
    import asyncio

    found: dict[Any, Any] = {}

    def collect(value):
        if isinstance(value, _ImageRef):
            found[value.ref] = None
        elif isinstance(value, dict):
            for v in value.values():
                collect(v)
        elif isinstance(value, list | tuple):
            for v in value:
                collect(v)

    def restore(value):
        if isinstance(value, _ImageRef):
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


def _group_key(sample: Any) -> str:
    """Samples with the same prompt (messages before the answer, same images) share a key."""
    if not isinstance(sample, dict):
        return repr(id(sample))
    if "messages" in sample:
        head = sample["messages"][:-1] if isinstance(sample["messages"], list) else sample["messages"]
    else:
        head = sample.get("prompt")
    return repr((head, sample.get("images"), sample.get("image")))


def _estimate_tokens(sample: Any) -> int:
    """Rough cost for routing: characters / 3 plus 256 per image."""
    text = repr(sample.get("completion", "")) if isinstance(sample, dict) else ""
    images = sample.get("images") if isinstance(sample, dict) else None
    n_images = len(images) if isinstance(images, list | tuple) else int(images is not None)
    return len(text) // 3 + 256 * n_images + 64


# ---- the replica actor ------------------------------------------------------------------------------


class Replica:
    """One copy of the model (on one GPU, several GPUs of a node, or the CPU) with its engine."""

    def __init__(self, model: str, index: int, model_options: dict, engine_options: dict, threads: int):
        import ray
        import torch

        from ..engine import RewardEngine
        from .placement import load_on_assigned_gpus

        logging.basicConfig(level=logging.INFO)
        self.index = index
        self.gpu_ids = [str(g) for g in ray.get_gpu_ids()]
        if threads > 0:
            torch.set_num_threads(threads)
        self.model = load_on_assigned_gpus(model, self.gpu_ids, **model_options)
        self.engine = RewardEngine(self.model, on_invalid="none", **engine_options)

    async def score(self, samples: list) -> tuple[list, dict]:
        """Scores (None for a bad sample) and the reasons of the bad ones, by index."""
        samples = await _internalize(samples)
        try:
            return await self.engine.ascore(samples, on_invalid="raise"), {}
        except InvalidSampleError as e:
            return e.scores, e.errors

    def stats(self) -> dict:
        return self.engine.stats()

    def health(self) -> dict:
        import ray

        return {
            "replica": self.index,
            "pid": os.getpid(),
            "node": ray.get_runtime_context().get_node_id(),
            "gpu_ids": self.gpu_ids,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "device": str(self.model.device),
            "queue_depth": self.engine.stats()["queue_depth"],
        }

    def ready(self) -> bool:
        return True


# ---- the driver side --------------------------------------------------------------------------------


@dataclass
class _Request:
    samples: list
    future: Future
    on_invalid: str
    deadline: float
    scores: list = field(default_factory=list)
    errors: dict = field(default_factory=dict)
    remaining: int = 0
    failed: BaseException | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass(eq=False)  # hashed by identity: kept in a set of parts in flight
class _Part:
    """A slice of a request sent to one replica."""

    request: _Request
    indices: list[int]
    samples: list  # externalized
    tokens: int
    replica: int = -1
    attempts: int = 0
    ref: Any = None
    done: bool = False


class RewardPool:
    """Replicas of a reward model on a Ray cluster, with the engine's calls.

    model: hub id or checkpoint folder (readable from every node).
    num_replicas: default one per available GPU (per ``gpus_per_replica`` GPUs), or 1 without GPUs.
    gpus_per_replica: 1; >1 splits one replica over that many GPUs of one node (balanced device map);
        fractions (0.5) share a GPU with a trainer; 0 runs on the CPU.
    placement: "pack" (fill nodes first) or "spread" (replicas on different nodes when possible).
    address: an existing cluster ("auto", "ray://host:10001"), or None to use/start a local one.
    max_inflight_per_replica: samples sent and not yet answered, per replica.
    busy: "wait" (submit blocks until there is room) or "raise" (PoolBusyError).
    request_timeout_s: a request not answered by then fails with PoolTimeoutError.
    options: RewardModel.from_pretrained options (dtype, min_pixels, max_length, ...) and RewardEngine
        options (max_batch_tokens, vision_cache_mb, ...).
    """

    def __init__(
        self,
        model: str | os.PathLike,
        *,
        num_replicas: int | None = None,
        gpus_per_replica: float = 1,
        cpus_per_replica: float = 1,
        placement: str = "pack",
        address: str | None = None,
        max_inflight_per_replica: int = 512,
        request_timeout_s: float = 600.0,
        busy: str = "wait",
        ready_timeout_s: float = 600.0,
        **options: Any,
    ):
        import ray
        from ray.util.placement_group import placement_group

        if placement not in ("pack", "spread"):
            raise ValueError(f"placement must be 'pack' or 'spread', got {placement!r}")
        if busy not in ("wait", "raise"):
            raise ValueError(f"busy must be 'wait' or 'raise', got {busy!r}")
        if not ray.is_initialized():
            ray.init(address=address, namespace=NAMESPACE, log_to_driver=True)
        if num_replicas is None:
            gpus = ray.cluster_resources().get("GPU", 0)
            num_replicas = max(1, int(gpus // gpus_per_replica)) if gpus_per_replica > 0 and gpus else 1
        model_options, engine_options = _split_options(options)
        self.name = f"rewardplug-{uuid.uuid4().hex[:8]}"
        self._config = dict(
            model=str(model), num_replicas=num_replicas, gpus_per_replica=gpus_per_replica,
            cpus_per_replica=cpus_per_replica, max_inflight_per_replica=max_inflight_per_replica,
            request_timeout_s=request_timeout_s, busy=busy,
            address=ray.get_runtime_context().gcs_address,  # where unpickled handles connect
        )  # fmt: skip
        bundle = {"CPU": cpus_per_replica, **({"GPU": gpus_per_replica} if gpus_per_replica else {})}
        self._pg = placement_group([bundle] * num_replicas, strategy="PACK" if placement == "pack" else "SPREAD",
                                   name=self.name)  # fmt: skip
        if not _wait(self._pg.ready(), ready_timeout_s):
            ray.util.remove_placement_group(self._pg)
            raise ReplicaError(
                f"the cluster cannot place {num_replicas} replicas of {bundle} (it has {ray.cluster_resources()}); "
                "lower num_replicas or gpus_per_replica"
            )
        actor_cls = ray.remote(Replica)
        threads = max(1, int(cpus_per_replica))
        actors = [
            actor_cls.options(
                name=f"{self.name}-{i}", namespace=NAMESPACE, num_cpus=cpus_per_replica, num_gpus=gpus_per_replica,
                max_restarts=-1, max_task_retries=0, max_concurrency=1000,
                scheduling_strategy=_bundle_strategy(self._pg, i),
            ).remote(str(model), i, model_options, engine_options, threads)  # fmt: skip
            for i in range(num_replicas)
        ]
        self._attach(actors)
        with _HANDLES_LOCK:
            _HANDLES[self.name] = self
        errors = self._wait_ready(ready_timeout_s)
        if errors:
            self.shutdown()
            raise ReplicaError("replicas failed to start:\n  " + "\n  ".join(errors))

    # ---- handles that travel --------------------------------------------------------------------

    def __reduce__(self):
        return (_reattach, (self.name, self._config))

    def _attach(self, actors: list | None = None) -> None:
        """Per-process state: actor handles (looked up by name in another process), the dispatcher
        thread, routing tables."""
        import ray

        n = self._config["num_replicas"]
        self._actors = actors or [ray.get_actor(f"{self.name}-{i}", namespace=NAMESPACE) for i in range(n)]
        self._alive = [True] * n
        self._outstanding = [0] * n  # estimated tokens in flight per replica
        self._affinity: dict[str, int] = {}
        self._inflight = 0
        self._cond = threading.Condition()
        self._queue: queue.Queue = queue.Queue()
        self._parts: set = set()
        self._closed = False
        self._counts = {"requests": 0, "samples": 0, "retries": 0, "timeouts": 0, "replica_failures": 0}
        self._dispatcher = threading.Thread(target=self._dispatch_loop, name="rewardplug-pool", daemon=True)
        self._dispatcher.start()
        self._watchdog = threading.Thread(target=self._watch_loop, name="rewardplug-pool-watch", daemon=True)
        self._watchdog.start()

    def _wait_ready(self, timeout: float) -> list[str]:
        import ray

        errors = []
        for i, actor in enumerate(self._actors):
            try:
                ray.get(actor.ready.remote(), timeout=timeout)
            except Exception as e:  # noqa: BLE001 - reported to the user with the replica's reason
                errors.append(f"replica {i}: {_cause(e)}")
        return errors

    # ---- public API -----------------------------------------------------------------------------

    @property
    def num_replicas(self) -> int:
        return self._config["num_replicas"]

    def submit(self, samples: Sequence[Any], *, on_invalid: str = "raise", timeout: float | None = None) -> Future:
        """Queue samples; returns at once a Future of their scores, in input order.

        When the pool is full, waits up to ``timeout`` seconds (busy="wait") or raises PoolBusyError.
        """
        if self._closed:
            raise RuntimeError("RewardPool is shut down")
        if isinstance(samples, dict):
            raise TypeError("submit() takes a list of samples; wrap a single sample in a list")
        samples = list(samples)
        n = len(samples)
        capacity = self._config["max_inflight_per_replica"] * self.num_replicas
        with self._cond:
            def has_room():
                return self._closed or self._inflight == 0 or self._inflight + n <= capacity

            if not has_room():
                if self._config["busy"] == "raise":
                    raise PoolBusyError(f"{self._inflight} samples in flight, the pool allows {capacity}")
                if not self._cond.wait_for(has_room, timeout):
                    raise PoolBusyError(f"no room in the pool after {timeout}s ({self._inflight} samples in flight)")
                if self._closed:
                    raise RuntimeError("RewardPool is shut down")
            self._inflight += n
            self._counts["requests"] += 1
            self._counts["samples"] += n
        request = _Request(samples, Future(), on_invalid, time.monotonic() + self._config["request_timeout_s"])
        request.future.set_running_or_notify_cancel()
        request.scores, request.remaining = [None] * n, n
        if n == 0:
            self._finish_request(request)
        else:
            self._queue.put(request)
        return request.future

    def score(self, samples: Sequence[Any], *, on_invalid: str = "raise") -> list:
        return self.submit(samples, on_invalid=on_invalid).result()

    async def ascore(self, samples: Sequence[Any], *, on_invalid: str = "raise") -> list:
        import asyncio

        return await asyncio.wrap_future(self.submit(samples, on_invalid=on_invalid))

    def score_tokens(self, input_ids: Any, images: list | None = None, attention_mask: Any = None, **kw) -> list:
        """Score conversations given as token ids (see ``rewardplug.samples.token_samples``)."""
        return self.score(token_samples(input_ids, images, attention_mask), **kw)

    def stats(self) -> dict:
        """The pool's own counters and each replica's engine stats."""
        import ray

        replicas = []
        for i, actor in enumerate(self._actors):
            try:
                replicas.append(ray.get(actor.stats.remote(), timeout=30))
            except Exception as e:  # noqa: BLE001
                replicas.append({"error": _cause(e)})
        with self._cond:
            out = dict(self._counts, inflight_samples=self._inflight, replicas=replicas)
        for key in ("samples", "real_tokens", "padded_tokens", "prefix_hits", "vision_hits", "vision_misses"):
            out[f"engine_{key}"] = sum(r.get(key, 0) for r in replicas)
        return out

    def health(self, timeout: float = 30) -> list[dict]:
        """Each replica's state: alive or the reason it is not, its GPUs and device."""
        import ray

        out = []
        for i, actor in enumerate(self._actors):
            try:
                out.append({"alive": True, **ray.get(actor.health.remote(), timeout=timeout)})
            except Exception as e:  # noqa: BLE001
                out.append({"replica": i, "alive": False, "error": _cause(e)})
        return out

    def shutdown(self) -> None:
        """Kill the replicas and free their resources. Pending requests fail."""
        import ray

        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        for actor in self._actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        try:
            ray.util.remove_placement_group(self._pg)
        except Exception:  # noqa: BLE001
            pass
        for part in list(self._parts):
            self._settle(part, error=ReplicaError("the pool was shut down"))
        self._dispatcher.join(timeout=60)
        while True:  # retries queued after the dispatcher stopped
            try:
                self._drop(self._queue.get_nowait())
            except queue.Empty:
                break
        self._parts.clear()  # drop object refs now, not after Ray itself has shut down
        self._watchdog.join(timeout=5)
        with self._cond:
            self._cond.notify_all()  # wake submits waiting for room: they see the pool is shut down

    def __enter__(self) -> "RewardPool":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # ---- dispatching ----------------------------------------------------------------------------

    def _dispatch_loop(self) -> None:
        import ray

        while (item := self._queue.get()) is not None:
            if self._closed:
                self._drop(item)
                continue
            try:
                if isinstance(item, _Part):  # a retry
                    self._send(item)
                else:
                    for part in self._split(item, ray.put):
                        self._send(part)
            except Exception as e:  # noqa: BLE001 - never let the dispatcher die
                logger.exception("dispatch failed")
                request = item.request if isinstance(item, _Part) else item
                self._fail_request(request, e)

    def _drop(self, item) -> None:
        error = ReplicaError("the pool was shut down")
        if isinstance(item, _Part):
            self._settle(item, error=error)
        elif item is not None:
            self._fail_request(item, error)

    def _split(self, request: _Request, put) -> list[_Part]:
        """Group by prompt, assign each group a replica, one part per replica."""
        samples = _externalize(request.samples, put)
        groups: dict[str, list[int]] = {}
        for i, s in enumerate(samples):
            groups.setdefault(_group_key(s), []).append(i)
        by_replica: dict[int, list[int]] = {}
        with self._cond:
            for key, indices in sorted(groups.items(), key=lambda kv: -len(kv[1])):
                tokens = sum(_estimate_tokens(samples[i]) for i in indices)
                replica = self._choose(key, tokens)
                self._outstanding[replica] += tokens
                by_replica.setdefault(replica, []).extend(indices)
        parts = []
        for replica, indices in by_replica.items():
            indices.sort()
            tokens = sum(_estimate_tokens(samples[i]) for i in indices)
            parts.append(_Part(request, indices, [samples[i] for i in indices], tokens, replica))
        return parts

    def _choose(self, key: str, tokens: int) -> int:
        alive = [i for i, ok in enumerate(self._alive) if ok] or list(range(self.num_replicas))
        least = min(alive, key=lambda i: self._outstanding[i])
        sticky = self._affinity.get(key)
        if sticky in alive and self._outstanding[sticky] <= 2 * self._outstanding[least] + tokens:
            return sticky
        if len(self._affinity) > 100_000:
            self._affinity.clear()
        self._affinity[key] = least
        return least

    def _send(self, part: _Part) -> None:
        if part.replica < 0 or not self._alive[part.replica]:
            with self._cond:
                part.replica = self._choose("", part.tokens)
                self._outstanding[part.replica] += part.tokens
        part.attempts += 1
        part.ref = self._actors[part.replica].score.remote(part.samples)
        self._parts.add(part)
        part.ref.future().add_done_callback(lambda f, p=part, ref=part.ref: self._on_done(p, ref, f))

    def _on_done(self, part: _Part, ref, future) -> None:
        import ray

        if part.ref is not ref:  # a retry superseded this call
            return
        with self._cond:  # the replica is done with this work, whatever became of the request
            self._outstanding[part.replica] = max(0, self._outstanding[part.replica] - part.tokens)
        if part.done:  # already timed out
            return
        try:
            scores, errors = future.result()
        except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError) as e:
            self._replica_failed(part, e)
            return
        except Exception as e:  # noqa: BLE001 - a failure inside the replica: report it for these samples
            self._settle(part, error=RewardPlugError(f"replica {part.replica} failed: {_cause(e)}"))
            return
        self._settle(part, scores=scores, errors=errors)

    def _replica_failed(self, part: _Part, error: BaseException) -> None:
        if self._closed:
            self._settle(part, error=ReplicaError("the pool was shut down"))
            return
        replica = part.replica
        with self._cond:
            if self._alive[replica]:
                self._alive[replica] = False
                self._counts["replica_failures"] += 1
                logger.warning("replica %d died (%s); re-running its requests elsewhere", replica, _cause(error))
                threading.Thread(target=self._probe, args=(replica,), daemon=True).start()
            self._counts["retries"] += 1
        if part.attempts > self.num_replicas + 2:
            self._settle(part, error=ReplicaError(f"gave up after {part.attempts} attempts: {_cause(error)}"))
            return
        part.replica = -1
        self._queue.put(part)

    def _probe(self, replica: int) -> None:
        """Wait for Ray to restart a dead replica, then route to it again."""
        import ray

        while not self._closed:
            try:
                ray.get(self._actors[replica].ready.remote(), timeout=30)
                with self._cond:
                    self._alive[replica] = True
                logger.info("replica %d is back", replica)
                return
            except Exception:  # noqa: BLE001 - still restarting
                time.sleep(1.0)

    def _watch_loop(self) -> None:
        import ray

        while not self._closed:
            time.sleep(0.2)
            now = time.monotonic()
            for part in list(self._parts):
                if not part.done and now > part.request.deadline:
                    with self._cond:
                        self._counts["timeouts"] += 1
                    try:
                        ray.cancel(part.ref)
                    except Exception:  # noqa: BLE001
                        pass
                    limit = self._config["request_timeout_s"]
                    self._settle(part, error=PoolTimeoutError(f"no answer from replica {part.replica} within {limit}s"))

    # ---- resolution -----------------------------------------------------------------------------

    def _settle(self, part: _Part, *, scores: list | None = None, errors: dict | None = None,
                error: BaseException | None = None) -> None:  # fmt: skip
        """Record a part's outcome (its scores, or the error that ends its request), once."""
        request = part.request
        with request.lock:
            if part.done:
                return
            part.done = True
            self._parts.discard(part)
            if error is not None:
                request.failed = request.failed or error
            else:
                for k, i in enumerate(part.indices):
                    request.scores[i] = scores[k]
                    if k in errors:
                        request.errors[i] = errors[k]
            request.remaining -= len(part.indices)
            finished = request.remaining == 0
        if finished:
            self._finish_request(request)

    def _fail_request(self, request: _Request, error: BaseException) -> None:
        with request.lock:
            if request.remaining == 0:
                return
            request.failed, request.remaining = error, 0
        self._finish_request(request)

    def _finish_request(self, request: _Request) -> None:
        with self._cond:
            self._inflight -= len(request.samples)
            self._cond.notify_all()
        if request.failed is not None:
            request.future.set_exception(request.failed)
        elif request.errors and request.on_invalid == "raise":
            request.future.set_exception(InvalidSampleError(request.errors, scores=request.scores))
        else:
            request.future.set_result(request.scores)


_HANDLES: dict[str, RewardPool] = {}  # live handles of this process, by pool name
_HANDLES_LOCK = threading.Lock()


def _reattach(name: str, config: dict) -> RewardPool:
    """Unpickle a pool handle: the live one of this process, or a new one that connects to the
    cluster and finds the replicas (one per process: each has its dispatcher threads)."""
    with _HANDLES_LOCK:
        pool = _HANDLES.get(name)
        if pool is None or pool._closed:
            pool = _HANDLES[name] = _attach_new(name, config)
        return pool


def _attach_new(name: str, config: dict) -> RewardPool:
    import ray

    if not ray.is_initialized():
        ray.init(address=config["address"], namespace=NAMESPACE)
    pool = RewardPool.__new__(RewardPool)
    pool.name, pool._config, pool._pg = name, config, None
    pool._attach()
    return pool


def _split_options(options: dict) -> tuple[dict, dict]:
    from ..engine import RewardEngine
    from ..model import RewardModel

    model_keys = set(inspect.signature(RewardModel.from_pretrained).parameters) - {"name_or_path", "cls"}
    engine_keys = set(inspect.signature(RewardEngine.__init__).parameters) - {"self", "model", "on_invalid"}
    unknown = set(options) - model_keys - engine_keys
    if unknown:
        raise TypeError(f"unknown RewardPool options {sorted(unknown)}; "
                        f"model options: {sorted(model_keys)}; engine options: {sorted(engine_keys)}")  # fmt: skip
    return ({k: v for k, v in options.items() if k in model_keys}, {k: v for k, v in options.items() if k in engine_keys})


def _bundle_strategy(pg, index: int):
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=index)


def _wait(ref, timeout: float) -> bool:
    import ray

    ready, _ = ray.wait([ref], timeout=timeout)
    return bool(ready)


def _cause(error: BaseException) -> str:
    """The replica-side reason inside a Ray error, in one line ("CheckpointError: ...")."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, BaseException) and cause is not error:
        return f"{type(cause).__name__}: {cause}".splitlines()[0]
    lines = re.findall(r"^\s*(?:[\w]+\.)*(\w+(?:Error|Exception): .+)$", str(error), flags=re.M)
    return lines[-1].strip() if lines else f"{type(error).__name__}: {error}".splitlines()[0]
