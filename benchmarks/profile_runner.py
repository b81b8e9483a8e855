"""Where the engine's model time goes: ``torch.profiler`` over the engine's runner on one workload.

    python benchmarks/profile_runner.py --image-size 1024 --group-size 16 [--threads 1]

The runner (``rewardplug.engine.runner.ModelRunner``) runs the engine's own batches (the engine's planner
and budgets) on bench-cpu in fp32, on the main thread, once to warm up and once profiled on fresh
pictures. Prints the operators by self time, and the attention calls by input shape (which passes they
belong to: a prefix pass has no mask and batch = prompts, a suffix pass a mask and batch = answer rows,
the vision tower's calls have 2 heads and no mask).
"""

from __future__ import annotations

import argparse

import torch
from common import engine_batches_directly
from torch.profiler import ProfilerActivity, profile

from rewardplug import named_models
from rewardplug.workload import make_workload

ATTENTION = "aten::_scaled_dot_product_flash_attention_for_cpu"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image-size", type=int, default=448)
    p.add_argument("--groups", type=int, default=2)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--max-batch-tokens", type=int, default=16384, help="the engine's default")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rm = named_models.load(named_models.BENCH_CPU, dtype="float32", device="cpu", image_roots=None)
    tokenizer = rm.processor.tokenizer

    def run(seed: int) -> None:
        samples = make_workload(tokenizer, args.groups, args.group_size, args.image_size, 16, 256, seed)
        engine_batches_directly(rm, samples, args.max_batch_tokens)

    run(1)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        run(2)
    averages = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in averages)
    print(f"bench-cpu, {args.image_size} px, {args.groups} x G={args.group_size}, {args.threads} torch threads: "
          f"{total / 1e6:.2f} s of operator time")  # fmt: skip
    for e in sorted(averages, key=lambda e: -e.self_cpu_time_total)[:12]:
        print(f"{e.key:52}{e.self_cpu_time_total / total:7.1%}{e.count:7d} calls")
    print("\nattention calls by input shape (query, key, value, ..., mask):")
    shapes = [e for e in prof.key_averages(group_by_input_shape=True) if e.key == ATTENTION]
    for e in sorted(shapes, key=lambda e: -e.self_cpu_time_total)[:10]:
        print(f"{e.self_cpu_time_total / total:7.1%}{e.count:6d} calls  {str(e.input_shapes)[:100]}")


if __name__ == "__main__":
    main()
