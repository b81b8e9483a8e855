"""Grouped key/value heads in the masked SDPA passes on a CPU: transformers' ``"sdpa"`` (repeats each key/value
head for its query heads) against ``rewardplug.grouped_attention`` (``enable_gqa``, no copy).

    python benchmarks/grouped_attention.py [--rounds 3]

bench-cpu, fp32. Two workloads, 448 px 4 x G=8 and 1024 px 2 x G=16, each scored by a fresh
``RewardEngine`` (no cache carries over) on fresh pictures, the two implementations alternated (which
goes first alternates too); prints each timing, the best and the median ratio, and checks that the
scores of the same samples are bitwise equal under both. One attention call at a suffix pass's shape
is timed the same way.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from torch.nn.functional import scaled_dot_product_attention as sdpa

from rewardplug import RewardEngine, named_models
from rewardplug.grouped_attention import NAME
from rewardplug.workload import make_workload


def one_call(rounds: int) -> None:
    """A suffix pass's attention at 1024 px (9 rows, 223 answer tokens over a 1,492-token prefix)."""
    q = torch.randn(9, 6, 223, 64)
    k, v = torch.randn(9, 2, 1715, 64), torch.randn(9, 2, 1715, 64)
    mask = torch.ones(9, 1, 223, 1715, dtype=torch.bool).tril(1492)

    def repeated() -> torch.Tensor:
        def rep(x):
            return x[:, :, None].expand(9, 2, 3, 1715, 64).reshape(9, 6, 1715, 64)

        return sdpa(q, rep(k), rep(v), attn_mask=mask)

    def grouped() -> torch.Tensor:
        return sdpa(q, k, v, attn_mask=mask, enable_gqa=True)

    times: dict[str, list[float]] = {"repeated": [], "grouped": []}
    for _ in range(rounds * 5):
        for name, fn in (("repeated", repeated), ("grouped", grouped)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    r, g = min(times["repeated"]), min(times["grouped"])
    print(f"one masked attention call [9, 6, 223, 64] over 1,715 keys: repeated heads {r * 1e3:.1f} ms, "
          f"grouped {g * 1e3:.1f} ms ({r / g:.2f}x); bitwise equal: {torch.equal(repeated(), grouped())}")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f}, {torch.get_num_threads()} torch threads")
    one_call(args.rounds)
    rm = named_models.load(named_models.BENCH_CPU, dtype="float32", device="cpu", image_roots=None)
    lm = rm.backbone.language_model
    tokenizer = rm.processor.tokenizer
    seeds = iter(range(500, 10_000))

    def timed(implementation: str, samples: list) -> tuple[float, list[float]]:
        lm.set_attn_implementation(implementation)
        start = time.perf_counter()
        with RewardEngine(rm, metrics=None) as engine:
            scores = engine.score(samples)
        return time.perf_counter() - start, scores

    for side, groups, g in ((448, 4, 8), (1024, 2, 16)):
        timed("sdpa", make_workload(tokenizer, groups, g, side, 16, 256, next(seeds)))  # warm-up
        times: dict[str, list[float]] = {"sdpa": [], NAME: []}
        equal = True
        for r in range(args.rounds):
            order = ("sdpa", NAME) if r % 2 == 0 else (NAME, "sdpa")
            for implementation in order:
                samples = make_workload(tokenizer, groups, g, side, 16, 256, next(seeds))
                seconds, _ = timed(implementation, samples)
                times[implementation].append(seconds)
            samples = make_workload(tokenizer, groups, g, side, 16, 256, next(seeds))
            equal &= timed("sdpa", samples)[1] == timed(NAME, samples)[1]
        a, b = times["sdpa"], times[NAME]
        print(f"{side} px, {groups} x G={g}: sdpa {', '.join(f'{t:.2f}' for t in a)} s; grouped "
              f"{', '.join(f'{t:.2f}' for t in b)} s; grouped vs sdpa {min(a) / min(b):.2f}x best, "
              f"{statistics.median(a) / statistics.median(b):.2f}x median; scores bitwise equal: {equal}")  # fmt: skip
    lm.set_attn_implementation(NAME)


if __name__ == "__main__":
    main()
