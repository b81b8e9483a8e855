"""RewardPool: the Python door to a pool of reward-model replicas on Ray Serve.

The replicas are a Serve application (``rewardplug.serving.replica.RewardReplica``); this handle
finds or creates it by name, cuts each request into parts by prompt group (images once through the
object store), sends the parts through Serve (routed by ``PromptGroupRouter``), re-sends the parts of a
replica that died, and resolves each request's future exactly once.

>>> from rewardplug import RewardPool
>>> pool = RewardPool("Skywork/Skywork-VL-Reward-7B", name="rm", gpus_per_replica=1)  # doctest: +SKIP
>>> pool.score([{"prompt": "What is it?", "completion": "A cat.", "images": [image]}])  # doctest: +SKIP
[1.23]

With a name, the pool is shared: every process on the cluster that asks for the same name and options
(each rank of a training job) attaches to the same replicas, and it lives until ``pool.shutdown()`` or
``rewardplug pool stop NAME``; ``close()`` only detaches a handle. Without a name the pool is private
and removed with the handle that made it.
"""

from __future__ import annotations

import asyncio
import atexit
import hashlib
import inspect
import logging
import os
import re
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from typing import Any, Sequence

from ..engine.pending import PendingRequest, check_on_invalid
from ..errors import (BusyError, PoolBusyError, PoolConfigError, PoolNotFoundError, PoolTimeoutError, ReplicaError,
                      ScoringError)  # fmt: skip
from ..samples import token_samples
from .http import HttpSettings
from .replica import DEPLOYMENT, ReplicaSettings
from .transport import Part, TokenFormat, externalize, split

logger = logging.getLogger(__name__)

DEFAULT_PART_SAMPLES = 64  # samples per call to a replica: small enough to spread, big enough to batch
DEFAULT_HTTP_PORT = 8000


@dataclass(frozen=True)
class HandleOptions:
    """Per-handle behavior; not part of the pool's identity."""

    busy: str = "wait"
    request_timeout_s: float = 600.0
    part_samples: int = DEFAULT_PART_SAMPLES
    max_pending_samples: int = 65536
    max_attempts: int = 5


