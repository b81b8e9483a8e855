"""RewardPool: the Python door to a pool of reward-model replicas on Ray Serve.

The replicas are a Serve application (``rewardplug.serving.replica.RewardReplica``); this handle
finds or creates it by name, cuts each request into parts by prompt group (images once through the
object store), sends each part through Serve with its content key (routed by ``ContentKeyRouter``),
and resolves each request's future exactly once, by its deadline.

>>> from rewardplug import RewardPool
>>> pool = RewardPool("Skywork/Skywork-VL-Reward-7B", name="rm", gpus_per_replica=1)  # doctest: +SKIP
>>> pool.score([{"prompt": "What is it?", "completion": "A cat.", "images": [image]}])  # doctest: +SKIP
[1.23]

With a name, the pool is shared: every process on the cluster that asks for the same name and options
(each rank of a training job) attaches to the same replicas, and it lives until ``pool.shutdown()`` or
``rewardplug pool stop NAME``; ``close()`` only detaches a handle. Without a name the pool is private
and removed with the handle that made it. A pool is its Serve application (named as the pool): its
options are what its replicas were built from (each answers ``identity``), so they live as long as the
application, on whichever nodes Serve keeps it.

A request never waits past its deadline (``request_timeout_s``, per pool or per call). A part that has
no answer after ``hedge_after_s`` is sent again (the router passes over a replica that holds requests
and completes none: a hung device or host), and the first answer counts. A part whose replica died is
sent again. When one part fails, the request fails and its other parts are cancelled.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import logging
import re
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import asdict, fields
from typing import Any, Sequence

from ..engine.pending import PendingRequest, check_on_invalid
from ..errors import (BusyError, PoolBusyError, PoolConfigError, PoolNotFoundError, PoolTimeoutError, ReplicaError,
                      ScoringError)  # fmt: skip
from ..samples import token_samples
from .config import HANDLE_FIELDS, PoolConfig
from .replica import CONTROL_SLOTS, DEPLOYMENT
from .router import TO_REPLICA
from .transport import Part, answer, call, externalize, split

logger = logging.getLogger(__name__)


class PoolPlacementError(ReplicaError):
    """The cluster can never place the pool's replicas (the CLI exits with code 6)."""

    def __init__(self, message: str, python_hint: str, cli_hint: str):
        super().__init__(f"{message}; {python_hint}")
        self.message, self.cli_hint = message, cli_hint


