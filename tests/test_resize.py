"""Pillow's bicubic resize as tensor operations (rewardplug.resize), and the encoder's resize on the device.

qwen-vl-utils resizes with ``PIL.Image.resize``; the reward model saw those bytes, so a resize done
elsewhere must give the same bytes, never merely close ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import random_image
from PIL import Image
from qwen_vl_utils import fetch_image

from rewardplug.resize import pillow_rule, resize_bicubic


def noise(w: int, h: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


SIZES = [((1024, 1024), (1036, 1036)), ((640, 480), (644, 476)), ((3000, 200), (1400, 84)), ((50, 70), (56, 84)),
         ((1920, 1080), (1932, 1092)), ((4000, 3000), (1288, 952)), ((17, 2000), (28, 1988)), ((264, 737), (607, 12)),
         ((552, 674), (461, 247)), ((593, 89), (594, 60)), ((448, 448), (448, 448)), ((300, 300), (300, 28))]  # fmt: skip


def test_the_installed_pillows_pass_order_is_reproduced():
    assert pillow_rule() is not None


@pytest.mark.parametrize("size, target", SIZES + [
    ((int(a), int(b)), (int(c), int(d))) for a, b, c, d in np.random.default_rng(7).integers(10, 700, (24, 4))])
def test_resize_gives_pillows_bytes(size, target):
    array = noise(*size, seed=sum(size) + sum(target))
    expected = np.asarray(Image.fromarray(array).resize(target))
    got = resize_bicubic(torch.from_numpy(array.copy()), target[1], target[0], pillow_rule())
    assert got.dtype == torch.uint8 and np.array_equal(got.numpy(), expected)


@pytest.fixture(scope="module")
def models(tiny_path):
    from rewardplug import RewardModel

    on_host = RewardModel.from_pretrained(tiny_path, dtype="float32", device="cpu")
    on_device = RewardModel.from_pretrained(tiny_path, dtype="float32", device="cpu", resize_on_device=True)
    assert not on_host.encoder.resize_on_device
    return on_host, on_device


@pytest.mark.parametrize("size, item", [((300, 200), {}), ((1000, 90), {}), ((64, 64), {}), ((500, 400), {"max_pixels": 28 * 28 * 30}),
                                        ((200, 300), {"min_pixels": 28 * 28 * 200}), ((333, 222), {"resized_height": 150, "resized_width": 100})])  # fmt: skip
def test_resize_on_device_gives_the_processors_pixels_and_the_host_never_resizes(models, monkeypatch, size, item):
    on_host, on_device = models
    image = random_image(*size, seed=sum(size))
    sample = {"messages": [{"role": "user", "content": [{"type": "image", "image": image, **item}, {"type": "text", "text": "What?"}]},
                           {"role": "assistant", "content": "A picture."}]}  # fmt: skip
    expected_pixels = on_host.image_processor(images=[fetch_image({"image": image, **item})], return_tensors="pt")["pixel_values"]
    resized = []
    real_resize = Image.Image.resize
    monkeypatch.setattr(Image.Image, "resize", lambda self, *a, **k: resized.append(self.size) or real_resize(self, *a, **k))
    encoded = on_device.encode(sample)
    assert resized == []  # the host only decoded and hashed the picture
    whole = encoded.pixels.parts[0][0]
    assert tuple(whole.shape) == (size[1], size[0], 3)  # the picture as it came, resized where the pixels are used
    monkeypatch.setattr(Image.Image, "resize", real_resize)
    assert torch.equal(encoded.pixel_values, expected_pixels)
    reference = on_host.encode(sample)
    assert torch.equal(encoded.input_ids, reference.input_ids) and encoded.image_digests == reference.image_digests
    assert on_device.score([sample]) == on_host.score([sample])  # the same bits in, the same score out


def test_resize_on_device_through_the_engine_gives_the_same_scores(models):
    from rewardplug import RewardEngine

    on_host, on_device = models
    pictures = [random_image(410, 300, seed=5), random_image(90, 500, seed=6)]
    samples = [{"prompt": f"Question {k % 2}?", "completion": "answer " * (k + 1), "images": [pictures[k % 2]]}
               for k in range(8)]  # fmt: skip
    with RewardEngine(on_device, metrics=None) as engine:
        got = engine.score(samples)
    expected = on_host.score(samples, batch_size=1)
    assert max(abs(a - b) for a, b in zip(got, expected)) <= 1e-5
    assert on_device.encoder.counters.images_resized >= 2 and on_host.encoder.pixel_cache.fast.enabled
