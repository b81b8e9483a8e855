"""``rewardplug pool start|status|stop`` and ``rewardplug serve``: the pool from the command line.

Only argparse at import (``rewardplug --help`` stays fast); Ray and the model load inside the commands.

A pool started here outlives the command, so it needs a Ray cluster that does too: ``pool start``
joins ``--address`` (or RAY_ADDRESS, or a cluster started with ``ray start`` on this machine) and,
when there is none, starts one with ``ray start --head`` (stop it with ``ray stop``).
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time

logger = logging.getLogger("rewardplug")

EXIT_OK, EXIT_NO_POOL, EXIT_FAILED = 0, 5, 4


def add_commands(sub) -> None:
    formatter = argparse.ArgumentDefaultsHelpFormatter
    pool = sub.add_parser("pool", help="start, inspect or stop a named reward pool on a Ray cluster",
                          formatter_class=formatter)  # fmt: skip
    verbs = pool.add_subparsers(dest="pool_command", required=True)

    start = verbs.add_parser("start", help="start a named pool (returns once its replicas are ready)",
                             formatter_class=formatter)  # fmt: skip
    start.add_argument("--name", required=True, help="pool name; trainers attach with RewardPool(model, name=NAME)")
    _pool_args(start)
    start.add_argument("--http-port", type=int, default=None, help="also open the HTTP door on this port")
    start.set_defaults(func=cmd_pool_start)

    status = verbs.add_parser("status", help="replicas, health, queued samples and throughput", formatter_class=formatter)
    status.add_argument("name", nargs="?", help="pool name (default: every pool on the cluster)")
    status.add_argument("--address", default="auto", help="Ray cluster to look at")
    status.set_defaults(func=cmd_pool_status)

    stop = verbs.add_parser("stop", help="remove a named pool's replicas", formatter_class=formatter)
    stop.add_argument("name")
    stop.add_argument("--address", default="auto", help="Ray cluster the pool runs on")
    stop.set_defaults(func=cmd_pool_stop)

    serve = sub.add_parser("serve", help="the pool with its HTTP door open (loopback by default); Ctrl-C stops it",
                           formatter_class=formatter)  # fmt: skip
    serve.add_argument("--name", default="rewardplug", help="pool name")
    _pool_args(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (loopback only unless told)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", help="require this key (Authorization: Bearer or X-API-Key); or set REWARDPLUG_API_KEY")
    serve.add_argument("--image-root", action="append", default=[], help="folder HTTP samples may read local images from (repeatable); none by default")
    serve.add_argument("--allow-url-host", action="append", default=[], help="host whose image URLs HTTP samples may fetch ('*' for any); none by default")
    serve.add_argument("--max-body-mb", type=float, default=64, help="largest request body")
    serve.add_argument("--max-samples", type=int, default=4096, help="samples per request")
    serve.set_defaults(func=cmd_serve)


def _pool_args(p) -> None:
    p.add_argument("--model", default="tiny", help="hub id or checkpoint folder ('tiny': the embedded tiny checkpoint)")
    p.add_argument("--replicas", type=int, default=None, help="number of replicas (default: one per free GPU, or 1)")
    p.add_argument("--gpus-per-replica", type=float, default=None, help="GPUs per replica (default: 1 if the cluster has GPUs, else 0)")
    p.add_argument("--cpus-per-replica", type=float, default=1)
    p.add_argument("--address", default=None, help="Ray cluster to join (default: RAY_ADDRESS, a local `ray start` cluster, or start one)")
    p.add_argument("--dtype", default="auto", help="auto, bfloat16, float32, ...")
    p.add_argument("--max-length", type=int, default=None, help="refuse samples longer than this many tokens")
    p.add_argument("--max-inflight", type=int, default=512, help="samples one replica holds at once")
    p.add_argument("--autoscale", default=None, metavar="MIN-MAX", help="scale between MIN and MAX replicas on queued samples")


def _model_path(model: str) -> str:
    if model == "tiny":
        from ..testing import cached_tiny_checkpoint

        return str(cached_tiny_checkpoint())
    return model


def _join_or_start(address: str | None) -> None:
    """Join a cluster that outlives this command, starting one with ``ray start --head`` if needed."""
    import ray

    try:
        ray.init(address=address or "auto", namespace="rewardplug", log_to_driver=False)
        return
    except ConnectionError:
        if address not in (None, "auto"):
            raise
    print("no Ray cluster found: starting one with `ray start --head` (stop it with `ray stop`)", file=sys.stderr)
    subprocess.run([os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--head", "--disable-usage-stats"],
                   check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    ray.init(address="auto", namespace="rewardplug", log_to_driver=False)


def _open_pool(args, *, lasting: bool, **extra):
    import ray

    from .pool import RewardPool

    if lasting:  # the pool outlives this command
        _join_or_start(args.address)
    else:  # the pool lives as long as this command: any cluster will do, a new local one too
        ray.init(address=args.address, namespace="rewardplug", log_to_driver=False)
    gpus = args.gpus_per_replica
    if gpus is None:
        gpus = 1 if ray.cluster_resources().get("GPU", 0) else 0
    autoscale = tuple(int(x) for x in args.autoscale.split("-")) if args.autoscale else None
    options = {"dtype": args.dtype}
    if args.max_length is not None:
        options["max_length"] = args.max_length
    t0 = time.perf_counter()
    pool = RewardPool(_model_path(args.model), name=args.name, num_replicas=args.replicas, gpus_per_replica=gpus,
                      cpus_per_replica=args.cpus_per_replica, max_inflight_per_replica=args.max_inflight,
                      autoscale=autoscale, **extra, **options)  # fmt: skip
    print(f"pool {pool.name!r}: {pool.num_replicas} replicas of {args.model} ready in {time.perf_counter() - t0:.1f}s",
          file=sys.stderr)  # fmt: skip
    return pool


def cmd_pool_start(args) -> int:
    pool = _open_pool(args, lasting=True, http_port=args.http_port)
    print(f"attach from Python: RewardPool.connect({pool.name!r})  |  stop: rewardplug pool stop {pool.name}")
    pool.close()
    return EXIT_OK


def cmd_pool_status(args) -> int:
    import ray

    from .pool import RewardPool, pool_names

    ray.init(address=args.address, namespace="rewardplug", log_to_driver=False)
    names = [args.name] if args.name else pool_names()
    if not names:
        print("no pools run on this cluster")
        return EXIT_NO_POOL
    from ..errors import PoolNotFoundError

    for name in names:
        try:
            pool = RewardPool.connect(name)
        except PoolNotFoundError as e:
            print(e, file=sys.stderr)
            return EXIT_NO_POOL
        print(status_text(pool))
        pool.close()
    return EXIT_OK


def status_text(pool) -> str:
    """Replicas (health, device, samples held, throughput) and the pool's totals as tables."""
    from ..tables import format_table

    health = pool.health()
    rows = []
    for r in health:
        engine = r.get("engine", {})
        rate = engine.get("samples", 0) / max(r.get("uptime_s", 0), 1e-9)
        rows.append((r["replica"], "yes" if r["alive"] else "no", r.get("device"), ",".join(r.get("gpu_ids") or []) or "-",
                     "yes" if r.get("offloaded") else "no", r.get("inflight_samples"), engine.get("queue_depth"),
                     engine.get("samples"), engine.get("batches"), round(rate, 2), engine.get("latency_p50_ms"),
                     engine.get("latency_p99_ms"), round(r.get("age_s", 0), 1)))  # fmt: skip
    headers = ("replica", "healthy", "device", "gpus", "offloaded", "held", "queued", "samples", "batches",
               "samples/s", "p50 ms", "p99 ms", "report age s")  # fmt: skip
    stats = pool.stats()
    totals = [("replicas running", pool.num_replicas), ("samples held now", stats["inflight_samples"]),
              ("samples scored", stats["engine_samples"]), ("batches", stats["engine_batches"]),
              ("prompt prefixes shared", stats["engine_prefix_hits"]), ("vision tower runs", stats["engine_vision_misses"])]  # fmt: skip
    return f"pool {pool.name!r}\n{format_table(rows, headers=headers)}\n\n{format_table(totals)}\n"


