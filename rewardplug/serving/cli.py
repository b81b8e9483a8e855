"""``rewardplug pool start|status|stop`` and ``rewardplug serve``: the pool from the command line.

Only argparse at import (``rewardplug --help`` stays fast); Ray and the model load inside the commands.

Clusters: with an address (``--address`` or RAY_ADDRESS) a command joins that cluster or fails saying
how to start one; it never starts one there. Without: ``pool start`` joins the cluster started with
``ray start`` on this machine, or starts one with ``ray start --head`` (the pool outlives the command);
``serve`` starts a cluster of its own that ends with it. ``serve`` stops on Ctrl-C or SIGTERM alike,
removing its pool (exit codes 130 and 143).
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time

logger = logging.getLogger("rewardplug")

EXIT_OK, EXIT_CONFIG, EXIT_FAILED, EXIT_NO_POOL, EXIT_UNPLACEABLE = 0, 1, 4, 5, 6


def add_commands(sub) -> None:
    from ..cli import _Formatter  # each flag's default, none for required flags or None

    pool = sub.add_parser("pool", help="start, inspect or stop a named reward pool on a Ray cluster", formatter_class=_Formatter)
    verbs = pool.add_subparsers(dest="pool_command", required=True)

    start = verbs.add_parser("start", help="start a named pool (returns once its replicas are ready)", formatter_class=_Formatter)
    start.add_argument("--name", required=True, help="pool name; trainers attach with RewardPool(model, name=NAME)")
    _pool_args(start)
    start.add_argument("--http-port", type=int, default=None, help="also open the HTTP door on this port")
    start.set_defaults(func=cmd_pool_start)

    status = verbs.add_parser("status", help="replicas, health, queued samples and recent throughput", formatter_class=_Formatter)
    status.add_argument("name", nargs="?", help="pool name (every pool on the cluster if not given)")
    status.add_argument("--address", default=None, help="Ray cluster to look at (RAY_ADDRESS, else this machine's `ray start` cluster)")
    status.set_defaults(func=cmd_pool_status)

    stop = verbs.add_parser("stop", help="remove a named pool's replicas", formatter_class=_Formatter)
    stop.add_argument("name")
    stop.add_argument("--address", default=None, help="Ray cluster the pool runs on (RAY_ADDRESS, else this machine's `ray start` cluster)")
    stop.set_defaults(func=cmd_pool_stop)

    serve = sub.add_parser("serve", help="the pool with its HTTP door open (loopback by default); Ctrl-C or SIGTERM stops it",
                           formatter_class=_Formatter)  # fmt: skip
    serve.add_argument("--name", default="rewardplug", help="pool name")
    _pool_args(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (loopback only unless told)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", help="require this key (Authorization: Bearer or X-API-Key); or set REWARDPLUG_API_KEY")
    serve.add_argument("--image-root", action="append", default=[], help="folder HTTP samples may read local images from (repeatable); none by default")
    serve.add_argument("--allow-url-host", action="append", default=[], help="host whose image URLs HTTP samples may fetch ('*' for any); none by default")
    serve.add_argument("--max-body-mb", type=float, default=64, help="largest request body")
    serve.add_argument("--max-samples", type=int, default=4096, help="samples per request")
    serve.add_argument("--on-invalid", default="raise", type=_on_invalid,
                       help="/get_reward: a query that cannot be scored answers 422 with the reasons ('raise') "
                            "or gets this float reward")  # fmt: skip
    serve.set_defaults(func=cmd_serve)


def _pool_args(p) -> None:
    p.add_argument("--model", required=True, help="hub id (Skywork/Skywork-VL-Reward-7B) or checkpoint folder; 'tiny' is "
                                                  "the built-in random-weight model (the scores mean nothing)")  # fmt: skip
    p.add_argument("--replicas", type=int, default=None, help="number of replicas (one per free GPU, or 1, if not given)")
    p.add_argument("--gpus-per-replica", type=float, default=None, help="GPUs per replica (1 if the cluster has GPUs, else 0, if not given)")
    p.add_argument("--cpus-per-replica", type=float, default=1, help="CPUs per replica")
    p.add_argument("--address", default=None, help="Ray cluster to join (RAY_ADDRESS if not given)")
    p.add_argument("--dtype", default="auto", help="auto, bfloat16, float32, ...")
    p.add_argument("--max-length", type=int, default=None, help="refuse samples longer than this many tokens")
    p.add_argument("--max-ongoing", type=int, default=8, help="parts (prompt groups, up to 64 samples) one replica holds at once")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds a request may take before it fails")
    p.add_argument("--autoscale", default=None, metavar="MIN-MAX", help="scale between MIN and MAX replicas on queued samples")


def _given_address(args) -> str | None:
    return args.address or os.environ.get("RAY_ADDRESS") or None


def _join(address: str) -> None:
    """Join the cluster at ``address``; never start one there."""
    import ray

    hint = "start one there with `ray start --head` (or leave out --address and RAY_ADDRESS)"
    host, _, port = address.rpartition(":")
    if "://" not in address and port.isdigit():  # fail in seconds, not after Ray's minutes of retries
        import socket

        try:
            socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
        except OSError as e:
            raise _Refused(f"no Ray cluster answers at {address!r} ({e.strerror or e}); {hint}") from None
    try:
        ray.init(address=address, namespace="rewardplug", log_to_driver=False)
    except ConnectionError as e:
        raise _Refused(f"no Ray cluster answers at {address!r} ({e}); {hint}") from None


def _join_or_start() -> None:
    """``pool start`` without an address: this machine's `ray start` cluster, else a new one that
    outlives the command (stop it with `ray stop`)."""
    import ray

    try:
        ray.init(address="auto", namespace="rewardplug", log_to_driver=False)
        return
    except ConnectionError:
        pass
    print("no Ray cluster runs on this machine: starting one with `ray start --head` (stop it with `ray stop`)", file=sys.stderr)
    subprocess.run([os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--head", "--disable-usage-stats"],
                   check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    ray.init(address="auto", namespace="rewardplug", log_to_driver=False)


class _Refused(Exception):
    """A command that cannot go on; its message says what to do."""


def pool_config(args, **extra):
    """The PoolConfig of ``pool start`` / ``serve`` flags (after joining the cluster: GPU default)."""
    import ray

    from ..named_models import banner, checkpoint_path, is_random
    from .config import PoolConfig

    if is_random(args.model):
        print(banner(args.model), file=sys.stderr)
    gpus = args.gpus_per_replica
    if gpus is None:
        gpus = 1 if ray.cluster_resources().get("GPU", 0) else 0
    autoscale = tuple(int(x) for x in args.autoscale.split("-")) if args.autoscale else None
    model_options = {"dtype": args.dtype, **({"max_length": args.max_length} if args.max_length is not None else {})}
    try:
        model = checkpoint_path(args.model)
    except ValueError as e:
        raise _Refused(str(e)) from None
    return PoolConfig(model=model, name=args.name, num_replicas=args.replicas,
                      gpus_per_replica=gpus, cpus_per_replica=args.cpus_per_replica, max_ongoing_requests=args.max_ongoing,
                      request_timeout_s=args.request_timeout, autoscale=autoscale, model_options=model_options, **extra)  # fmt: skip


def _open(config, model: str):
    from .pool import RewardPool

    t0 = time.perf_counter()
    pool = RewardPool(config=config)
    print(f"pool {pool.name!r}: {pool.num_replicas} replicas of {model} ready in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return pool


def _run(body) -> int:
    """A command's body; a pool that cannot be placed or an address that does not answer is a message."""
    try:
        return body()
    except _Refused as e:
        print(f"rewardplug: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except Exception as e:
        from ..errors import PoolConfigError
        from .pool import PoolPlacementError

        if isinstance(e, PoolPlacementError):
            print(f"rewardplug: the pool cannot be placed: {e.message}; {e.cli_hint}", file=sys.stderr)
            return EXIT_UNPLACEABLE
        if isinstance(e, PoolConfigError):
            print(f"rewardplug: {e}", file=sys.stderr)
            return EXIT_CONFIG
        raise


def cmd_pool_start(args) -> int:
    def body() -> int:
        address = _given_address(args)
        _join(address) if address else _join_or_start()
        pool = _open(pool_config(args, http_port=args.http_port), args.model)
        print(f"attach from Python: RewardPool.connect({pool.name!r})  |  stop: rewardplug pool stop {pool.name}")
        pool.close()
        return EXIT_OK

    return _run(body)


def _connect_for_admin(args) -> None:
    address = _given_address(args)
    _join(address or "auto")


def cmd_pool_status(args) -> int:
    def body() -> int:
        from ..errors import PoolNotFoundError
        from .pool import RewardPool, pool_names

        _connect_for_admin(args)
        names = [args.name] if args.name else pool_names()
        if not names:
            print("no pools run on this cluster")
            return EXIT_NO_POOL
        for name in names:
            try:
                pool = RewardPool.connect(name)
            except PoolNotFoundError as e:
                print(e, file=sys.stderr)
                return EXIT_NO_POOL
            print(status_text(pool))
            pool.close()
        return EXIT_OK

    return _run(body)


def status_text(pool) -> str:
    """Replicas (health, device, samples held, throughput over the last minute) and the pool's totals."""
    from ..tables import format_table

    rows, replicas = [], pool.health()
    for r in replicas:
        engine, recent = r.get("engine", {}), r.get("recent", {})
        rows.append((r["replica"], "yes" if r["alive"] else f"no ({r['error']})", r.get("device"),
                     ",".join(r.get("gpu_ids") or []) or "-", "yes" if r.get("offloaded") else "no",
                     r.get("inflight_samples"), engine.get("queue_depth"), recent.get("samples"),
                     recent.get("samples_per_s"), engine.get("latency_p50_ms"), engine.get("latency_p99_ms")))  # fmt: skip
    headers = ("replica", "healthy", "device", "gpus", "offloaded", "held", "queued", "samples (last min)",
               "samples/s (last min)", "p50 ms", "p99 ms")  # fmt: skip

    def total(key: str) -> int:
        return sum(r.get("engine", {}).get(key, 0) for r in replicas)

    totals = [("replicas running", pool.num_replicas), ("samples held now", sum(r.get("inflight_samples") or 0 for r in replicas)),
              ("samples scored since start", total("samples")), ("batches since start", total("batches")),
              ("prompt prefixes shared", total("prefix_hits")), ("vision tower runs", total("vision_misses"))]  # fmt: skip
    return f"pool {pool.name!r}\n{format_table(rows, headers=headers)}\n\n{format_table(totals)}\n"


def cmd_pool_stop(args) -> int:
    def body() -> int:
        from ..errors import PoolNotFoundError
        from .pool import RewardPool

        _connect_for_admin(args)
        try:
            pool = RewardPool.connect(args.name)
        except PoolNotFoundError as e:
            print(e, file=sys.stderr)
            return EXIT_NO_POOL
        pool.shutdown()
        print(f"pool {args.name!r} stopped")
        return EXIT_OK

    return _run(body)


def _sigterm_kept(join):
    """Run ``join`` (ray.init), then put this process's SIGTERM handler back: Ray installs its own (a
    stack dump and abort, or exit 15), and SIGTERM must stop ``serve`` like Ctrl-C (pool removed, 143)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return join()
    before = signal.getsignal(signal.SIGTERM)
    join()
    if callable(before):
        signal.signal(signal.SIGTERM, before)


def _on_invalid(text: str) -> str | float:
    from ..on_invalid import parse_on_invalid
    from .http import NO_MASK

    try:
        return parse_on_invalid(text, where="--on-invalid", none_refused=NO_MASK)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def cmd_serve(args) -> int:
    """Serve until Ctrl-C or SIGTERM (raised here as KeyboardInterrupt / the CLI's Terminated); the pool
    is removed on the way out either way, and the exception gives the exit code."""
    from .http import HttpSettings

    api_key = args.api_key or os.environ.get("REWARDPLUG_API_KEY")
    if args.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        logger.warning("serving on %s without an API key: anyone who reaches this port can use it", args.host)
    http = HttpSettings(api_key=api_key, max_body_bytes=int(args.max_body_mb * 2**20), max_samples=args.max_samples,
                        image_roots=list(args.image_root), image_url_hosts=list(args.allow_url_host),
                        on_invalid=args.on_invalid)  # fmt: skip
    opened = []

    def body() -> int:
        import ray

        address = _given_address(args)
        if address:
            _sigterm_kept(lambda: _join(address))
        else:  # a cluster of its own: its Serve and HTTP proxy take the options asked here
            _sigterm_kept(lambda: ray.init(address="local", namespace="rewardplug", log_to_driver=False,
                                           include_dashboard=False))  # fmt: skip
        opened.append(_open(pool_config(args, http_port=args.port, http_host=args.host, http=http), args.model))
        print(f"rewardplug is serving on http://{args.host}:{args.port} (POST /v1/score, POST /get_reward, GET /healthz)",
              flush=True)  # fmt: skip
        while True:
            time.sleep(3600)

    try:
        return _run(body)
    finally:
        import ray

        for pool in opened:
            pool.shutdown()
        ray.shutdown()  # leave the cluster (its own one ends here) before the interpreter exits
