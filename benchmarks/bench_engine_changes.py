"""The engine's CPU changes of issue 21 (point 5), each switched off and on side by side in one run.

    python benchmarks/bench_engine_changes.py --group-size 1 --groups 16 --image-size 448
    python benchmarks/bench_engine_changes.py --group-size 8 --groups 2 --image-size 1024

Variants of the same engine on the same model (bench-cpu, fp32), each timed on fresh pictures, in turns
(``--repeats`` rounds; the best of each is reported, as the machine is shared):
  before     - every change below off (one vision pass for all images, Conv3d patch embedding,
               ``index_select`` for the prefix key/value rows);
  +passes    - the vision tower in passes of at most ``vision_patches_per_pass`` patches;
  +linear    - and the patch embedding as its matmul;
  after      - and the prefix key/value rows taken by indexing (the engine as committed);
and naive batches (one processor call and forward per group) as the reference of ``rewardplug bench``.
Every variant's scores are checked against the model alone.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

import rewardplug.model as model_module
from rewardplug import RewardEngine, named_models
from rewardplug.bench import card_way
from rewardplug.workload import make_workload

VARIANTS = {
    "before": dict(passes=False, linear=False, rows=False),
    "+passes": dict(passes=True, linear=False, rows=False),
    "+linear": dict(passes=True, linear=True, rows=False),
    "after": dict(passes=True, linear=True, rows=True),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--groups", type=int, default=2)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--image-size", type=int, default=448)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    rm = named_models.load(named_models.BENCH_CPU, dtype="float32", device="cpu", image_roots=None)
    tokenizer = rm.processor.tokenizer
    embed = rm.backbone.visual.patch_embed
    linear_forward, conv_forward = embed.forward, type(embed).forward.__get__(embed)
    patches = model_module.RewardModel.vision_patches_per_pass
    take_rows = model_module.take_rows
    G = args.group_size
    seed = [1000]

    def workload():
        seed[0] += 1
        return make_workload(tokenizer, args.groups, G, args.image_size, 16, 256, seed=seed[0])

    def switch(passes: bool, linear: bool, rows: bool) -> None:
        model_module.RewardModel.vision_patches_per_pass = patches if passes else property(lambda self: None)
        embed.forward = linear_forward if linear else conv_forward
        model_module.take_rows = take_rows if rows else (lambda t, r: t.index_select(0, r.to(t.device)))

    def engine(samples):
        with RewardEngine(rm, metrics=None) as e:
            return e.score(samples)

    _, naive_batch, _ = card_way(rm)

    def naive(samples):
        return [v for k in range(0, len(samples), G) for v in naive_batch(samples[k : k + G])]

    for name, options in VARIANTS.items():  # warm-up, other pictures
        switch(**options)
        engine(workload())
    naive(workload()[:G])
    rates: dict[str, list[float]] = {name: [] for name in ["naive", *VARIANTS]}
    diffs: dict[str, float] = {}
    loads = [os.getloadavg()[0]]
    for _ in range(args.repeats):
        for name in rates:
            samples = workload()
            if name != "naive":
                switch(**VARIANTS[name])
            t0 = time.perf_counter()
            got = naive(samples) if name == "naive" else engine(samples)
            rates[name].append(len(samples) / (time.perf_counter() - t0))
            if name not in diffs:
                switch(**VARIANTS["after"])
                reference = rm.score(samples, batch_size=1)
                diffs[name] = max(abs(a - b) for a, b in zip(got, reference))
        loads.append(os.getloadavg()[0])
        print("round:", ", ".join(f"{k} {v[-1]:.2f}" for k, v in rates.items()), f"(load {loads[-1]:.1f})", flush=True)
    switch(**VARIANTS["after"])
    best = {k: max(v) for k, v in rates.items()}
    print(f"bench-cpu, {args.groups} x G={G}, {args.image_size} px, best of {args.repeats}; "
          f"load average {min(loads):.1f}-{max(loads):.1f}")  # fmt: skip
    print(f"{'':10}{'samples/s':>10}{'vs naive':>10}{'vs before':>11}{'max|diff|':>11}   runs")
    for name, rate in best.items():
        print(f"{name:10}{rate:>10.2f}{rate / best['naive']:>9.2f}x{rate / best['before']:>10.2f}x"
              f"{diffs[name]:>11.1e}   {', '.join(f'{r:.2f}' for r in rates[name])}")  # fmt: skip


if __name__ == "__main__":
    main()
