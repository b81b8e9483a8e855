"""Image preprocessing matches the original stack, and every accepted image source gives the same score."""

from __future__ import annotations

import base64
import io

import pytest
import torch
from conftest import random_image
from PIL import Image
from qwen_vl_utils import fetch_image
from transformers import AutoImageProcessor

from rewardplug import RewardModel


def one_image_sample(image) -> dict:
    return {"prompt": "What is in the picture?", "completion": "Coloured noise.", "images": [image]}


def original_pixels(path, image: Image.Image, backend: str) -> torch.Tensor:
    """qwen-vl-utils' fetch_image (RGB + smart resize with PIL), then the checkpoint's image processor."""
    processor = AutoImageProcessor.from_pretrained(path, backend=backend)
    return processor(images=[fetch_image({"image": image})], return_tensors="pt")["pixel_values"]


@pytest.fixture(scope="module")
def torchvision_model(tiny_path):
    return RewardModel.from_pretrained(tiny_path, dtype="float32", device="cpu", image_backend="torchvision")


# ---- preprocessing ------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(333, 177), (56, 56), (150, 100), (30, 500)])
def test_pixels_equal_qwen_vl_utils_then_pil_processor(model, tiny_path, size):
    image = random_image(*size, seed=7)
    encoded = model.encode(one_image_sample(image))
    assert type(model.encoder.pixel_cache.image_processor).__name__ == "Qwen2VLImageProcessorPil"  # behind the pixel cache
    assert torch.equal(encoded.pixel_values, original_pixels(tiny_path, image, "pil"))


def test_torchvision_backend_uses_the_torchvision_processor(torchvision_model, tiny_path):
    processor = torchvision_model.encoder.pixel_cache.image_processor  # behind the pixel cache
    assert type(processor).__name__ == "Qwen2VLImageProcessor"
    assert "TorchvisionBackend" in [c.__name__ for c in type(processor).__mro__]
    image = random_image(333, 177, seed=7)
    encoded = torchvision_model.encode(one_image_sample(image))
    assert torch.equal(encoded.pixel_values, original_pixels(tiny_path, image, "torchvision"))


def test_pil_and_torchvision_pixels_after_qwen_vl_utils_resize(model, torchvision_model, tiny_path):
    """Both backends get an image that qwen-vl-utils already resized (with PIL) to multiples of 28, so
    neither resizes again: their pixels differ only by float rounding in rescale/normalize. Left to
    resize a raw image themselves, the two processors differ a lot (PIL vs torchvision bicubic)."""
    image = random_image(333, 177, seed=7)  # needs resizing: 333x177 -> 336x168
    pil = model.encode(one_image_sample(image)).pixel_values
    tv = torchvision_model.encode(one_image_sample(image)).pixel_values
    assert pil.shape == tv.shape
    diff = (pil - tv).abs().max().item()
    assert not torch.equal(pil, tv), "PIL and torchvision pixels are bitwise equal"
    assert diff < 1e-5, f"PIL vs torchvision pixels after fetch_image differ by {diff}"

    raw_pil = AutoImageProcessor.from_pretrained(tiny_path, backend="pil")(images=[image], return_tensors="pt")
    raw_tv = AutoImageProcessor.from_pretrained(tiny_path, backend="torchvision")(images=[image], return_tensors="pt")
    raw_diff = (raw_pil["pixel_values"] - raw_tv["pixel_values"]).abs().max().item()
    assert raw_diff > 0.05, f"processors resizing a raw image differ by only {raw_diff}"

    scores = [m.score([one_image_sample(image)])[0] for m in (model, torchvision_model)]
    assert scores[1] == pytest.approx(scores[0], abs=1e-4)


@pytest.mark.parametrize(
    ("size", "options", "grid"),
    [
        ((333, 177), {}, [1, 12, 24]),  # 168x336
        ((333, 177), {"max_pixels": 16 * 28 * 28}, [1, 4, 10]),  # 56x140
        ((56, 56), {}, [1, 4, 4]),  # 56x56, the minimum
        ((56, 56), {"min_pixels": 64 * 28 * 28}, [1, 16, 16]),  # scaled up to 224x224
    ],
)
def test_min_max_pixels_set_the_grid(tiny_path, size, options, grid):
    rm = RewardModel.from_pretrained(tiny_path, dtype="float32", device="cpu", **options)
    encoded = rm.encode(one_image_sample(random_image(*size, seed=8)))
    assert encoded.image_grid_thw.tolist() == [grid]
    assert encoded.num_patches == grid[0] * grid[1] * grid[2]
    image_tokens = int((encoded.mm_token_type_ids == 1).sum())
    assert image_tokens == grid[0] * grid[1] * grid[2] // 4


def test_extreme_aspect_ratio_is_an_invalid_sample(model):
    from rewardplug import InvalidSampleError

    with pytest.raises(InvalidSampleError, match=r"sample 0: image 0: .*aspect ratio"):
        model.score([one_image_sample(random_image(4000, 10))])


