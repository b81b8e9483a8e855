"""The HTTP service (Ray Serve + RewardClient) against the in-process RewardPool, same model, same work.

    python benchmarks/bench_service.py                 # about 2 minutes on 2 cores
    python benchmarks/bench_service.py --model tiny    # the tiny test checkpoint: mostly overhead (~2.5 min)
    python benchmarks/bench_service.py --quick         # fewer requests

Workload: each request is one prompt with its own 224x224 image (64 image tokens) and 4 completions
of 16-64 tokens (a GRPO group of 4), on the CPU-sized model with the 7B's proportions
(benchmarks/common.py), fp32. Closed loop: C clients (threads) each send their next request when the
previous one is answered; C = 1, 8, 32. Every concurrency level uses fresh images, so the vision
cache never hits across levels or requests.

(a) HTTP: the pool's HTTP door (``rewardplug.serving.http.HttpDoor``, its own Serve ingress deployment in
    front of the replica) on loopback (one replica, 1 CPU, api key set), each
    client a ``RewardClient`` given PIL images (it sends them as PNG data URIs, as a trainer would);
(b) pool: ``RewardPool(gpus_per_replica=0, num_replicas=1, cpus_per_replica=1)`` in this process,
    each client calling ``pool.score`` with the same PIL images (they go through the object store).

Both live on the same local Ray cluster (each replica 1 CPU), measured in turn at each level so that both
see the same machine load; the client threads share the machine with the replicas, as they would on a
trainer node. Reported: requests/s, latency p50/p99, and HTTP's extra latency and lost throughput
against the pool.
"""

from __future__ import annotations

import argparse
import gc
import random
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import make_bench_checkpoint, make_image, text_of_tokens  # noqa: E402

from rewardplug.testing import make_tiny_checkpoint  # noqa: E402

LEVELS = (1, 8, 32)
GROUP = 4
SIDE = 224


def make_requests(n: int, level: int, seed: int = 0) -> list[list[dict]]:
    rng = random.Random(seed * 1000 + level)
    out = []
    for i in range(n):
        image = make_image(SIDE, 100_000 * level + i)
        q = f"Question {level}-{i}: what does this picture show, and how many objects are there?"
        out.append([{"prompt": q, "completion": text_of_tokens(rng.randint(16, 64), rng), "images": [image]}
                    for _ in range(GROUP)])  # fmt: skip
    return out


def closed_loop(call, requests: list, clients: int) -> dict:
    """``clients`` threads take requests from a shared list in order; returns timings and results."""
    lock = threading.Lock()
    nxt = iter(range(len(requests)))
    latencies, results, errors = [], [None] * len(requests), []

    def worker():
        while True:
            with lock:
                i = next(nxt, None)
            if i is None:
                return
            t0 = time.perf_counter()
            try:
                results[i] = call(requests[i])
            except BaseException as e:  # noqa: BLE001
                errors.append(e)
                return
            dt = time.perf_counter() - t0
            with lock:
                latencies.append(dt)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    lat = np.array(latencies) * 1e3
    return {"rps": len(requests) / wall, "p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)),
            "wall": wall, "n": len(requests), "results": results}  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HTTPBackend:
    """The Serve application on a free loopback port; one RewardClient per client thread."""

    def __init__(self, path: Path):
        from rewardplug import RewardPool
        from rewardplug.serving.client import RewardClient
        from rewardplug.serving.http import HttpSettings

        port, key = free_port(), "bench-key"
        t0 = time.perf_counter()
        # the HTTP door of a pool: an ingress deployment in front of the same replicas as the Python door
        self.pool = RewardPool(path, num_replicas=1, gpus_per_replica=0, cpus_per_replica=1, http_port=port,
                               http=HttpSettings(api_key=key), dtype="float32")  # fmt: skip
        print(f"  Serve application up in {time.perf_counter() - t0:.1f}s on http://127.0.0.1:{port}", flush=True)
        self.url, self.key, self._client_cls = f"http://127.0.0.1:{port}", key, RewardClient
        self._local = threading.local()

    def score(self, samples: list) -> list:
        if not hasattr(self._local, "client"):
            self._local.client = self._client_cls(self.url, api_key=self.key, retries=0)
        return self._local.client.score(samples)

    def close(self) -> None:
        self.pool.shutdown()


