"""GRPO-like workloads for benchmarks and checks, built in one place.

A workload is ``groups`` prompts, each with one fresh picture of ``side`` x ``side`` pixels and a
question, and ``group_size`` answers of ``lo``..``hi`` tokens each (counted with the model's own
tokenizer). A seed fixes everything; different seeds give different pictures, so a timed run never
meets a picture a warm-up cached. Used by ``rewardplug bench``, ``benchmarks/`` and
``benchmarks/gpu_check.py``.
"""

from __future__ import annotations

import random

WORDS = "the a red blue cat dog sits on mat and is near big small picture shows two one of in".split()


def make_image(side: int, seed: int):
    """A smooth random picture (like a photo, unlike noise) of side x side pixels."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = rng.random((max(2, side // 16), max(2, side // 16), 3))
    return Image.fromarray((small * 255).astype("uint8")).resize((side, side), Image.BICUBIC)


def text_of_tokens(tokenizer, n: int, rng: random.Random) -> str:
    """Words that are exactly ``n`` tokens for ``tokenizer`` (cut at a token boundary)."""
    text = ""
    while len(tokenizer.encode(text, add_special_tokens=False)) < n:
        text += " ".join(rng.choice(WORDS) for _ in range(max(1, n // 2))) + " "
    return tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)[:n])


def make_workload(tokenizer, groups: int, group_size: int, side: int, lo: int, hi: int, seed: int) -> list[dict]:
    """GRPO-like samples: per group one fresh picture and question, ``group_size`` answers of lo..hi
    tokens; the group's samples hold the same picture object."""
    rng = random.Random(seed)
    samples = []
    for g in range(groups):
        image = make_image(side, seed * 7919 + g)
        question = f"Question {seed}-{g}: what does this picture show, and how many objects are there?"
        for _ in range(group_size):
            samples.append({"prompt": question, "completion": text_of_tokens(tokenizer, rng.randint(lo, hi), rng),
                            "images": [image]})  # fmt: skip
    return samples