class RewardPool:
    """Replicas of a reward model on a Ray cluster (Ray Serve), with the engine's calls.

    model: hub id or checkpoint folder (readable from every node).
    name: a pool shared by every process of the cluster that uses the name (get-or-create); None: a
        private pool removed with this handle (context manager, ``shutdown()`` or process exit).
    address: an existing Ray cluster ("auto", "ray://host:10001", "host:6379"); None: the cluster this
        process is connected to, else RAY_ADDRESS or a cluster started with ``ray start``, else a new
        local one (which ends with this process: start Ray first to share a pool between processes).
    num_replicas: default one per GPU the cluster has free (``gpus_per_replica`` each), 1 without GPUs.
    gpus_per_replica: 1; >1 splits one replica over that many GPUs of one node (balanced device map);
        a fraction (0.5) shares a GPU with a trainer; 0 runs on CPUs.
    placement: "pack" (Serve's default) or "spread" (at most one replica per node).
    max_inflight_per_replica: samples a replica holds at once, whoever sends them (a bound enforced by
        the replica); more wait there, or fail with PoolBusyError when ``busy="raise"``.
    request_timeout_s: a request not answered by then fails with PoolTimeoutError.
    autoscale: None (fixed size) or (min_replicas, max_replicas): Serve scales on ongoing requests, each
        at most ``part_samples`` samples, so on queued samples.
    http_port: also open the HTTP door on this port (``http``: its HttpSettings: API key, limits, roots).
    runtime_env: Ray runtime environment of the replicas (env vars such as HF_HOME, pip packages).
    options: RewardModel.from_pretrained options (dtype, min_pixels, max_length, ...) and RewardEngine
        options (max_batch_tokens, vision_cache_mb, ...).
    Failures: a bad sample -> InvalidSampleError (or None with ``on_invalid="none"``); a system failure
    -> ScoringError (ReplicaError, PoolTimeoutError), never None.
    """

    def __init__(
        self,
        model: str | os.PathLike,
        *,
        name: str | None = None,
        address: str | None = None,
        num_replicas: int | None = None,
        gpus_per_replica: float = 1,
        cpus_per_replica: float = 1,
        placement: str = "pack",
        max_inflight_per_replica: int = 512,
        max_ongoing_requests: int = 64,
        request_timeout_s: float = 600.0,
        busy: str = "wait",
        ready_timeout_s: float = 600.0,
        autoscale: tuple[int, int] | None = None,
        http_port: int | None = None,
        http_host: str = "127.0.0.1",
        http: HttpSettings | dict | None = None,
        part_samples: int = DEFAULT_PART_SAMPLES,
        max_pending_samples: int = 65536,
        runtime_env: dict | None = None,
        **options: Any,
    ):
        if placement not in ("pack", "spread"):
            raise ValueError(f"placement must be 'pack' or 'spread', got {placement!r}")
        if busy not in ("wait", "raise"):
            raise ValueError(f"busy must be 'wait' or 'raise', got {busy!r}")
        if autoscale is not None and not (len(autoscale) == 2 and 0 <= autoscale[0] <= autoscale[1] and autoscale[1] > 0):
            raise ValueError(f"autoscale must be (min_replicas, max_replicas) with 0 <= min <= max, got {autoscale!r}")
        model_options, engine_options = split_options(options)
        http_settings = http if isinstance(http, HttpSettings) else HttpSettings(**(http or {}))
        settings = ReplicaSettings(str(model), model_options, engine_options, max_inflight_per_replica,
                                   asdict(http_settings))  # fmt: skip
        deploy = dict(num_replicas=num_replicas, gpus_per_replica=gpus_per_replica, cpus_per_replica=cpus_per_replica,
                      placement=placement, max_ongoing_requests=max_ongoing_requests,
                      autoscale=list(autoscale) if autoscale else None, http_port=http_port, http_host=http_host,
                      runtime_env=runtime_env)  # fmt: skip
        self._options = HandleOptions(busy, request_timeout_s, part_samples, max_pending_samples)
        _connect(address)
        self.owner = name is None
        self.name = name or f"rewardplug-{uuid.uuid4().hex[:8]}"
        self._open(settings, deploy, ready_timeout_s)
        if self.owner:
            atexit.register(self.shutdown)

    # ---- finding or making the pool -----------------------------------------------------------------

    @classmethod
    def connect(cls, name: str, *, address: str | None = None, **handle_options: Any) -> "RewardPool":
        """Attach to a running named pool (PoolNotFoundError if there is none)."""
        _connect(address)
        entry = _directory_call("get", name)
        if entry is None or entry["state"] != "ready" or not _app_running(name):
            running = pool_names()
            raise PoolNotFoundError(f"no pool named {name!r} runs on this Ray cluster (running pools: {running or 'none'})")
        pool = cls.__new__(cls)
        pool.name, pool.owner = name, False
        pool._options = HandleOptions(**handle_options)
        pool._attach()
        return pool

    def _open(self, settings: ReplicaSettings, deploy: dict, ready_timeout_s: float) -> None:
        request = {"settings": _comparable(asdict(settings)), **deploy}
        deadline = time.monotonic() + ready_timeout_s
        while True:
            claim = _directory_call("claim", self.name, request, asdict(settings))
            if claim["role"] == "create":
                try:
                    self._deploy(settings, deploy, deadline)
                except BaseException as e:
                    _directory_call("set_state", self.name, "failed", str(e))
                    raise
                _directory_call("set_state", self.name, "ready", None, self._deployed)
                break
            _check_same(self.name, claim["request"], request)
            if claim["state"] == "ready" and not _app_running(self.name):
                _directory_call("remove", self.name)  # removed behind the directory's back: make it again
                continue
            _wait_ready(self.name, deadline)
            break
        self._attach()

    def _deploy(self, settings: ReplicaSettings, deploy: dict, deadline: float) -> None:
        import ray
        from ray import serve

        gpus = deploy["gpus_per_replica"]
        replicas = deploy["num_replicas"] or _default_replicas(gpus)
        _check_resources(replicas if not deploy["autoscale"] else deploy["autoscale"][0] or 1, gpus,
                         deploy["cpus_per_replica"])  # fmt: skip
        _start_serve(deploy)
        self._deployed = {"num_replicas": replicas}
        logger.info("deploying pool %r: %s replicas of %s", self.name, deploy["autoscale"] or replicas, settings.model)
        _run(_application(settings, deploy, replicas, {"offloaded": False}, self.name), self.name, deploy)
        while True:
            status = serve.status().applications.get(self.name)
            if status is not None and status.status == "RUNNING":
                return
            if status is not None and status.status in ("DEPLOY_FAILED", "UNHEALTHY"):
                reason = _first_error(status)
                serve.delete(self.name)
                raise ReplicaError(f"pool {self.name!r}: replicas failed to start: {reason}")
            if time.monotonic() > deadline:
                serve.delete(self.name)
                raise ReplicaError(f"pool {self.name!r} was not ready within the timeout; cluster: {ray.cluster_resources()}")
            time.sleep(0.2)

    def _attach(self) -> None:
        """Per-process state of a handle: Serve's handle, the event loop that drives requests."""
        from ray import serve

        entry = _directory_call("get", self.name)
        if entry is None:
            raise PoolNotFoundError(f"no pool named {self.name!r} runs on this Ray cluster")
        self._request, self._deployed = entry["request"], entry["deployed"]
        self._lazy = None
        self._handle = serve.get_deployment_handle(DEPLOYMENT, app_name=self.name)
        self._tokens = TokenFormat(**self._handle.token_format.remote().result(timeout_s=120))
        self._loop = _loop()
        self._closed = False
        self._pending_samples = 0
        self._room = threading.Condition()
        self._counts = {"requests": 0, "samples": 0, "retries": 0, "timeouts": 0}
        with _HANDLES_LOCK:
            if self.name not in _HANDLES or _HANDLES[self.name]._closed:
                _HANDLES[self.name] = self

    # ---- handles that travel ------------------------------------------------------------------------

    def _ready(self) -> None:
        """Attach a handle that was unpickled (connecting to its cluster first), on its first use."""
        if getattr(self, "_lazy", None) is None:
            return
        with self._attach_lock:
            if self._lazy is not None:
                import ray

                _connect(self._lazy)
                self._attach()

    def __reduce__(self):
        import ray

        address = self._lazy if getattr(self, "_lazy", None) else ray.get_runtime_context().gcs_address
        return (_reattach, (self.name, address, asdict(self._options)))

    # ---- scoring ------------------------------------------------------------------------------------

    @property
    def num_replicas(self) -> int:
        from ray import serve

        self._ready()
        status = serve.status().applications.get(self.name)
        if status is None:
            return 0
        return status.deployments[DEPLOYMENT].replica_states.get("RUNNING", 0)

    def submit(self, samples: Sequence[Any], *, on_invalid: str = "raise", timeout: float | None = None) -> Future:
        """Queue samples; returns at once a Future of their scores, in input order.

        This handle keeps at most ``max_pending_samples`` samples unresolved: beyond that ``submit``
        waits up to ``timeout`` (busy="wait") or raises PoolBusyError (busy="raise").
        """
        check_on_invalid(on_invalid)
        if isinstance(samples, dict):
            raise TypeError("submit() takes a list of samples; wrap a single sample in a list")
        if self._closed:
            raise RuntimeError("this RewardPool handle is closed")
        self._ready()
        samples = list(samples)
        n = len(samples)
        self._reserve(n, timeout)
        pending = PendingRequest(n, on_invalid, on_done=lambda p: self._unreserve(p.size))
        if n:
            self._loop.call_soon_threadsafe(self._start, pending, samples)
        return pending.future

    def score(self, samples: Sequence[Any], *, on_invalid: str = "raise") -> list:
        return self.submit(samples, on_invalid=on_invalid).result()

    async def ascore(self, samples: Sequence[Any], *, on_invalid: str = "raise") -> list:
        """Like ``score``; never blocks the running event loop (waiting for room happens in a thread)."""
        future = await asyncio.to_thread(self.submit, samples, on_invalid=on_invalid)
        return await asyncio.wrap_future(future)

    def score_tokens(self, input_ids: Any, images: list | None = None, attention_mask: Any = None, **kw) -> list:
        """Score conversations given as token ids (see ``rewardplug.samples.token_samples``)."""
        return self.score(token_samples(input_ids, images, attention_mask), **kw)

    def _reserve(self, n: int, timeout: float | None) -> None:
        limit = self._options.max_pending_samples
        with self._room:
            def room() -> bool:
                return self._closed or self._pending_samples == 0 or self._pending_samples + n <= limit

            if not room():
                if self._options.busy == "raise":
                    raise PoolBusyError(f"{self._pending_samples} samples pending in this handle (max_pending_samples={limit})")
                if not self._room.wait_for(room, timeout):
                    raise PoolBusyError(f"no room in this handle after {timeout}s ({self._pending_samples} samples pending)")
            if self._closed:
                raise RuntimeError("this RewardPool handle is closed")
            self._pending_samples += n
            self._counts["requests"] += 1
            self._counts["samples"] += n

    def _unreserve(self, n: int) -> None:
        with self._room:
            self._pending_samples -= n
            self._room.notify_all()

    # ---- on the event loop --------------------------------------------------------------------------

    def _start(self, pending: PendingRequest, samples: list) -> None:
        import ray

        try:
            parts = split(externalize(samples, ray.put), min(self._options.part_samples, 1 << 30), self._tokens)
        except Exception as e:  # noqa: BLE001 - a bug here fails the request, never the loop
            pending.fail(ScoringError(f"could not prepare the request: {type(e).__name__}: {e}"))
            return
        deadline = time.monotonic() + self._options.request_timeout_s
        for part in parts:
            asyncio.ensure_future(self._run_part(pending, part, deadline))

    async def _run_part(self, pending: PendingRequest, part: Part, deadline: float) -> None:
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

        from .router import SENDER, part_done

        attempts = 0
        while not pending.done:
            attempts += 1
            part_id = uuid.uuid4().hex  # the router counts this attempt on its replica until its answer is back
            response = self._handle.score_samples.remote(part.samples, busy=self._options.busy, route_key=part.route_key,
                                                         tokens=part.tokens, sender=SENDER, part=part_id)  # fmt: skip
            try:
                try:
                    scores, errors = await asyncio.wait_for(_result(response), max(0.0, deadline - time.monotonic()))
                finally:
                    part_done(part_id)
            except asyncio.TimeoutError:
                response.cancel()
                self._counts["timeouts"] += 1
                limit = self._options.request_timeout_s
                pending.fail(PoolTimeoutError(f"pool {self.name!r}: no answer within request_timeout_s={limit}"))
                return
            except (ActorDiedError, ActorUnavailableError, RayActorError) as e:
                # The replica died with this part: scores are a pure function of the samples, so re-run it.
                if attempts >= self._options.max_attempts or self._closed_for_good():
                    pending.fail(ReplicaError(f"pool {self.name!r}: replicas kept failing ({attempts} attempts): {_cause(e)}"))
                    return
                self._counts["retries"] += 1
                logger.warning("pool %r: a replica died (%s); re-sending %d samples", self.name, _cause(e), len(part.indices))
                await asyncio.sleep(min(2.0, 0.2 * attempts))
                continue
            except BusyError as e:
                pending.fail(_plain(e, PoolBusyError))
                return
            except ScoringError as e:
                pending.fail(_plain(e, ScoringError))
                return
            except Exception as e:  # noqa: BLE001 - anything else is a system failure with its cause
                error = ScoringError(f"pool {self.name!r}: scoring failed: {_cause(e)}")
                error.__cause__ = e
                pending.fail(error)
                return
            pending.resolve(part.indices, scores, errors)
            return

    def _closed_for_good(self) -> bool:
        return not _app_running(self.name)

    # ---- state --------------------------------------------------------------------------------------

    def stats(self) -> dict:
        """This handle's counters and each replica's latest report (at most ~1 s old): engine stats,
        samples held, peak held, device."""
        self._ready()
        replicas = list(_directory_call("replicas", self.name).values())
        with self._room:
            out = dict(self._counts, pending_samples=self._pending_samples, replicas=replicas)
        for key in ("samples", "batches", "real_tokens", "padded_tokens", "prefix_hits", "vision_hits", "vision_misses"):
            out[f"engine_{key}"] = sum(r["engine"].get(key, 0) for r in replicas)
        out["inflight_samples"] = sum(r.get("inflight_samples", 0) for r in replicas)
        return out

    def health(self) -> list[dict]:
        """Each live replica's state as Serve and its own last report see it."""
        from ray import serve

        self._ready()
        status = serve.status().applications.get(self.name)
        states = dict(status.deployments[DEPLOYMENT].replica_states) if status else {}
        reports = _directory_call("replicas", self.name)
        return [{"alive": r["age_s"] < 30, "serve_replica_states": states, **r} for r in reports.values()]

    def offload(self, timeout_s: float = 300.0) -> None:
        """Move every replica's weights to host memory (colocation: the trainer gets the GPU memory).
        Requests sent meanwhile wait until ``onload()``."""
        self._set_user_config({"offloaded": True}, timeout_s)

    def onload(self, timeout_s: float = 300.0) -> None:
        """Bring the weights back to the replicas' devices."""
        self._set_user_config({"offloaded": False}, timeout_s)

    def _set_user_config(self, user_config: dict, timeout_s: float) -> None:
        self._ready()
        request = self._request
        settings = ReplicaSettings(**_directory_call("get", self.name)["settings"])
        _run(_application(settings, request, self._deployed["num_replicas"], user_config, self.name), self.name, request)
        _directory_call("set_user_config", self.name, user_config)
        want = user_config["offloaded"]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            reports = _directory_call("replicas", self.name).values()
            if reports and all(r.get("offloaded") == want for r in reports) and _app_running(self.name):
                return
            time.sleep(0.2)
        raise ScoringError(f"pool {self.name!r}: replicas did not {'offload' if want else 'onload'} within {timeout_s}s")

    def close(self) -> None:
        """Detach this handle (its requests in flight still resolve); the pool keeps running."""
        self._closed = True
        if getattr(self, "_room", None) is not None:
            with self._room:
                self._room.notify_all()
        with _HANDLES_LOCK:
            if _HANDLES.get(self.name) is self:
                del _HANDLES[self.name]

    def shutdown(self) -> None:
        """Remove the pool's replicas from the cluster, whoever made them. Requests in flight fail."""
        from ray import serve

        if getattr(self, "_shut", False):
            return
        self._shut = True
        self.close()
        try:
            import ray

            if ray.is_initialized():
                serve.delete(self.name)
                _directory_call("remove", self.name)
        except Exception:  # noqa: BLE001 - the cluster may already be gone at process exit
            logger.debug("pool shutdown", exc_info=True)

    def __enter__(self) -> "RewardPool":
        return self

    def __exit__(self, *exc) -> None:
        if self.owner:
            self.shutdown()
        else:
            self.close()


