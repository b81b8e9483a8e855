"""How much of the CPU's matmul peak can scoring bench-cpu reach at all? The ceiling the engine's MFU is
measured against, taken apart.

    python benchmarks/cpu_ceiling.py [--image-size 448] [--compile]

``rewardplug bench`` reports MFU as useful FLOPs / wall time / a 2048 x 2048 fp32 matmul's rate. This
script measures, in one run, on the main thread:

1. the peak: that same 2048-square matmul;
2. the model's own linear layers at their own shapes: every ``nn.Linear`` of one language-model layer on
   one sample's tokens, and of one vision block on one image's patches, timed with nothing else around
   them. bench-cpu is the 7B's proportions at a CPU's size (hidden 384, vision hidden 128), so its matmuls
   are narrow and reach only part of the square matmul's rate; the 7B's (hidden 3584) are not;
3. the model alone: ``RewardModel.forward`` of one encoded sample per pass (vision tower in the pass), its
   useful FLOPs (``rewardplug.bench.useful_flops``) over its time: the MFU of the model with no engine,
   no sharing and no padding, on the thread torch's kernels like best;
4. with ``--compile``: the same passes with each language-model layer and vision block compiled
   (``torch.compile(dynamic=True)``, regional), and the largest score difference: what fusing the
   elementwise work (norms, rotary, SiLU) could gain. Compiling takes about a minute here.

The engine cannot beat 3 per FLOP it runs (it only avoids FLOPs, and useful FLOPs count shared work once
for every method), so when 3 is under a target the target needs faster kernels, not engine work.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from torch import nn

from rewardplug import named_models, workload
from rewardplug.bench import measured_matmul_flops, useful_flops
from rewardplug.encoding import collate


def linear_rate(module: nn.Module, rows: int, repeats: int = 20) -> tuple[float, float]:
    """(FLOP/s, FLOPs per call) of every nn.Linear in ``module`` applied to ``rows`` random rows."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    inputs = [torch.randn(rows, m.in_features) for m in linears]
    flops = sum(2 * rows * m.in_features * m.out_features for m in linears)

    def once():
        for m, x in zip(linears, inputs):
            nn.functional.linear(x, m.weight, m.bias)

    with torch.inference_mode():
        once()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            once()
            times.append(time.perf_counter() - t0)
    return flops / statistics.median(times), flops


def forward_rate(rm, encoded, im_start: int, rounds: int = 3) -> tuple[float, list[float]]:
    """(useful FLOP/s, scores) of the model alone, one sample per pass (best of ``rounds``)."""
    flops = useful_flops(rm, encoded, im_start)
    batches = [collate([e], rm.pad_token_id) for e in encoded]
    scores = [float(rm.forward(b)[0]) for b in batches]  # warm-up
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for b in batches:
            rm.forward(b)
        best = min(best, time.perf_counter() - t0)
    return flops / best, scores


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image-size", type=int, default=448)
    p.add_argument("--samples", type=int, default=6, help="samples of the G=1 workload passed one by one")
    p.add_argument("--compile", action="store_true", help="also time regionally compiled layers")
    args = p.parse_args()

    rm = named_models.load(named_models.BENCH_CPU, dtype="float32", device="cpu", image_roots=None)
    tokenizer = rm.processor.tokenizer
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    encoded, _ = rm.encode_many(workload.make_workload(tokenizer, args.samples, 1, args.image_size, 16, 256, 4242))
    tokens = round(statistics.mean(e.num_tokens for e in encoded))
    patches = int(encoded[0].image_grid_thw.prod())

    peak = measured_matmul_flops(torch.device("cpu"), torch.float32)
    lm_rate, lm_flops = linear_rate(rm.backbone.language_model.layers[0], tokens)
    vis_rate, vis_flops = linear_rate(rm.backbone.visual.blocks[0], patches)
    model_rate, scores = forward_rate(rm, encoded, im_start)
    load = os.getloadavg()[0]

    print(f"bench-cpu, {args.image_size} px, fp32, {torch.get_num_threads()} torch threads, load {load:.1f}")
    print(f"{'':58}{'TFLOP/s':>9}{'of peak':>9}")
    rows = [
        ("dense 2048 x 2048 matmul (the MFU denominator)", peak),
        (f"language-model layer's linears, {tokens} tokens", lm_rate),
        (f"vision block's linears, {patches} patches", vis_rate),
        (f"model alone, one sample per pass (useful FLOPs)", model_rate),
    ]
    if args.compile:
        t0 = time.perf_counter()
        for block in [*rm.backbone.language_model.layers, *rm.backbone.visual.blocks]:
            block.compile(dynamic=True)
        forward_rate(rm, encoded[:1], im_start, rounds=1)
        compiled_rate, compiled_scores = forward_rate(rm, encoded, im_start)
        diff = max(abs(a - b) for a, b in zip(scores, compiled_scores))
        rows.append((f"model alone, layers compiled (max |diff| {diff:.1e})", compiled_rate))
        print(f"(compiling took {time.perf_counter() - t0:.0f} s)")
    for label, rate in rows:
        print(f"{label:58}{rate / 1e12:9.3f}{rate / peak:9.1%}")
    print(f"\nper linear call: {lm_flops / 1e9:.2f} GFLOP (language layer), {vis_flops / 1e9:.2f} GFLOP (vision block)")


if __name__ == "__main__":
    main()
