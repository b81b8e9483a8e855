"""Shared pieces of the benchmarks: the CPU-sized model with the 7B's proportions, GRPO workloads,
peak-memory sampling and this machine's dense matmul FLOP/s.

The model config (``rewardplug.bench.bench_cpu_config``), the workload builder (``rewardplug.workload``)
and the matmul rate (``rewardplug.bench.measured_matmul_flops``) live in the package, once, so
``rewardplug bench``, these scripts and ``gpu_check.py`` build the same things."""

from __future__ import annotations

import functools
import random
import threading
from contextlib import contextmanager
from pathlib import Path

import psutil
import torch

from rewardplug import workload
from rewardplug.bench import bench_cpu_config, measured_matmul_flops
from rewardplug.testing import cached_tiny_checkpoint, make_tiny_checkpoint

BENCH_VOCAB = 151936
make_image = workload.make_image


def bench_config() -> dict:
    return bench_cpu_config()


def make_bench_checkpoint(path: Path) -> Path:
    # The 7B's own pixel bounds: qwen-vl-utils and the processor agree, so an image is resized once.
    return make_tiny_checkpoint(path, seed=0, config=bench_config(), max_pixels=12845056)


def param_split(model) -> dict:
    vision = sum(p.numel() for p in model.backbone.visual.parameters())
    lm = model.backbone.language_model
    layers = sum(p.numel() for p in lm.layers.parameters())
    return {"vision": vision, "lm_layers": layers, "embed": lm.embed_tokens.weight.numel()}


@functools.lru_cache(maxsize=1)
def tokenizer():
    """The tokenizer of the tiny and bench-cpu checkpoints (byte level, the Qwen special tokens)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(cached_tiny_checkpoint())


def text_of_tokens(n: int, rng: random.Random) -> str:
    """Exactly n tokens of words for the bench checkpoints' tokenizer."""
    return workload.text_of_tokens(tokenizer(), n, rng)


def grpo_workload(prompts: int, group: int, side: int = 448, seed: int = 0, lo: int = 16, hi: int = 256) -> list:
    """``prompts`` groups of ``group`` answers (lo..hi tokens), one fresh side x side picture per group."""
    return workload.make_workload(tokenizer(), prompts, group, side, lo, hi, seed)


class PeakRSS:
    """Peak resident memory of this process during a block, sampled every 10 ms."""

    def __init__(self):
        self.peak = 0

    @contextmanager
    def measure(self):
        proc = psutil.Process()
        self.peak = proc.memory_info().rss
        stop = threading.Event()

        def sample():
            while not stop.wait(0.01):
                self.peak = max(self.peak, proc.memory_info().rss)

        t = threading.Thread(target=sample, daemon=True)
        t.start()
        try:
            yield self
        finally:
            stop.set()
            t.join()
            self.peak = max(self.peak, proc.memory_info().rss)


def matmul_flops(seconds: float = 2.0) -> float:
    """Dense fp32 matmul FLOP/s of this machine (torch, all threads)."""
    return measured_matmul_flops(torch.device("cpu"), torch.float32, seconds)


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def engine_batches_directly(rm, samples: list, max_batch_tokens: int = 16384) -> list:
    """The engine's own encoding, planning and batches (its default budgets), run by a ModelRunner on
    the calling thread: no threads, queues or futures. Returns the runner's (item, score) results."""
    from rewardplug.engine.caches import VisionCache
    from rewardplug.engine.runner import ModelRunner
    from rewardplug.engine.scheduler import make_item, make_units, plan_batches
    from rewardplug.engine.stats import Stats

    encoded, _ = rm.encode_many(samples)
    items = [make_item(e, rm.turn_start_token_id) for e in encoded]
    runner = ModelRunner(rm, VisionCache(2**30), Stats(), max_kv_tokens=max_batch_tokens)
    plans = plan_batches(make_units(items, True), max_batch_tokens, 64, max_batch_tokens)
    return [result for plan in plans for result in runner.run(plan.units)]


def in_thread(function):
    """Run ``function`` on a new thread, as the engine runs its model, and return its result."""
    out = {}
    worker = threading.Thread(target=lambda: out.setdefault("result", function()))
    worker.start()
    worker.join()
    return out["result"]