class PoolBackend:
    def __init__(self, path: Path):
        from rewardplug import RewardPool

        t0 = time.perf_counter()
        self.pool = RewardPool(path, num_replicas=1, gpus_per_replica=0, cpus_per_replica=1, dtype="float32")
        print(f"  RewardPool up in {time.perf_counter() - t0:.1f}s", flush=True)

    def score(self, samples: list) -> list:
        return self.pool.score(samples)

    def close(self) -> None:
        self.pool.shutdown()


def report(http: dict, pool: dict) -> float:
    worst = 0.0
    for level in LEVELS:
        for a, b in zip(http[level]["results"], pool[level]["results"]):
            worst = max(worst, max(abs(x - y) for x, y in zip(a, b)))
    print(f"\nsame scores over HTTP and through the pool: max |diff| = {worst:.2e}")
    print(f"\n{'clients':>7} | {'HTTP req/s':>10} {'p50 ms':>8} {'p99 ms':>8} | {'pool req/s':>10} {'p50 ms':>8} "
          f"{'p99 ms':>8} | {'HTTP extra p50':>14} {'HTTP/pool req/s':>15}")  # fmt: skip
    for level in LEVELS:
        h, q = http[level], pool[level]
        print(f"{level:>7} | {h['rps']:10.2f} {h['p50']:8.1f} {h['p99']:8.1f} | {q['rps']:10.2f} {q['p50']:8.1f} "
              f"{q['p99']:8.1f} | {h['p50'] - q['p50']:+11.1f} ms {h['rps'] / q['rps']:14.2f}x")  # fmt: skip
    return worst


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("bench", "tiny"), default="bench")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)

    import ray

    from rewardplug.serving.client import to_json_samples

    t_start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="bench-service-"))
    path = make_bench_checkpoint(work / "bench") if args.model == "bench" else make_tiny_checkpoint(work / "tiny")
    counts = {1: 6, 8: 16, 32: 32} if args.quick else {1: 16, 8: 40, 32: 96}
    if args.model == "tiny":
        counts = {k: 2 * v for k, v in counts.items()}
    workloads = {level: make_requests(counts[level], level) for level in LEVELS}
    warm = make_requests(3, 99)
    to_json_samples(warm[0])
    times = []
    for reqs in workloads[1][:8]:
        t0 = time.perf_counter()
        to_json_samples(reqs)
        times.append(time.perf_counter() - t0)
    encode_ms = float(np.median(times)) * 1e3
    print(f"command: python benchmarks/bench_service.py {' '.join(sys.argv[1:] if argv is None else argv)}".rstrip())
    print(f"model: {args.model} checkpoint, fp32, CPU; request = 1 prompt + {SIDE}x{SIDE} image + {GROUP} completions; "
          f"requests per level: {counts}")  # fmt: skip
    print(f"client-side PNG + base64 of one request's image (median): {encode_ms:.1f} ms", flush=True)

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=4, namespace="rewardplug-bench-service", include_dashboard=False,
             log_to_driver=False)  # fmt: skip
    backends, worst = {}, float("nan")
    try:
        backends["http"] = HTTPBackend(path)
        backends["pool"] = PoolBackend(path)
        for backend in backends.values():
            for w in warm:
                backend.score(w)
        # Levels interleaved (http then pool at each level) so that both see the same machine load.
        http, pool = {}, {}
        for level in LEVELS:
            for name, out in (("http", http), ("pool", pool)):
                out[level] = r = closed_loop(backends[name].score, workloads[level], level)
                print(f"  {name:<4} C={level:>2}: {r['rps']:6.2f} req/s  p50 {r['p50']:7.1f} ms  "
                      f"p99 {r['p99']:7.1f} ms", flush=True)  # fmt: skip
        worst = report(http, pool)
        print(f"\ntotal {time.perf_counter() - t_start:.0f}s", flush=True)
    finally:
        for backend in backends.values():
            backend.close()
        # RewardPool.shutdown() then ray.shutdown() at once sometimes kills this process (Ray: "The core
        # worker has already been shutdown"); dropping the pool's objects first avoids it.
        backends.clear()
        gc.collect()
        ray.shutdown()
    return 0 if worst < 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
