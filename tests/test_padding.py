"""A sample's score does not depend on the batch it is scored in, nor on the padding side."""

from __future__ import annotations

import pytest
from conftest import random_image

TOL = 1e-5


def mixed_samples() -> list[dict]:
    """Text-only and image samples of very different lengths (the tiny tokenizer: one token per byte)."""
    long_answer = "A long and winding answer. " * 12
    return [
        {"prompt": "Hi", "completion": "Hello."},
        {"prompt": "Describe.", "completion": "Noise.", "images": [random_image(56, 56, seed=1)]},
        {"prompt": "Tell me a story.", "completion": long_answer},
        {"prompt": "Compare them.", "completion": "The first is taller.",
         "images": [random_image(100, 150, seed=2), random_image(150, 100, seed=3)]},  # fmt: skip
        {"prompt": "Why?", "completion": "Because."},
        {"prompt": "Describe.", "completion": long_answer, "images": [random_image(140, 84, seed=4)]},
    ]


@pytest.mark.parametrize("side", ["right", "left"])
def test_batch_score_equals_score_alone(model, side):
    samples = mixed_samples()
    lengths = [model.encode(s).num_tokens for s in samples]
    assert max(lengths) > 4 * min(lengths), lengths  # the batch really is padded a lot
    previous = model.padding_side
    model.padding_side = side
    try:
        alone = [model.score([s])[0] for s in samples]
        batched = model.score(samples, batch_size=len(samples))
        small_batches = model.score(samples, batch_size=4)
    finally:
        model.padding_side = previous
    for i, (a, b, c) in enumerate(zip(alone, batched, small_batches)):
        assert b == pytest.approx(a, abs=TOL), f"sample {i} ({lengths[i]} tokens), {side} padding: {b} vs {a}"
        assert c == pytest.approx(a, abs=TOL), f"sample {i} ({lengths[i]} tokens), {side} padding: {c} vs {a}"


def test_left_and_right_padding_agree(model):
    samples = mixed_samples()
    previous = model.padding_side
    try:
        model.padding_side = "right"
        right = model.score(samples, batch_size=len(samples))
        model.padding_side = "left"
        left = model.score(samples, batch_size=len(samples))
    finally:
        model.padding_side = previous
    assert left == pytest.approx(right, abs=TOL)
    assert len({round(s, 4) for s in right}) == len(right), f"samples should score differently: {right}"


def test_scores_come_back_in_input_order(model):
    """Batches are sorted by length internally; the result follows the caller's order."""
    samples = mixed_samples()
    forward = model.score(samples, batch_size=3)
    backward = model.score(samples[::-1], batch_size=3)
    assert backward[::-1] == pytest.approx(forward, abs=TOL)
