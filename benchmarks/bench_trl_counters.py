"""What logging a pool's counters costs a TRL reward call: ``RewardFunction`` on a 1-replica pool,
each call side by side with counters read (``log_every=1``: step N logs step N's counters) and
without (``log_every`` large: no counters read), on the same pool, one after the other per round.

    python benchmarks/bench_trl_counters.py            # tiny model, 20 rounds
    python benchmarks/bench_trl_counters.py --rounds 5

Workload: 4 text samples per call (new ones every call: no cache hit carries over) on the built-in
``tiny`` checkpoint, gpus_per_replica=0; the model's work is small on purpose, so the figure is the
counters' overhead. Prints the median call time of each and their difference, with the load average.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time

import ray

from rewardplug import RewardPool
from rewardplug.integrations.trl import RewardFunction
from rewardplug.named_models import TINY, checkpoint_path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    ray.init(address="local", num_cpus=2, namespace="rewardplug", log_to_driver=False, include_dashboard=False)
    pool = RewardPool(checkpoint_path(TINY), num_replicas=1, gpus_per_replica=0)
    try:
        counted = RewardFunction(pool, name="counted", log_every=1)
        plain = RewardFunction(pool, name="plain", log_every=10**9)
        times: dict[str, list[float]] = {"counters read": [], "no counters": []}
        for r in range(args.rounds + 1):  # round 0 warms up both
            for label, fn in (("counters read", counted), ("no counters", plain)):
                prompts = [f"Say hi ({label}, round {r}, {k})." for k in range(4)]
                completions = [f"Hi {k} from round {r}!" for k in range(4)]
                t0 = time.perf_counter()
                fn(prompts=prompts, completions=completions)
                if r:
                    times[label].append(time.perf_counter() - t0)
        with_c, without = (statistics.median(times[k]) * 1e3 for k in ("counters read", "no counters"))
        print(f"median per call over {args.rounds} rounds: counters read {with_c:.1f} ms, "
              f"no counters {without:.1f} ms, overhead {with_c - without:.1f} ms")
        print("load average:", " ".join(f"{x:.2f}" for x in os.getloadavg()))
    finally:
        pool.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