class RewardPool:
    """Replicas of a reward model on a Ray cluster (Ray Serve), with the engine's calls. Options: a
    ``PoolConfig`` (``config=``) or its fields as keywords (see ``rewardplug.serving.config``).
    Failures: a bad sample -> InvalidSampleError (or None with ``on_invalid="none"``); a system failure
    -> ScoringError (ReplicaError, PoolTimeoutError), never None.
    """

    def __init__(self, model: Any = None, *, config: PoolConfig | None = None, **kwargs: Any):
        if config is None:
            if model is None:
                raise TypeError("RewardPool needs a model (or config=PoolConfig(...))")
            config = PoolConfig.from_kwargs(model, **kwargs)
        elif model is not None or kwargs:
            raise TypeError("give config= or the pool's options as keywords, not both")
        _connect(config.address)
        self.owner = config.name is None
        self.name = config.name or f"rewardplug-{uuid.uuid4().hex[:8]}"
        self.config = config.with_(name=self.name)
        self._init_handle()
        self._open()
        if self.owner:
            atexit.register(self.shutdown)

    def _init_handle(self) -> None:
        self._attach_lock = threading.Lock()
        self._attached = False
        self._closed = False
        self._requests: set[PendingRequest] = set()  # unresolved, touched on the event loop only

    # ---- finding or making the pool -----------------------------------------------------------------

    @classmethod
    def connect(cls, name: str, *, address: str | None = None, **handle_options: Any) -> "RewardPool":
        """Attach to a running named pool (PoolNotFoundError if there is none). ``handle_options``:
        this handle's busy, request_timeout_s, hedge_after_s, part_samples, max_pending_samples."""
        _connect(address)
        if not _app_running(name):
            running = pool_names()
            raise PoolNotFoundError(f"no pool named {name!r} runs on this Ray cluster (running pools: {running or 'none'})")
        pool = _unattached(name, address, handle_options)
        pool._ready()
        names = {f.name for f in fields(PoolConfig)}
        pool.config = PoolConfig(**{k: v for k, v in pool._identity.items() if k in names}, name=name, address=address,
                                 **handle_options)  # fmt: skip
        return pool

    def _open(self) -> None:
        """Get or create. The application runs (or is being deployed): attach. Else one process deploys it,
        the one that holds the name's claim (an actor name, which Ray gives once), while the others wait
        for the application. Then the running replicas' identity must be the one asked for."""
        import ray

        deadline = time.monotonic() + self.config.ready_timeout_s
        while _app_status(self.name) is None:
            claim = _claim(self.name)
            if claim is None:  # another process deploys it
                if time.monotonic() > deadline:
                    raise ReplicaError(f"pool {self.name!r} was not ready within ready_timeout_s (another process deploys it)")
                time.sleep(0.2)
                continue
            try:
                if _app_status(self.name) is None:
                    self._deploy(deadline)
            finally:
                ray.kill(claim)
        _wait_running(self.name, deadline)
        self._attach()
        _check_same(self.name, self._identity, self.config.identity())

    def _deploy(self, deadline: float) -> None:
        from ray import serve

        c = self.config
        replicas = c.num_replicas or _default_replicas(c.gpus_per_replica)
        _check_resources(replicas if not c.autoscale else c.autoscale[0] or 1, c.gpus_per_replica, c.cpus_per_replica)
        _start_serve(c)
        if c.http_port is not None:
            _check_proxy(self.name, c.http_host, c.http_port)
        logger.info("deploying pool %r: %s replicas of %s", self.name, c.autoscale or replicas, c.model)
        serve.run_many([serve.RunTarget(_application(c, replicas), name=self.name,
                                        route_prefix="/" if c.http_port is not None else None)],
                       wait_for_ingress_deployment_creation=False, wait_for_applications_running=False)  # fmt: skip
        try:
            _wait_running(self.name, deadline)
        except BaseException:
            serve.delete(self.name)  # a pool that failed to start is not left behind
            raise

    def _attach(self) -> None:
        """Per-process state of a handle: Serve's handle, the event loop that drives requests. Marked
        attached last, so a thread that sees it attached sees all of it."""
        from ray import serve
        from ray.serve.handle import DeploymentHandle

        self._handle = serve.get_deployment_handle(DEPLOYMENT, app_name=self.name)
        # Control calls through a handle of their own: its own router, so they never wait in this
        # process's queue of parts (Serve routes a handle's requests with at most 2 tasks per replica).
        # Made per use and shut down after it: Serve's shutdown knows only its cached handles, and a
        # router left behind keeps calling Ray (its metrics task starts a new local cluster once Ray is down).
        control = DeploymentHandle(DEPLOYMENT, self.name)
        try:
            about = control.options(session_id=TO_REPLICA).identity.remote().result(timeout_s=120)
        finally:
            control.shutdown()
        self._identity, self._im_start = about["config"], about["im_start"]
        self._seen: dict[str, dict] = {}  # each live replica's last answer (its pid when it answers no more)
        self._loop = _loop()
        self._pending_samples = 0
        self._room = threading.Condition()  # guards _pending_samples and _counts
        self._counts = {"requests": 0, "samples": 0, "retries": 0, "hedges": 0, "timeouts": 0}
        with _HANDLES_LOCK:
            if self.name not in _HANDLES or _HANDLES[self.name]._closed:
                _HANDLES[self.name] = self
        self._attached = True

    # ---- handles that travel ------------------------------------------------------------------------

    def _ready(self) -> None:
        """Attach a handle that was unpickled (connecting to its cluster first), on its first use; once,
        whichever threads use it first."""
        if self._attached:
            return
        with self._attach_lock:
            if not self._attached:
                _connect(self.config.address)
                self._attach()

    def __reduce__(self):
        import ray

        address = self.config.address if not self._attached else ray.get_runtime_context().gcs_address
        return (_reattach, (self.name, address, {k: getattr(self.config, k) for k in HANDLE_FIELDS[:5]}))

    # ---- scoring ------------------------------------------------------------------------------------

    @property
    def num_replicas(self) -> int:
        from ray import serve

        self._ready()
        status = serve.status().applications.get(self.name)
        if status is None:
            return 0
        return status.deployments[DEPLOYMENT].replica_states.get("RUNNING", 0)

    def submit(self, samples: Sequence[Any], *, on_invalid: str = "raise", timeout: float | None = None,
               request_timeout_s: float | None = None) -> Future:  # fmt: skip
        """Queue samples; returns at once a Future of their scores, in input order, resolved by
        ``request_timeout_s`` (this pool's by default) at the latest.

        This handle keeps at most ``max_pending_samples`` samples unresolved: beyond that ``submit``
        waits up to ``timeout`` (busy="wait") or raises PoolBusyError (busy="raise").
        """
        check_on_invalid(on_invalid)
        if isinstance(samples, dict):
            raise TypeError("submit() takes a list of samples; wrap a single sample in a list")
        if self._closed:
            raise RuntimeError("this RewardPool handle is closed")
        limit = self._limit(request_timeout_s)
        self._ready()
        samples = list(samples)
        n = len(samples)
        self._reserve(n, timeout)
        pending = PendingRequest(n, on_invalid, on_done=lambda p: self._unreserve(p.size))
        if n:
            # Each part is sent from a context of its own (transport.answer): inside a Serve request they
            # would otherwise share its request id, and Serve's router fulfils one pending request per id.
            self._loop.call_soon_threadsafe(self._start, pending, samples, limit)
        return pending.future

    def score(self, samples: Sequence[Any], *, on_invalid: str = "raise", request_timeout_s: float | None = None) -> list:
        limit = self._limit(request_timeout_s)
        future = self.submit(samples, on_invalid=on_invalid, request_timeout_s=limit)
        try:
            return future.result(timeout=limit + 30)  # the loop fails it at the deadline; this is the backstop
        except concurrent.futures.TimeoutError:
            if future.done():  # PoolTimeoutError is a TimeoutError too: the loop's own, naming the replicas
                raise
            raise PoolTimeoutError(f"pool {self.name!r}: no answer within request_timeout_s={limit}") from None

    async def ascore(self, samples: Sequence[Any], *, on_invalid: str = "raise", request_timeout_s: float | None = None) -> list:
        """Like ``score``; never blocks the running event loop (waiting for room happens in a thread)."""
        future = await asyncio.to_thread(self.submit, samples, on_invalid=on_invalid, request_timeout_s=request_timeout_s)
        return await asyncio.wrap_future(future)

    def score_tokens(self, input_ids: Any, images: list | None = None, attention_mask: Any = None, **kw) -> list:
        """Score conversations given as token ids (see ``rewardplug.samples.token_samples``)."""
        return self.score(token_samples(input_ids, images, attention_mask), **kw)

    def _limit(self, request_timeout_s: float | None) -> float:
        limit = self.config.request_timeout_s if request_timeout_s is None else request_timeout_s
        if not (0 < limit < float("inf")):
            raise ValueError(f"request_timeout_s must be a positive finite number of seconds, got {limit!r}")
        return limit

    def _reserve(self, n: int, timeout: float | None) -> None:
        limit = self.config.max_pending_samples
        with self._room:
            def room() -> bool:
                return self._closed or self._pending_samples == 0 or self._pending_samples + n <= limit

            if not room():
                if self.config.busy == "raise":
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

    def _count(self, key: str) -> None:
        with self._room:
            self._counts[key] += 1

    # ---- on the event loop --------------------------------------------------------------------------

    def _start(self, pending: PendingRequest, samples: list, limit: float) -> None:
        import ray

        try:
            parts = split(externalize(samples, ray.put), max(1, self.config.part_samples), self._im_start)
            tasks = [asyncio.ensure_future(self._run_part(pending, part)) for part in parts]
        except Exception as e:  # noqa: BLE001 - a bug here fails the request, never the loop
            pending.fail(ScoringError(f"pool {self.name!r}: could not send the request: {type(e).__name__}: {e}"))
            return
        deadline = self._loop.call_later(limit, lambda: asyncio.ensure_future(self._expire(pending, limit)))
        self._requests.add(pending)

        def finished(_):  # resolved, failed or expired: cancel what still runs (releases the replicas' slots)
            self._requests.discard(pending)
            deadline.cancel()
            for task in tasks:
                task.cancel()

        pending.future.add_done_callback(lambda f: self._loop.call_soon_threadsafe(finished, f))

    async def _expire(self, pending: PendingRequest, limit: float) -> None:
        if pending.done:
            return
        try:
            replicas = ", ".join(f"{r['replica']} (pid {r.get('pid', '?')}, {'answers' if r['alive'] else r['error']})"
                                 for r in await self._ask("info", 5.0)) or "none running"  # fmt: skip
        except Exception as e:  # noqa: BLE001 - the error below is what matters
            replicas = f"unknown ({type(e).__name__}: {e})"
        self._count("timeouts")
        pending.fail(PoolTimeoutError(f"pool {self.name!r}: no answer within request_timeout_s={limit} "
                                      f"(replicas: {replicas})"))  # fmt: skip

    async def _run_part(self, pending: PendingRequest, part: Part) -> None:
        """The part's first answer resolves its samples (``transport.answer``: hedged, re-sent when its
        replica died); its failure fails the request."""
        attempts = [1]

        def event(kind: str, error: BaseException | None) -> None:
            self._count("hedges" if kind == "hedge" else "retries")
            if kind == "hedge":
                logger.warning("pool %r: a part waited %.0fs; sending it again", self.name, self.config.hedge_after_s)
            else:
                attempts[0] += 1
                logger.warning("pool %r: a replica died (%s); re-sending %d samples", self.name, _cause(error),
                               len(part.indices))  # fmt: skip

        try:
            got = await answer(self._handle, part, self.config.hedge_after_s,
                               resend_dead=lambda: _app_running(self.name), on_event=event)  # fmt: skip
        except Exception as e:  # noqa: BLE001 - every failure of a part fails its request, with its cause
            pending.fail(self._error(e, attempts[0]))
        else:
            pending.resolve(part.indices, *got)

    def _error(self, error: BaseException, attempts: int) -> ScoringError:
        """A part's failure as the user sees it: the replica's own error, not Ray's wrapper."""
        from ray.exceptions import RayActorError

        cause = getattr(error, "cause", None)
        if isinstance(error, ScoringError) and isinstance(cause, ScoringError):
            return cause
        if isinstance(error, BusyError | ScoringError):
            plain = (PoolBusyError if isinstance(error, BusyError) else ScoringError)(_cause(error))
        elif isinstance(error, RayActorError):
            plain = ReplicaError(f"pool {self.name!r}: replicas kept failing ({attempts} attempts): {_cause(error)}")
        else:
            plain = ScoringError(f"pool {self.name!r}: scoring failed: {_cause(error)}")
        plain.__cause__ = error
        return plain

    # ---- state --------------------------------------------------------------------------------------

    def stats(self, *, fresh: bool = True, timeout_s: float = 10.0) -> dict:
        """This handle's counters and each running replica's figures, asked of it now (a control call:
        never queued behind a full replica): engine counters, samples held, peak held, device, samples
        of the last minute. ``fresh`` is kept for older callers: the figures are always current."""
        replicas = [r for r in self._on_loop(self._ask("info", timeout_s)) if r["alive"]]
        with self._room:
            out = dict(self._counts, pending_samples=self._pending_samples, replicas=replicas)
        for key in ("samples", "batches", "real_tokens", "padded_tokens", "prefix_hits", "vision_hits", "vision_misses"):
            out[f"engine_{key}"] = sum(r["engine"].get(key, 0) for r in replicas)
        out["inflight_samples"] = sum(r.get("inflight_samples", 0) for r in replicas)
        return out

    def health(self, timeout_s: float = 10.0) -> list[dict]:
        """Every replica's figures, or why it gave none (``alive`` False: stopped, starting, gone)."""
        return self._on_loop(self._ask("info", timeout_s))

    def offload(self, timeout_s: float = 300.0) -> list[dict]:
        """Move every replica's weights to host memory (colocation: the trainer gets the GPU memory).
        Requests sent meanwhile wait until ``onload()``. Returns each replica's answer (RSS before/after)."""
        return self._broadcast("sleep", timeout_s)

    def onload(self, timeout_s: float = 300.0) -> list[dict]:
        """Bring the weights back to the replicas' devices. Returns each replica's answer (onload_s)."""
        return self._broadcast("wake", timeout_s)

    def _broadcast(self, method: str, timeout_s: float) -> list[dict]:
        answers = self._on_loop(self._ask(method, timeout_s, every=True))
        failed = [f"{r['replica']}: {r['error']}" for r in answers if not r["alive"]]
        if failed or not answers:
            raise ScoringError(f"pool {self.name!r}: replicas did not {method}: {'; '.join(failed) or 'none running'}")
        return answers

    def _on_loop(self, coroutine):
        self._ready()
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    async def _ask(self, method: str, timeout_s: float, every: bool = False) -> list[dict]:
        """``method`` called once on each replica of the application (found among Ray's named actors;
        the router sends a ``replica:<id>`` session to that replica only), each answer with ``alive``
        True, or the replica with ``alive`` False and its error (no answer within ``timeout_s``). Unless
        ``every``, stops waiting once as many replicas answered as Serve counts running (the others are
        starting: they answer once loaded)."""
        from ray.serve.handle import DeploymentHandle

        ids, running = await asyncio.to_thread(_replica_ids, self.name)
        control = DeploymentHandle(DEPLOYMENT, self.name)  # see _attach
        try:
            return await self._ask_each(control, ids, running, method, timeout_s, every)
        finally:
            await control.shutdown_async()

    async def _ask_each(self, control, ids: list[str], running: int, method: str, timeout_s: float,
                        every: bool) -> list[dict]:  # fmt: skip
        calls = {asyncio.ensure_future(call(control, TO_REPLICA + i, method)): i for i in ids}
        enough = len(ids) if every else min(running, len(ids))
        answers: dict[str, dict] = {}
        waiting, deadline = set(calls), self._loop.time() + timeout_s
        while waiting and len(answers) < enough and self._loop.time() < deadline:
            done, waiting = await asyncio.wait(waiting, timeout=deadline - self._loop.time(), return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                error = task.exception()
                answers[calls[task]] = {"alive": False, "error": _cause(error)} if error else {**task.result(), "alive": True}
        for task in waiting:
            task.cancel()
        now, out = time.time(), []
        for i in ids:
            got = answers.get(i, {"alive": False, "error": f"no answer within {timeout_s:g}s"})
            if got["alive"]:
                self._seen[i] = {k: got[k] for k in ("pid", "node") if k in got}
                got["age_s"] = max(0.0, now - got.get("reported_at", now))
            out.append({"replica": i, **self._seen.get(i, {}), **got})
        self._seen = {i: self._seen[i] for i in ids if i in self._seen}
        return out

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

            if self._attached:  # this handle's requests fail now, not at their deadline
                error = ScoringError(f"pool {self.name!r} was shut down with this request in flight")
                self._loop.call_soon_threadsafe(lambda: [p.fail(error) for p in list(self._requests)])
            if ray.is_initialized():
                serve.delete(self.name)
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


def _unattached(name: str, address: str | None, options: dict) -> RewardPool:
    """A handle to a running pool that attaches on first use."""
    pool = RewardPool.__new__(RewardPool)
    pool.name, pool.owner = name, False
    pool.config = PoolConfig(model="", name=name, address=address, **options)
    pool._init_handle()
    return pool


def _reattach(name: str, address: str, options: dict) -> RewardPool:
    """Unpickle a handle: this process's live one, or one that attaches on first use (never while
    unpickling: Ray deserializes task arguments where blocking on other calls can deadlock)."""
    with _HANDLES_LOCK:
        pool = _HANDLES.get(name)
        if pool is None or pool._closed:
            pool = _HANDLES[name] = _unattached(name, address, options)
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


def pool_names() -> list[str]:
    """Named pools running on the connected cluster: Serve applications of the replica deployment."""
    from ray import serve

    return sorted(n for n, app in serve.status().applications.items() if DEPLOYMENT in app.deployments and _app_running(n))


def _app_status(name: str) -> str | None:
    """The Serve application's status; None when there is none (or it is being deleted)."""
    from ray import serve

    app = serve.status().applications.get(name)
    return None if app is None or app.status == "DELETING" else app.status


def _app_running(name: str) -> bool:
    return _app_status(name) in ("RUNNING", "DEPLOYING", "UNHEALTHY")


def _wait_running(name: str, deadline: float) -> None:
    import ray
    from ray import serve

    while (status := _app_status(name)) not in ("RUNNING", "UNHEALTHY"):
        if status is None:
            raise PoolNotFoundError(f"pool {name!r} was removed while this process waited for it")
        if status == "DEPLOY_FAILED":
            raise ReplicaError(f"pool {name!r}: replicas failed to start: {_first_error(serve.status().applications[name])}")
        if time.monotonic() > deadline:
            raise ReplicaError(f"pool {name!r} was not ready within ready_timeout_s; cluster: {ray.cluster_resources()}")
        time.sleep(0.2)


def _claim(name: str):
    """The right to deploy pool ``name``: a named actor (Ray refuses a second one of that name), or None
    when another process holds it. It holds no state; killing it, or its owner's death, frees the name."""
    import ray

    try:
        return ray.remote(num_cpus=0)(_Claim).options(name=f"rewardplug-deploying:{name}", namespace="rewardplug").remote()
    except ValueError:
        return None


class _Claim:
    pass


def _replica_ids(name: str) -> tuple[list[str], int]:
    """The ids of the pool's replica actors (Serve names them ``SERVE_REPLICA::app#deployment#id``; Ray
    lists named actors without the dashboard), and how many of them Serve counts running."""
    import ray
    from ray import serve
    from ray.serve.request_router import ReplicaID

    ids = []
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if ReplicaID.is_full_id_str(actor["name"]):
            replica = ReplicaID.from_full_id_str(actor["name"])
            if (replica.deployment_id.app_name, replica.deployment_id.name) == (name, DEPLOYMENT):
                ids.append(replica.unique_id)
    app = serve.status().applications.get(name)
    running = app.deployments[DEPLOYMENT].replica_states.get("RUNNING", 0) if app and DEPLOYMENT in app.deployments else 0
    return sorted(ids), running


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
        raise PoolPlacementError(
            f"the pool asks for {gpus_per_replica:g} GPU per replica but the Ray cluster has no GPUs "
            f"(it has {_resources(total)})",
            "pass gpus_per_replica=0 to run on CPUs, or start Ray on GPU nodes",
            "pass --gpus-per-replica 0 to run on CPUs, or start Ray on GPU nodes",
        )
    if gpus_per_replica > 0 and need_gpus > free.get("GPU", 0) + 1e-9:
        raise PoolPlacementError(
            f"the pool needs {need_gpus:g} GPUs ({replicas} replicas x {gpus_per_replica:g}) but the cluster has "
            f"{free.get('GPU', 0):g} free of {total.get('GPU', 0):g}",
            "lower num_replicas or gpus_per_replica", "lower --replicas or --gpus-per-replica",
        )
    if replicas * cpus_per_replica > total.get("CPU", 0) + 1e-9:
        raise PoolPlacementError(f"the pool needs {replicas * cpus_per_replica:g} CPUs but the cluster has "
                                 f"{total.get('CPU', 0):g}", "lower num_replicas or cpus_per_replica",
                                 "lower --replicas or --cpus-per-replica")  # fmt: skip


def _resources(resources: dict) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in sorted(resources.items()) if k in ("CPU", "GPU", "memory") or k.startswith("accelerator"))