# ---- helpers ----------------------------------------------------------------------------------------

_HANDLES: dict[str, RewardPool] = {}  # this process's handles, by pool name (unpickling reuses them)
_HANDLES_LOCK = threading.Lock()
_LOOP: asyncio.AbstractEventLoop | None = None
_LOOP_LOCK = threading.Lock()


def _loop() -> asyncio.AbstractEventLoop:
    """One event loop thread per process drives the requests of every pool handle."""
    global _LOOP
    with _LOOP_LOCK:
        if _LOOP is None or _LOOP.is_closed():
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="rewardplug-pool", daemon=True).start()
            _LOOP = loop
        return _LOOP


async def _result(response):
    return await response


def _reattach(name: str, address: str, options: dict) -> RewardPool:
    """Unpickle a handle: this process's live one, or one that attaches on first use (never while
    unpickling: Ray deserializes task arguments where blocking on other calls can deadlock)."""
    with _HANDLES_LOCK:
        pool = _HANDLES.get(name)
        if pool is not None and not pool._closed:
            return pool
        pool = RewardPool.__new__(RewardPool)
        pool.name, pool.owner, pool._closed = name, False, False
        pool._options = HandleOptions(**options)
        pool._lazy = address
        pool._attach_lock = threading.Lock()
        _HANDLES[name] = pool
        return pool


