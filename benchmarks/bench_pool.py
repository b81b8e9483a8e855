"""RewardPool (on Ray Serve) side by side with this machine's ceiling: 2 replicas against two bare engine
processes, 1 replica against the in-process engine; submit latency; affinity under load from two
processes; two trainer ranks sharing one replica against each rank alone.

    python benchmarks/bench_pool.py            # about 4-5 minutes on 2 cores
    python benchmarks/bench_pool.py --quick    # 8 prompts, 2 rounds

Workload: GRPO, 16 prompts x G=8 completions of 16-256 tokens, one 224x224 image per prompt, on the
benchmark model (benchmarks/common.py: the 7B's proportions sized for a CPU), fp32. Every engine below
runs torch on 1 thread with 1 encode worker, as a pool replica given 1 CPU does.

(a) RewardEngine in this process;
(b) RewardPool, 1 replica (gpus_per_replica=0, cpus_per_replica=1);
(c) RewardPool, 2 replicas of 1 CPU each;
(d) the ceiling: two bare RewardEngine processes started at once, each scoring its own half of the
    prompt groups (no Ray, no Serve): what two cores give with nothing in between.

Every round scores a new workload (new images, new completions), the same one for (a)-(d), which run
one after the other; (a) and (d) build fresh engines inside the timed region, and the pools never saw
the round's content: no cache carries over from a warm-up or an earlier round. Ratios: best against
best, and the median of the rounds' own ratios (each round's runs are back to back). Targets:
(c)/(d) >= 0.9 of the ceiling; (b) against (a) at most 3% slower. Each round prints the load average:
other processes on the machine take cores from (c) and (d) first.
Submit latency: 50 calls of ``submit`` with 1,000 samples (20 prompts x 50 completions, images) on (c).
Two ranks: two Ray tasks (two processes, as two trainer ranks) each score their own GRPO step on the
1-replica pool (b), first one after the other (each rank alone), then at the same time (sharing): the
replica's batches per sample and padding efficiency, from its engine's counters.
"""

from __future__ import annotations

import argparse
import copy
import logging
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import grpo_workload, make_bench_checkpoint, param_split  # noqa: E402

from rewardplug import RewardEngine, RewardModel, RewardPool  # noqa: E402

OPTS = dict(dtype="float32", image_roots=None)
ENGINE = dict(encode_workers=1)  # what a replica of 1 CPU runs (rewardplug/serving/replica.py)


def fresh_engine_score(rm, samples) -> list:
    with RewardEngine(rm, **ENGINE) as engine:  # fresh caches, like a fresh replica
        return engine.score(samples)


def _engine_process(path: str, conn) -> None:
    """One bare engine process of the ceiling: loads the model once, then per round gets its share,
    waits for "go", scores it on a fresh engine and answers (scores, time.monotonic() at the end)."""
    torch.set_num_threads(1)
    rm = RewardModel.from_pretrained(path, device="cpu", **OPTS)
    fresh_engine_score(rm, [{"prompt": "Warm up.", "completion": "Yes."}])  # first-call costs
    conn.send("ready")
    while (message := conn.recv()) is not None:
        samples = message
        conn.send("loaded")
        assert conn.recv() == "go"
        scores = fresh_engine_score(rm, samples)
        conn.send((scores, time.monotonic()))


