"""A separate process using a named pool, as one rank of a training job would.

    python pool_client.py '{"model": ..., "name": ..., "options": {...}, "requests": N, "samples_per_request": K,
                            "threads": T, "seed": S}'

Connects to the cluster in RAY_ADDRESS, gets or creates the pool, sends ``requests`` requests from
``threads`` threads at once, and prints one JSON line: the scores of each request (in order) and the
replica pids its pool handle saw.
"""

from __future__ import annotations

import json
import sys
import threading
import time


def main() -> None:
    spec = json.loads(sys.argv[1])
    import ray

    from rewardplug import RewardPool

    ray.init(namespace="rewardplug", log_to_driver=False)
    t0 = time.perf_counter()
    pool = RewardPool(spec["model"], name=spec["name"], **spec.get("options", {}))
    ready_s = time.perf_counter() - t0
    requests = [[{"prompt": f"rank {spec['seed']} question {r}", "completion": f"answer {k} " + "word " * (k + r % 5)}
                 for k in range(spec.get("samples_per_request", 4))] for r in range(spec.get("requests", 1))]  # fmt: skip
    results: list = [None] * len(requests)

    def worker(t: int) -> None:
        for r in range(t, len(requests), spec.get("threads", 1)):
            results[r] = pool.score(requests[r])

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(spec.get("threads", 1))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    time.sleep(1.5)  # replicas report their figures about once a second
    pids = sorted({r["pid"] for r in pool.stats()["replicas"]})
    print(json.dumps({"requests": requests, "scores": results, "pids": pids, "ready_s": ready_s}), flush=True)
    pool.close()


if __name__ == "__main__":
    main()
