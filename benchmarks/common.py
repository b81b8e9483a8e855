"""Shared pieces of the benchmarks: a CPU-sized model with the 7B's proportions, GRPO workloads,
peak-memory sampling and this machine's dense matmul FLOP/s."""

from __future__ import annotations

import random
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import psutil
import torch
from PIL import Image

from rewardplug.testing import make_tiny_checkpoint, tiny_config

# Proportions of Qwen2.5-VL-7B scaled for a 2-core CPU: the vision tower is about a tenth of the
# language model's transformer layers, and the vocabulary is the full 151,936 tokens (so the model
# card's full-vocabulary logits cost what they cost on the real model, relative to the rest).
BENCH_VOCAB = 151936


def bench_config() -> dict:
    return tiny_config(
        hidden_size=384, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=6,
        num_key_value_heads=2, max_window_layers=4, vocab_size=BENCH_VOCAB,
        rope_scaling={"mrope_section": [8, 12, 12], "rope_type": "default", "type": "default"},
        vision_config=dict(depth=3, hidden_size=128, intermediate_size=512, num_heads=2, out_hidden_size=384,
                           fullatt_block_indexes=[2]),
    )  # fmt: skip


def make_bench_checkpoint(path: Path) -> Path:
    # The 7B's own pixel bounds: qwen-vl-utils and the processor agree, so an image is resized once.
    return make_tiny_checkpoint(path, seed=0, config=bench_config(), max_pixels=12845056)


def param_split(model) -> dict:
    vision = sum(p.numel() for p in model.backbone.visual.parameters())
    lm = model.backbone.language_model
    layers = sum(p.numel() for p in lm.layers.parameters())
    return {"vision": vision, "lm_layers": layers, "embed": lm.embed_tokens.weight.numel()}


def make_image(side: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    # Smooth random image (like a photo) rather than noise: PNG-free, just pixels.
    small = rng.random((side // 16, side // 16, 3))
    return Image.fromarray((small * 255).astype("uint8")).resize((side, side), Image.BICUBIC)


WORDS = "the a red blue cat dog sits on mat and is near big small picture shows two one of in".split()


def text_of_tokens(n: int, rng: random.Random) -> str:
    """About n tokens for the byte-level tiny tokenizer (one token per byte)."""
    out = []
    while sum(len(w) + 1 for w in out) < n:
        out.append(rng.choice(WORDS))
    return " ".join(out)[:n]


def grpo_workload(prompts: int, group: int, side: int = 448, seed: int = 0, lo: int = 16, hi: int = 256) -> list:
    rng = random.Random(seed)
    samples = []
    for p in range(prompts):
        image = make_image(side, seed * 1000 + p)
        question = f"Question {p}: what does this picture show, and how many objects are there?"
        for _ in range(group):
            samples.append({"prompt": question, "completion": text_of_tokens(rng.randint(lo, hi), rng),
                            "images": [image]})  # fmt: skip
    return samples


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


def matmul_flops(seconds: float = 2.0, n: int = 2048) -> float:
    """Dense fp32 matmul FLOP/s of this machine (torch, all threads)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - t0)


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()