class Ceiling:
    """Two bare RewardEngine processes (1 thread each) scoring their shares at once: wall time from the
    common start until the later one is done (time.monotonic is one clock for every process)."""

    def __init__(self, path: Path, processes: int = 2):
        ctx = multiprocessing.get_context("spawn")
        self.conns, self.procs = [], []
        for _ in range(processes):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_engine_process, args=(str(path), child), daemon=True)
            proc.start()
            self.conns.append(parent)
            self.procs.append(proc)
        for conn in self.conns:
            assert conn.recv() == "ready"

    def score(self, samples: list, group: int) -> tuple[list, float]:
        """Each process scores every other prompt group (as the two replicas would share them)."""
        n = len(self.conns)
        shares = [[i for i in range(len(samples)) if (i // group) % n == k] for k in range(n)]
        for conn, share in zip(self.conns, shares):
            conn.send([samples[i] for i in share])  # pickled before the clock starts
        for conn in self.conns:
            assert conn.recv() == "loaded"
        t0 = time.monotonic()
        for conn in self.conns:
            conn.send("go")
        answers = [conn.recv() for conn in self.conns]
        scores: list = [None] * len(samples)
        for share, (got, _) in zip(shares, answers):
            for i, x in zip(share, got):
                scores[i] = x
        return scores, max(end for _, end in answers) - t0

    def close(self) -> None:
        for conn, proc in zip(self.conns, self.procs):
            conn.send(None)
            proc.join(30)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def run(args) -> None:
    import ray

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="rp-bench-pool-"))
    path = make_bench_checkpoint(tmp / "bench")
    rm = RewardModel.from_pretrained(path, device="cpu", **OPTS)
    split = param_split(rm)
    print(f"model: vision {split['vision'] / 1e6:.2f}M, LM layers {split['lm_layers'] / 1e6:.2f}M, "
          f"vocab 151936, fp32 on CPU; this process: {torch.get_num_threads()} torch thread")  # fmt: skip

    t0 = time.perf_counter()
    ceiling = Ceiling(path)
    print(f"ceiling: 2 engine processes ready in {time.perf_counter() - t0:.1f}s")
    t0 = time.perf_counter()
    # 3 CPUs declared: (b) and (c) stay up side by side; each replica asks for 1 CPU and runs 1 thread
    ray.init(address="local", num_cpus=3, namespace="rewardplug", log_to_driver=False,
             logging_level=logging.WARNING, include_dashboard=False)  # a cluster of its own  # fmt: skip
    pool_opts = dict(gpus_per_replica=0, cpus_per_replica=1, **OPTS, **ENGINE)
    one = RewardPool(path, num_replicas=1, **pool_opts)
    two = RewardPool(path, num_replicas=2, max_ongoing_requests=64, **pool_opts)
    print(f"ray.init and 3 replicas ready in {time.perf_counter() - t0:.1f}s")

    warm = grpo_workload(2, args.group, side=args.side, seed=999)
    fresh_engine_score(rm, warm), one.score(warm), two.score(warm), ceiling.score(warm, args.group)  # first calls

    times: dict[str, list] = {"a": [], "b": [], "c": [], "d": []}
    diff = 0.0
    for r in range(args.rounds):
        samples = grpo_workload(args.prompts, args.group, side=args.side, seed=r)
        # Each run gets its own copy (same pixels and text, new objects): nothing one run leaves on them counts.
        got_a, t_a = timed(lambda s=copy.deepcopy(samples): fresh_engine_score(rm, s))
        got_b, t_b = timed(lambda s=copy.deepcopy(samples): one.score(s))
        got_c, t_c = timed(lambda s=copy.deepcopy(samples): two.score(s))
        got_d, t_d = ceiling.score(copy.deepcopy(samples), args.group)
        diff = max([diff] + [abs(x - y) for got in (got_b, got_c, got_d) for x, y in zip(got_a, got)])
        for k, t in zip("abcd", (t_a, t_b, t_c, t_d)):
            times[k].append(t)
        print(f"round {r}: (a) {t_a:.2f}s  (b) {t_b:.2f}s  (c) {t_c:.2f}s  (d) {t_d:.2f}s   "
              f"(c)/(d) {t_d / t_c:.2f}  (b)/(a) {t_b / t_a - 1:+.1%}   load average {os.getloadavg()[0]:.1f} "
              f"on {os.cpu_count()} cores")  # fmt: skip
    ceiling.close()

    n = args.prompts * args.group
    best = {k: min(v) for k, v in times.items()}
    rate = {k: n / t for k, t in best.items()}
    time.sleep(1.5)  # replicas report their counters about once a second
    stats = two.stats()
    per_replica = [r["engine"]["samples"] for r in stats["replicas"]]
    print(f"\nworkload: {args.prompts} prompts x G={args.group}, {args.side}x{args.side} image per prompt, "
          f"completions 16-256 tokens; {n} samples per round, best of {args.rounds} rounds")  # fmt: skip
    print(f"{'':52}{'samples/s':>10}{'best s':>9}")
    print(f"{'(a) RewardEngine in process, 1 thread':52}{rate['a']:>10.2f}{best['a']:>9.2f}")
    print(f"{'(b) RewardPool, 1 replica x 1 thread':52}{rate['b']:>10.2f}{best['b']:>9.2f}")
    print(f"{'(c) RewardPool, 2 replicas x 1 thread':52}{rate['c']:>10.2f}{best['c']:>9.2f}")
    print(f"{'(d) ceiling: 2 bare engine processes x 1 thread':52}{rate['d']:>10.2f}{best['d']:>9.2f}")
    of_ceiling = rate["c"] / rate["d"]
    of_ceiling_median = float(np.median([d / c for c, d in zip(times["c"], times["d"])]))
    print(f"pool(2)/ceiling = (c)/(d) = {of_ceiling:.2f} best against best, {of_ceiling_median:.2f} median of the "
          f"rounds' ratios (target >= 0.9: {'met' if min(of_ceiling, of_ceiling_median) >= 0.9 else 'NOT met'})")
    overhead = best["b"] / best["a"] - 1
    overhead_median = float(np.median([b / a - 1 for a, b in zip(times["a"], times["b"])]))
    met = max(overhead, overhead_median) <= 0.03
    print(f"pool(1)/engine overhead = (b) against (a): {overhead:+.1%} best against best, {overhead_median:+.1%} "
          f"median of the rounds' ratios (target <= +3%: {'met' if met else 'NOT met'})")
    print(f"(c)/(b) = {rate['c'] / rate['b']:.2f}x; (d)/(a) = {rate['d'] / rate['a']:.2f}x (what two cores give here)")
    print(f"max |score diff| of (b), (c), (d) against (a): {diff:.1e}; samples per replica in (c): {per_replica}")
    print(f"load average (1, 5, 15 min): {', '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} cores")

    # Submit latency: submit only queues (routing, ray.put and actor calls run on the pool's thread).
    big = grpo_workload(20, 50, side=args.side, seed=12345)
    assert len(big) == 1000
    pending = [two.submit(big) for _ in range(3)]
    lat = []
    for _ in range(args.submits):
        t0 = time.perf_counter()
        pending.append(two.submit(big))
        lat.append(time.perf_counter() - t0)
    p50, p99 = (float(np.percentile(lat, q)) * 1e3 for q in (50, 99))
    print(f"submit latency, 1,000 samples with images, {args.submits} calls on (c): "
          f"p50 {p50:.3f} ms, p99 {p99:.3f} ms, max {max(lat) * 1e3:.3f} ms")  # fmt: skip
    two.shutdown()  # the queued requests are dropped
    two = RewardPool(path, num_replicas=2, **pool_opts)
    affinity(two, args)
    two.shutdown()
    two_ranks(one, args)
    one.shutdown()
    ray.shutdown()


def affinity(pool, args) -> None:
    """Affinity under load from two processes: every group is scored once (its image is then cached on
    the replica it went to), then again with new completions by two ranks at once, each sending its
    half of the groups in one request. A group served by the replica holding its image runs no vision
    pass: hit rate = 1 - (vision passes) / (groups)."""
    import ray

    @ray.remote(num_cpus=0)
    def rank(pool, samples):
        return pool.score(samples)

    groups = args.prompts * 2
    first = grpo_workload(groups, args.group, side=args.side, seed=4242)
    again = [{**s, "completion": f"{s['completion']} Again."} for s in first]
    ray.get(rank.remote(pool, first))
    time.sleep(1.5)
    before = sum(r["engine"]["vision_misses"] for r in pool.stats()["replicas"])
    halves = [[s for k, s in enumerate(again) if (k // args.group) % 2 == h] for h in range(2)]
    ray.get([rank.remote(pool, h) for h in halves])
    time.sleep(1.5)
    misses = sum(r["engine"]["vision_misses"] for r in pool.stats()["replicas"]) - before
    print(f"\naffinity under load, two processes, {groups} groups x G={args.group} on 2 replicas: "
          f"hit rate {1 - misses / groups:.2f} ({misses} of {groups} groups ran their vision pass again; target >= 0.9)")


def two_ranks(pool, args) -> None:
    """Two processes (trainer ranks) on one replica: alone (one after the other) vs sharing (at once)."""
    import ray

    @ray.remote(num_cpus=0)
    def rank(pool, samples):
        return pool.score(samples)

    def counters():
        time.sleep(1.5)  # the replica's next report
        (r,) = pool.stats()["replicas"]
        return r["engine"]

    def run_step(seed: int, together: bool) -> dict:
        steps = [grpo_workload(args.prompts // 2, args.group, side=args.side, seed=seed + k) for k in range(2)]
        before = counters()
        if together:
            ray.get([rank.remote(pool, s) for s in steps])
        else:
            for s in steps:
                ray.get(rank.remote(pool, s))
        after = counters()
        d = {k: after[k] - before[k] for k in ("samples", "batches", "real_tokens", "padded_tokens", "forward_passes")}
        return {"batches_per_sample": d["batches"] / d["samples"], "passes_per_sample": d["forward_passes"] / d["samples"],
                "padding_efficiency": d["real_tokens"] / d["padded_tokens"], "samples": d["samples"]}  # fmt: skip

    ray.get(rank.remote(pool, grpo_workload(1, 2, side=args.side, seed=777)))  # the tasks' first-call costs
    rows = [("each rank alone", run_step(5000, False)), ("two ranks sharing", run_step(6000, True))]
    print(f"\ntwo ranks, each {args.prompts // 2} prompts x G={args.group}, one replica:")
    print(f"{'':24}{'samples':>8}{'batches/sample':>16}{'passes/sample':>15}{'padding eff.':>14}")
    for name, r in rows:
        print(f"{name:24}{r['samples']:>8}{r['batches_per_sample']:>16.3f}{r['passes_per_sample']:>15.3f}"
              f"{r['padding_efficiency']:>14.3f}")  # fmt: skip


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--side", type=int, default=224)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--submits", type=int, default=50)
    p.add_argument("--quick", action="store_true", help="8 prompts, 2 rounds")
    args = p.parse_args()
    if args.quick:
        args.prompts, args.rounds = 8, 2
    print("command: python benchmarks/bench_pool.py " + " ".join(sys.argv[1:]))
    serving = Path(__file__).parent.parent / "rewardplug" / "serving"
    print(f"lines in rewardplug/serving/*.py: {sum(len(f.read_text().splitlines()) for f in serving.glob('*.py'))}")
    run(args)