def cmd_pool_stop(args) -> int:
    import ray

    from ..errors import PoolNotFoundError
    from .pool import RewardPool

    ray.init(address=args.address, namespace="rewardplug", log_to_driver=False)
    try:
        pool = RewardPool.connect(args.name)
    except PoolNotFoundError as e:
        print(e, file=sys.stderr)
        return EXIT_NO_POOL
    pool.shutdown()
    print(f"pool {args.name!r} stopped")
    return EXIT_OK


def cmd_serve(args) -> int:
    from .http import HttpSettings

    api_key = args.api_key or os.environ.get("REWARDPLUG_API_KEY")
    if args.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        logger.warning("serving on %s without an API key: anyone who reaches this port can use it", args.host)
    http = HttpSettings(api_key=api_key, max_body_bytes=int(args.max_body_mb * 2**20), max_samples=args.max_samples,
                        image_roots=list(args.image_root), image_url_hosts=list(args.allow_url_host))  # fmt: skip
    pool = _open_pool(args, lasting=False, http_port=args.port, http_host=args.host, http=http)
    print(f"rewardplug is serving on http://{args.host}:{args.port} (POST /v1/score, POST /get_reward, GET /healthz)",
          flush=True)  # fmt: skip
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pool.shutdown()
    return EXIT_OK
