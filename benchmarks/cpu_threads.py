"""The engine's model thread on a CPU, and ``RewardEngine(cpu_cores=...)``: shared against dedicated.

    python benchmarks/cpu_threads.py              # nothing else running
    python benchmarks/cpu_threads.py --busy 2     # with 2 busy-looping processes on the cores
    python benchmarks/cpu_threads.py --groups 16 --group-size 1   # G=1: nothing shared

1. The mechanism, one kernel: an elementwise multiply (1500 x 1536 fp32) timed on the main thread, on
   another thread while the main thread keeps its idle OpenMP workers, and on another thread after the
   main thread freed them (``rewardplug.engine.openmp.free_idle_workers``). libgomp throttles its
   workers' spinning while it manages more threads than there are cores, so the second is the slow one.
2. The engine: bench-cpu, 448 px, 4 prompts x G=8 by default (fresh pictures each time), ``RewardEngine.score``
   with ``cpu_cores="shared"`` and ``"dedicated"``, alternated, best of 3 and median; the same batches
   run directly on the main thread beside them. Each engine is fresh (no cache carries over).

On a GPU the host thread only queues kernels; none of this applies there.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time

import torch
from common import engine_batches_directly, in_thread

from rewardplug import RewardEngine, named_models
from rewardplug.engine.openmp import free_idle_workers
from rewardplug.workload import make_workload


def busy_loop() -> None:
    while True:
        pass


def kernel_us(x: torch.Tensor, n: int = 300) -> float:
    for _ in range(5):
        x * x
    start = time.perf_counter()
    for _ in range(n):
        x * x
    return (time.perf_counter() - start) / n * 1e6


def one_kernel() -> None:
    x = torch.randn(1500, 1536)
    main, kept, freed = [], [], []
    for _ in range(3):
        main.append(kernel_us(x))  # the main thread now holds its workers
        kept.append(in_thread(lambda: kernel_us(x)))
        free_idle_workers()
        freed.append(in_thread(lambda: kernel_us(x)))
    print(f"1. one elementwise kernel, {torch.get_num_threads()} torch threads (us, best of 3):")
    print(f"   main thread {min(main):.0f}; another thread, main's idle workers kept {min(kept):.0f} "
          f"({min(kept) / min(main):.2f}x), freed {min(freed):.0f} ({min(freed) / min(main):.2f}x)")  # fmt: skip


def engine_side_by_side(rounds: int, groups: int, group_size: int) -> None:
    rm = named_models.load(named_models.BENCH_CPU, dtype="float32", device="cpu", image_roots=None)
    tokenizer = rm.processor.tokenizer
    seeds = iter(range(100, 10_000))

    def fresh():
        return make_workload(tokenizer, groups, group_size, 448, 16, 256, next(seeds))

    def engine(cpu_cores: str) -> float:
        samples = fresh()
        start = time.perf_counter()
        with RewardEngine(rm, cpu_cores=cpu_cores, metrics=None) as e:
            e.score(samples)
        return time.perf_counter() - start

    def direct() -> float:
        samples = fresh()
        start = time.perf_counter()
        engine_batches_directly(rm, samples)
        return time.perf_counter() - start

    engine("shared"), engine("dedicated"), direct()  # warm-up
    times: dict[str, list[float]] = {"shared": [], "dedicated": [], "direct, main thread": []}
    for _ in range(rounds):
        times["direct, main thread"].append(direct())
        times["shared"].append(engine("shared"))
        times["dedicated"].append(engine("dedicated"))
    print(f"2. RewardEngine.score, bench-cpu, 448 px, {groups} x G={group_size} ({groups * group_size} samples), seconds:")
    base = min(times["direct, main thread"])
    for name, ts in times.items():
        print(f"   {name:22}{' '.join(f'{t:6.2f}' for t in ts)}   best {min(ts):.2f} ({min(ts) / base:.2f}x direct)"
              f"  median {statistics.median(ts):.2f}")  # fmt: skip
    print(f"   dedicated vs shared: {min(times['shared']) / min(times['dedicated']):.2f}x (best), "
          f"{statistics.median(times['shared']) / statistics.median(times['dedicated']):.2f}x (median)")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--busy", type=int, default=0, help="busy-looping processes on the cores meanwhile")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--group-size", type=int, default=8, help="G; at 1 nothing is shared and the direct calls are "
                   "what naive batches do, one sample per pass")
    args = p.parse_args()
    busy = [multiprocessing.Process(target=busy_loop, daemon=True) for _ in range(args.busy)]
    for process in busy:
        process.start()
    try:
        print(f"{args.busy} busy processes beside this one")
        one_kernel()
        engine_side_by_side(args.rounds, args.groups, args.group_size)
    finally:
        for process in busy:
            process.terminate()


if __name__ == "__main__":
    main()