def _start_serve(config: PoolConfig) -> None:
    """Start Serve on the cluster: with its HTTP proxy only where the pool has an HTTP door (a pool used
    from Python alone leaves every port alone). Processes that make pools at once race to start Serve's
    controller; the loser finds it running (and its proxy as the first one started it)."""
    from ray import serve

    if config.http_port is None:
        options: dict = {"proxy_location": "Disabled"}
    else:
        options = {"proxy_location": "HeadOnly", "http_options": {"host": config.http_host, "port": config.http_port}}
    for attempt in range(5):
        try:
            serve.start(**options)
            return
        except Exception as e:  # noqa: BLE001 - ActorAlreadyExistsError and friends from the race
            if "already" not in str(e).lower() or attempt == 4:
                raise
            time.sleep(0.5 * (attempt + 1))


def proxy_address(wait_s: float = 10.0) -> tuple[str, int] | None:
    """Where Serve's HTTP proxy on the connected cluster listens; None when Serve runs without one."""
    from ray import serve
    from ray.serve.context import _get_global_client  # Serve keeps its HTTP options only there

    deadline = time.monotonic() + wait_s
    while not serve.status().proxies:
        if time.monotonic() > deadline:
            return None
        time.sleep(0.2)
    http = _get_global_client().http_config
    return http.host, http.port


