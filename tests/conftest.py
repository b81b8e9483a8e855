"""Shared fixtures: the tiny hub-format checkpoint, a model loaded from it (fp32, CPU), and a loader whose
models fail as a broken device would."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
from PIL import Image

from rewardplug import RewardModel
from rewardplug.testing import make_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-rm"), seed=0)


@pytest.fixture(scope="session")
def model(tiny_path):
    return RewardModel.from_pretrained(tiny_path, dtype="float32", device="cpu", image_roots=None)


@pytest.fixture
def broken_device(monkeypatch) -> str:
    """Every RewardModel loaded during the test fails its forward pass as a lost device would (a
    RuntimeError naming a CUDA fault, raised inside the model's own last norm): a system failure, never
    a bad sample. The error's text is returned, for asserts that it reached the user."""
    error = "CUDA error: an illegal memory access was encountered"
    load = RewardModel.from_pretrained.__func__

    def load_then_break(cls, *args, **kwargs):
        rm = load(cls, *args, **kwargs)

        def broken(*a, **k):
            raise RuntimeError(error)

        rm.backbone.language_model.norm.forward = broken
        return rm

    monkeypatch.setattr(RewardModel, "from_pretrained", classmethod(load_then_break))
    return error


@pytest.fixture
def make_engine(model):
    """Build RewardEngines over the session's model; each is closed (with a timeout) after the test."""
    from rewardplug import RewardEngine

    engines = []

    def make(**kwargs):
        engine = RewardEngine(model, **kwargs)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close(timeout=30)


def random_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4}[mode]
    return Image.fromarray((rng.random((height, width, channels)) * 255).astype("uint8"), mode)


@pytest.fixture
def images():
    return [random_image(100, 150, seed=1), random_image(200, 60, seed=2), random_image(64, 64, seed=3)]


def text_of_length(n: int, seed: int) -> str:
    """n characters of words (the tiny tokenizer is byte level: about n tokens)."""
    rng = random.Random(seed)
    words = ["red", "circle", "noise", "pixel", "blue", "the", "a", "picture", "shows", "maybe", "green"]
    out = ""
    while len(out) < n:
        out += rng.choice(words) + " "
    return out[:n]


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