# ---- image sources ------------------------------------------------------------------------------


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_every_image_source_gives_the_same_score(model, tmp_path):
    image = random_image(150, 100, seed=9)
    data = png_bytes(image)
    file = tmp_path / "picture.png"
    file.write_bytes(data)
    sources = {
        "pil": image,
        "path_str": str(file),
        "path_obj": file,
        "file_uri": f"file://{file}",
        "data_uri": "data:image/png;base64," + base64.b64encode(data).decode(),
        "bytes": data,
        "datasets_bytes": {"bytes": data, "path": None},
        "datasets_path": {"bytes": None, "path": str(file)},
        "messages_image_url": None,  # filled below: an OpenAI-style image_url item
    }
    samples = {name: one_image_sample(src) for name, src in sources.items() if src is not None}
    samples["messages_image_url"] = {
        "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(file)}},
                                         {"type": "text", "text": "What is in the picture?"}]},  # fmt: skip
            {"role": "assistant", "content": "Coloured noise."},
        ]
    }
    scores = dict(zip(samples, model.score(list(samples.values()))))
    reference = scores["pil"]
    for name, score in scores.items():
        assert score == pytest.approx(reference, abs=1e-6), f"{name}: {score} vs PIL {reference}"
    other = model.score([one_image_sample(random_image(150, 100, seed=10))])[0]
    assert other != pytest.approx(reference, abs=1e-4), "a different image should score differently"


def test_rgba_is_composited_on_white(model):
    rgba = random_image(120, 80, seed=11, mode="RGBA")
    white = Image.new("RGB", rgba.size, (255, 255, 255))
    white.paste(rgba, mask=rgba.split()[3])
    black = Image.new("RGB", rgba.size, (0, 0, 0))
    black.paste(rgba, mask=rgba.split()[3])
    s_rgba, s_white, s_black = model.score([one_image_sample(im) for im in (rgba, white, black)])
    assert s_rgba == pytest.approx(s_white, abs=1e-6)
    assert s_rgba != pytest.approx(s_black, abs=1e-4)
    assert torch.equal(model.encode(one_image_sample(rgba)).pixel_values,
                       model.encode(one_image_sample(white)).pixel_values)  # fmt: skip


def test_rgba_png_bytes_are_composited_on_white(model):
    rgba = random_image(120, 80, seed=11, mode="RGBA")
    white = Image.new("RGB", rgba.size, (255, 255, 255))
    white.paste(rgba, mask=rgba.split()[3])
    s_bytes, s_white = model.score([one_image_sample(png_bytes(rgba)), one_image_sample(white)])
    assert s_bytes == pytest.approx(s_white, abs=1e-6)


def test_decompression_bomb_is_refused_before_decoding(model):
    from rewardplug import InvalidSampleError

    bomb = Image.new("1", (8200, 8200))  # 67.2 M pixels in an 8 kB PNG
    with pytest.raises(InvalidSampleError, match=r"sample 0: image 0: image of 8200x8200 pixels is over the limit"):
        model.score([one_image_sample(png_bytes(bomb))])


def test_line_wrapped_base64_data_uri_is_accepted(model):
    """MIME-style base64 (a newline every 76 characters, as base64.encodebytes and many tools write it)
    is read by qwen-vl-utils' fetch_image, so the model card's recipe scores such a sample; rewardplug
    decodes with b64decode(validate=True), which refuses the newlines ("data URI holds invalid base64")."""
    image = random_image(60, 60, seed=12)
    data = png_bytes(image)
    wrapped = "data:image/png;base64," + base64.encodebytes(data).decode()
    assert "\n" in wrapped
    assert fetch_image({"image": wrapped}).size == (56, 56)  # the original stack accepts it
    scores = model.score([one_image_sample(wrapped), one_image_sample(image)], on_invalid="none")
    assert scores[0] is not None, "line-wrapped base64 data URI refused"
    assert scores[0] == pytest.approx(scores[1], abs=1e-6)


def test_shared_images_are_preprocessed_once_with_the_same_pixels(model):
    """A GRPO group: G completions over copies of one picture (new objects each, as datasets hands
    them out) are preprocessed once; pixels equal those of a fresh processor call."""
    cache = model.encoder.pixel_cache
    image = random_image(120, 90, seed=11)
    samples = [{"prompt": "What is it?", "completion": "x" * (k + 1), "images": [image.copy()]} for k in range(6)]
    hits, misses = cache.hits, cache.misses
    encoded = [model.encode(s) for s in samples]
    assert cache.misses - misses <= 1 and cache.hits - hits >= 5
    from qwen_vl_utils import fetch_image

    expected = cache.image_processor([fetch_image({"image": image})], return_tensors="pt")["pixel_values"]
    assert all(torch.equal(e.pixel_values, expected) for e in encoded)
