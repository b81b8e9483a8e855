"""Every content digest covers the whole of its content: inputs that differ only far from their start get
their own keys and, through the encoder's and the engine's caches, their own scores.

Cache keys are where a wrong reward hides: a digest that read only an image's first kilobyte, or a prompt
key cut short, would hand one picture's or prompt's pixels, tokens, vision features or prefix key/value to
another, and every score would still look plausible. So each digest is checked on two inputs equal but
for their very end (one pixel in the last row of a 448x448 image, the last character of a long prompt or
answer), and the engine's scores are checked against the model card's own computation (test_parity's
reference, which shares nothing), with the two scores far enough apart that sharing would show.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from test_parity import build_reference, card_score

from rewardplug.encoding.digests import digest, prompt_key, source_key
from rewardplug.images import image_digest

TOL = 1e-5
APART = 10 * TOL  # the two inputs' true scores differ by more than this, so a shared result cannot pass
SIDE = 448  # a multiple of 28 within every bound: no resize, the last row reaches the pixels as it is


@pytest.fixture(scope="module")
def reference(tiny_path):
    return build_reference(tiny_path)


def last_row_twins(seed: int, mode: str = "RGB") -> tuple[Image.Image, Image.Image]:
    """Two images equal but for the last pixel of the last row (every channel flipped)."""
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    a = np.random.default_rng(seed).integers(0, 256, (SIDE, SIDE, channels), dtype=np.uint8)
    b = a.copy()
    b[-1, -1] = 255 - b[-1, -1]
    squeeze = (lambda x: x[..., 0]) if channels == 1 else (lambda x: x)
    return Image.fromarray(squeeze(a), mode), Image.fromarray(squeeze(b), mode)


def tail_twins(n: int, seed: int) -> tuple[str, str]:
    """Two texts of n characters equal but for the last one."""
    rng = np.random.default_rng(seed)
    words = ["red", "circle", "noise", "pixel", "blue", "the", "a", "picture", "shows", "green"]
    text = ""
    while len(text) < n:
        text += words[int(rng.integers(len(words)))] + " "
    text = text[: n - 1]
    return text + "x", text + "y"


def messages(image: Image.Image | None, question: str, answer: str) -> list[dict]:
    content = ([{"type": "image", "image": image}] if image is not None else []) + [{"type": "text", "text": question}]
    return [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]


# ---- the digests themselves ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_image_digest_tells_apart_images_that_differ_only_in_the_last_pixel(mode):
    a, b = last_row_twins(seed=11, mode=mode)
    assert len(a.tobytes()) > 100 * 1024  # the difference lies far beyond the first kilobytes
    assert image_digest(a) != image_digest(b)
    assert image_digest(a) == image_digest(a.copy())  # and stays a content digest


def test_image_digest_tells_apart_the_same_bytes_in_another_size():
    data = np.random.default_rng(12).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    assert image_digest(Image.fromarray(data)) != image_digest(Image.fromarray(data.reshape(4, 16, 3)))


def test_digest_source_key_and_prompt_key_cover_their_whole_content():
    long_a, long_b = tail_twins(5000, seed=13)
    assert digest(long_a, ("min_pixels", "1")) != digest(long_b, ("min_pixels", "1"))
    a, b = last_row_twins(seed=14)
    png_a, png_b = png(a), png(b)
    assert source_key(png_a) != source_key(png_b)
    assert source_key({"bytes": png_a}) != source_key({"bytes": png_b})
    assert source_key("/data/" + long_a) != source_key("/data/" + long_b)
    answer = {"role": "assistant", "content": "fine"}
    key_a = prompt_key(messages(None, long_a, "")[:1], answer, [], [])
    key_b = prompt_key(messages(None, long_b, "")[:1], answer, [], [])
    assert key_a != key_b
    image_a = prompt_key(messages(a, "same", "")[:1], answer, [a], [image_digest(a)])
    image_b = prompt_key(messages(b, "same", "")[:1], answer, [b], [image_digest(b)])
    assert image_a != image_b


def test_transport_keys_cover_the_whole_prompt_and_image():
    from rewardplug.serving.transport import externalize, group_key

    long_a, long_b = tail_twins(5000, seed=15)
    assert group_key({"messages": messages(None, long_a, "same")}) != group_key({"messages": messages(None, long_b, "same")})
    ids = list(range(2000))
    assert group_key({"input_ids": ids + [1]}) != group_key({"input_ids": ids + [2]})
    a, b = last_row_twins(seed=16)
    refs = []
    for image in (a, b, np.asarray(a), np.asarray(b), png(a), png(b)):
        (sample,) = externalize([{"messages": messages(image, "same", "same")}], put=lambda value: value)
        refs.append(sample["messages"][0]["content"][0]["image"].key)
    assert refs[0] != refs[1] and refs[2] != refs[3] and refs[4] != refs[5]


# ---- through the encoder and the engine ---------------------------------------------------------


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_encoder_gives_images_that_differ_in_the_last_row_their_own_digest_and_pixels(model):
    a, b = last_row_twins(seed=21)
    for pair in ((a, b), (png(a), png(b))):  # decoded images, and byte sources shared within a request
        encoded, errors = model.encode_many([{"messages": messages(im, "What is it?", "Noise.")} for im in pair])
        assert not errors
        assert encoded[0].image_digests != encoded[1].image_digests
        assert not np.array_equal(encoded[0].pixel_values.numpy(), encoded[1].pixel_values.numpy())
    later, _ = model.encode_many([{"messages": messages(b, "What is it?", "Noise.")}])  # a's pixels are cached
    assert np.array_equal(later[0].pixel_values.numpy(), encoded[1].pixel_values.numpy())


def test_engine_scores_images_that_differ_in_the_last_row_apart(make_engine, reference):
    a, b = last_row_twins(seed=31)
    samples = [messages(a, "What is in the picture?", "Noise."), messages(b, "What is in the picture?", "Noise.")]
    expected = [card_score(reference, m) for m in samples]
    assert abs(expected[0] - expected[1]) > APART
    engine = make_engine()
    together = engine.score([{"messages": m} for m in samples], timeout=120)
    assert together == pytest.approx(expected, abs=TOL)
    # Each again on its own, in later requests: the pixel and vision caches now hold both images.
    for m, want in zip(samples[::-1], expected[::-1]):
        assert engine.score([{"messages": m}], timeout=120)[0] == pytest.approx(want, abs=TOL)
    # And a fresh pair, b first, in separate requests: b's entries are made before a's are looked up.
    c, d = last_row_twins(seed=32)
    later = [messages(d, "What is in the picture?", "Noise."), messages(c, "What is in the picture?", "Noise.")]
    for m in later:
        assert engine.score([{"messages": m}], timeout=120)[0] == pytest.approx(card_score(reference, m), abs=TOL)


def test_engine_scores_prompts_that_differ_only_at_their_end_apart(make_engine, reference):
    """Two prompt groups (the same image, questions of 1,500 characters equal but for the last one), two
    completions each: each group shares its own prompt tokens (encoder) and prefix key/value (engine)."""
    image, _ = last_row_twins(seed=41)
    qa, qb = tail_twins(1500, seed=42)
    samples = [messages(image, q, answer) for q in (qa, qb) for answer in ("Noise.", "Colours.")]
    expected = [card_score(reference, m) for m in samples]
    assert abs(expected[0] - expected[2]) > APART and abs(expected[1] - expected[3]) > APART
    engine = make_engine()
    assert engine.score([{"messages": m} for m in samples], timeout=300) == pytest.approx(expected, abs=TOL)
    assert engine.stats()["prefix_hits"] > 0  # the groups did share their prompts (each its own)
    assert engine.score([{"messages": m} for m in samples[2:]], timeout=300) == pytest.approx(expected[2:], abs=TOL)


def test_engine_scores_answers_that_differ_only_at_their_end_apart(make_engine, reference):
    """Completions equal but for their last character (1,500 characters long) are not duplicates."""
    image, _ = last_row_twins(seed=51)
    aa, ab = tail_twins(1500, seed=52)
    samples = [messages(image, "Describe it.", answer) for answer in (aa, ab)]
    expected = [card_score(reference, m) for m in samples]
    assert abs(expected[0] - expected[1]) > APART
    engine = make_engine()
    assert engine.score([{"messages": m} for m in samples], timeout=300) == pytest.approx(expected, abs=TOL)