def _connect(address: str | None) -> None:
    import ray

    if not ray.is_initialized():
        ray.init(address=address, namespace="rewardplug", log_to_driver=False)
    _forget_serve_of_other_clusters()


_SERVE_CLUSTER: str | None = None


def _forget_serve_of_other_clusters() -> None:
    """Serve caches its controller's handle per process and tells sessions apart by job id, which a new
    cluster started in the same process can repeat: drop the cache when the cluster changed."""
    import ray
    from ray.serve import context

    global _SERVE_CLUSTER
    address = ray.get_runtime_context().gcs_address
    if _SERVE_CLUSTER is not None and _SERVE_CLUSTER != address and hasattr(context, "_set_global_client"):
        context._set_global_client(None)
    _SERVE_CLUSTER = address


def _directory_call(method: str, *args):
    import ray

    from .directory import directory

    return ray.get(getattr(directory(), method).remote(*args), timeout=60)


def pool_names() -> list[str]:
    """Named pools running on the connected cluster."""
    return [n for n in _directory_call("names") if _app_running(n)]


def _app_running(name: str) -> bool:
    from ray import serve

    status = serve.status().applications.get(name)
    return status is not None and status.status in ("RUNNING", "DEPLOYING", "UNHEALTHY")


def _wait_ready(name: str, deadline: float) -> None:
    while True:
        entry = _directory_call("get", name)
        if entry is None:
            raise PoolNotFoundError(f"pool {name!r} was removed while this process waited for it")
        if entry["state"] == "ready":
            return
        if entry["state"] == "failed":
            raise ReplicaError(f"pool {name!r} failed to start in the process that created it: {entry['error']}")
        if time.monotonic() > deadline:
            raise ReplicaError(f"pool {name!r} was not ready within the timeout (another process is deploying it)")
        time.sleep(0.2)