def _check_proxy(name: str, host: str, port: int) -> None:
    """Refuse an HTTP door that would not be where it was asked (Serve's proxy was started earlier,
    by another pool or job, with its own address or none)."""
    real = proxy_address()
    if real != (host, port):
        where = f"on http://{real[0]}:{real[1]}" if real else "without an HTTP proxy"
        raise PoolConfigError(f"pool {name!r}: asked for the HTTP door on {host}:{port}, but Serve already runs "
                              f"on this Ray cluster {where}, and its proxy cannot move; use that address, or a "
                              f"Ray cluster of its own (no --address, no RAY_ADDRESS)")  # fmt: skip


def _application(config: PoolConfig, replicas: int):
    """The pool's Serve application: the replica deployment with its placement, router and limits, and
    the HTTP door in front where the pool has a port."""
    from ray import serve

    from .replica import RewardReplica
    from .router import ContentKeyRouter

    options: dict[str, Any] = dict(
        name=DEPLOYMENT,
        ray_actor_options={"num_cpus": config.cpus_per_replica, "num_gpus": config.gpus_per_replica,
                           **({"runtime_env": config.runtime_env} if config.runtime_env else {})},
        max_ongoing_requests=config.max_ongoing_requests + CONTROL_SLOTS,  # the router keeps parts to the bound
        health_check_period_s=10.0,
        health_check_timeout_s=60.0,
        max_constructor_retry_count=1,
        request_router_config={"request_router_class": ContentKeyRouter, "request_router_kwargs": {
            "stall_s": 0.9 * config.hedge_after_s, "max_parts": config.max_ongoing_requests}},
    )  # fmt: skip
    if config.autoscale:
        low, high = config.autoscale
        # Each ongoing request is one part (a prompt group, or up to part_samples samples): scaling on
        # ongoing requests is scaling on queued samples. RL load comes in bursts: scale up fast, down slowly.
        options["autoscaling_config"] = {"min_replicas": low, "max_replicas": high, "initial_replicas": max(low, 1),
                                         "target_ongoing_requests": 2, "upscale_delay_s": 5, "downscale_delay_s": 60}  # fmt: skip
    else:
        options["num_replicas"] = replicas
    if config.placement == "spread":
        options["max_replicas_per_node"] = 1
    replicas = serve.deployment(RewardReplica).options(**options).bind(asdict(config))
    if config.http_port is None:
        return replicas
    from .http import door_application  # the HTTP door: an ingress deployment of its own in front

    return door_application(replicas, asdict(config.http), config.part_samples, config.request_timeout_s,
                            config.hedge_after_s)


def _first_error(status) -> str:
    for deployment in status.deployments.values():
        if deployment.message:
            return _cause_text(deployment.message)
    return _cause_text(status.message or "unknown reason")


def _cause(error: BaseException) -> str:
    """The replica-side reason inside a Ray error, in one line ("CheckpointError: ...")."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, BaseException) and cause is not error:
        return f"{type(cause).__name__}: {cause}".splitlines()[0]
    return _cause_text(f"{type(error).__name__}: {error}")


def _cause_text(text: str) -> str:
    lines = re.findall(r"^\s*(?:[\w]+\.)*(\w+(?:Error|Exception): .+)$", text, flags=re.M)
    return lines[-1].strip() if lines else text.splitlines()[0] if text else text