def _comparable(settings: dict) -> dict:
    """Settings as they are compared between processes (the API key only as present or not)."""
    http = dict(settings.get("http", {}))
    if http.get("api_key"):
        http["api_key"] = "<set>"
    return {**settings, "http": http}


def _check_same(name: str, existing: dict, asked: dict) -> None:
    diffs = []

    def walk(a, b, path):
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                walk(a.get(k), b.get(k), f"{path}.{k}" if path else k)
        elif a != b and not (path == "num_replicas" and b is None):
            diffs.append(f"{path}: running {a!r}, asked {b!r}")

    walk(existing, asked, "")
    if diffs:
        raise PoolConfigError(f"pool {name!r} already runs with other options: " + "; ".join(diffs)
                              + " (use another name, or RewardPool.connect(name) to use it as it is)")  # fmt: skip


def _default_replicas(gpus_per_replica: float) -> int:
    import ray

    if gpus_per_replica <= 0:
        return 1
    free = ray.available_resources().get("GPU", 0)
    return max(1, int(free // gpus_per_replica))


def _check_resources(replicas: int, gpus_per_replica: float, cpus_per_replica: float) -> None:
    """Fail at once when the cluster cannot ever place the replicas, instead of waiting."""
    import ray

    total, free = ray.cluster_resources(), ray.available_resources()
    need_gpus = replicas * gpus_per_replica
    if gpus_per_replica > 0 and total.get("GPU", 0) == 0:
        raise ReplicaError(
            f"the pool asks for {gpus_per_replica} GPU per replica but the Ray cluster has no GPUs "
            f"(it has {_resources(total)}); pass gpus_per_replica=0 to run on CPUs, or start Ray on GPU nodes"
        )
    if gpus_per_replica > 0 and need_gpus > free.get("GPU", 0) + 1e-9:
        raise ReplicaError(
            f"the pool needs {need_gpus:g} GPUs ({replicas} replicas x {gpus_per_replica:g}) but the cluster has "
            f"{free.get('GPU', 0):g} free of {total.get('GPU', 0):g}; lower num_replicas or gpus_per_replica"
        )
    if replicas * cpus_per_replica > total.get("CPU", 0) + 1e-9:
        raise ReplicaError(f"the pool needs {replicas * cpus_per_replica:g} CPUs but the cluster has {total.get('CPU', 0):g}")


def _resources(resources: dict) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in sorted(resources.items()) if k in ("CPU", "GPU", "memory") or k.startswith("accelerator"))


def _start_serve(deploy: dict) -> None:
    """Start Serve on the cluster (its HTTP proxy where the pool has an HTTP door). Processes that make
    different pools at once race to start Serve's controller; the loser finds it running."""
    from ray import serve

    http = {"http_options": {"host": deploy["http_host"], "port": deploy["http_port"]}} if deploy["http_port"] else {}
    for attempt in range(5):
        try:
            serve.start(**http)
            return
        except Exception as e:  # noqa: BLE001 - ActorAlreadyExistsError and friends from the race
            if "already" not in str(e).lower() or attempt == 4:
                raise
            time.sleep(0.5 * (attempt + 1))


def _application(settings: ReplicaSettings, deploy: dict, replicas: int, user_config: dict, name: str):
    """The pool's Serve application: the replica deployment with its placement, router and limits."""
    from ray import serve

    from .replica import RewardReplica
    from .router import PromptGroupRouter

    options: dict[str, Any] = dict(
        name=DEPLOYMENT,
        ray_actor_options={"num_cpus": deploy["cpus_per_replica"], "num_gpus": deploy["gpus_per_replica"],
                           **({"runtime_env": deploy["runtime_env"]} if deploy.get("runtime_env") else {})},
        max_ongoing_requests=deploy["max_ongoing_requests"],
        health_check_period_s=10.0,
        health_check_timeout_s=60.0,
        max_constructor_retry_count=1,
        request_router_config={"request_router_class": PromptGroupRouter, "request_routing_stats_period_s": 1.0,
                               "request_routing_stats_timeout_s": 10.0},
        user_config=user_config,
    )  # fmt: skip
    if deploy["autoscale"]:
        low, high = deploy["autoscale"]
        # Each ongoing request is one part (a prompt group, or up to part_samples samples): scaling on
        # ongoing requests is scaling on queued samples. RL load comes in bursts: scale up fast, down slowly.
        options["autoscaling_config"] = {"min_replicas": low, "max_replicas": high, "initial_replicas": max(low, 1),
                                         "target_ongoing_requests": 2, "upscale_delay_s": 5, "downscale_delay_s": 60}  # fmt: skip
    else:
        options["num_replicas"] = replicas
    if deploy["placement"] == "spread":
        options["max_replicas_per_node"] = 1
    # A version fixed by everything but user_config: Serve then applies a new user_config to the running
    # replicas (reconfigure) instead of replacing them (it picks a random version otherwise).
    # (Serve's public API no longer takes a version; its deploy path still reads this attribute.)
    fixed = {k: v for k, v in options.items() if k not in ("user_config", "request_router_config")}
    version = hashlib.blake2b(repr((asdict(settings), sorted(fixed.items()), name)).encode(), digest_size=8).hexdigest()
    deployment = serve.deployment(RewardReplica).options(**options)
    deployment._version = version
    return deployment.bind(asdict(settings), name)


def _run(app, name: str, deploy: dict) -> None:
    from ray import serve

    route = "/" if deploy["http_port"] is not None else None
    serve.run_many([serve.RunTarget(app, name=name, route_prefix=route)],
                   wait_for_ingress_deployment_creation=False, wait_for_applications_running=False)  # fmt: skip


def _first_error(status) -> str:
    for deployment in status.deployments.values():
        if deployment.message:
            return _cause_text(deployment.message)
    return _cause_text(status.message or "unknown reason")


def _plain(error: BaseException, kind: type) -> BaseException:
    """A replica's error as the user sees it: its own type and message, not Ray's wrapper."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, kind):
        return cause
    plain = kind(_cause(error))
    plain.__cause__ = error
    return plain


def split_options(options: dict) -> tuple[dict, dict]:
    from ..engine import RewardEngine
    from ..model import RewardModel

    model_keys = set(inspect.signature(RewardModel.from_pretrained).parameters) - {"name_or_path", "cls"}
    engine_keys = set(inspect.signature(RewardEngine.__init__).parameters) - {"self", "model", "on_invalid"}
    unknown = set(options) - model_keys - engine_keys
    if unknown:
        raise TypeError(f"unknown RewardPool options {sorted(unknown)}; "
                        f"model options: {sorted(model_keys)}; engine options: {sorted(engine_keys)}")  # fmt: skip
    return ({k: v for k, v in options.items() if k in model_keys}, {k: v for k, v in options.items() if k in engine_keys})


def _cause(error: BaseException) -> str:
    """The replica-side reason inside a Ray error, in one line ("CheckpointError: ...")."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, BaseException) and cause is not error:
        return f"{type(cause).__name__}: {cause}".splitlines()[0]
    return _cause_text(f"{type(error).__name__}: {error}")


def _cause_text(text: str) -> str:
    lines = re.findall(r"^\s*(?:[\w]+\.)*(\w+(?:Error|Exception): .+)$", text, flags=re.M)
    return lines[-1].strip() if lines else text.splitlines()[0] if text else text
