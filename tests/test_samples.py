"""Bad samples are refused with a reason that names the sample; good ones around them still score."""

from __future__ import annotations

import pickle
from contextlib import contextmanager

import pytest
from conftest import random_image

from rewardplug import ImagePolicy, InvalidSampleError, RewardModel

GOOD_TEXT = {"prompt": "Hi", "completion": "Hello."}


def good_image_sample(seed: int = 1) -> dict:
    return {"prompt": "Describe.", "completion": "Noise.", "images": [random_image(84, 56, seed=seed)]}


@contextmanager
def count_forward_calls(model):
    """Counts forward passes of the language model and the vision tower with real torch hooks (no mocking)."""
    calls = []
    modules = (model.backbone.language_model, model.backbone.visual)
    handles = [m.register_forward_pre_hook(lambda module, args: calls.append(type(module).__name__)) for m in modules]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def assert_refused(model, sample, pattern: str) -> InvalidSampleError:
    """The sample, put at index 1 after a good one, is refused with a message matching ``pattern``."""
    with pytest.raises(InvalidSampleError, match=r"1 invalid sample:\n  sample 1: " + pattern) as e:
        model.score([GOOD_TEXT, sample])
    assert list(e.value.errors) == [1]
    assert e.value.index == 1
    return e.value


# ---- each kind of bad sample --------------------------------------------------------------------


def test_missing_completion(model):
    assert_refused(model, {"prompt": "Hi"}, r"sample has no 'completion' \(the answer to score\)")


def test_missing_prompt(model):
    assert_refused(model, {"completion": "Hello."}, r"sample has no 'prompt'")


def test_neither_messages_nor_prompt(model):
    assert_refused(model, {"text": "Hi"}, r"sample needs 'messages', or 'prompt' and 'completion' \(keys: \['text'\]\)")


def test_conversation_not_ending_with_the_assistant(model):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "And?"}]  # fmt: skip
    pattern = r"the conversation must end with the assistant's answer; the last message has role 'user'"
    assert_refused(model, {"messages": messages}, pattern)


@pytest.mark.parametrize(("sample", "type_name"), [("Hi", "str"), (["Hi", "Hello"], "list"), (None, "NoneType")])
def test_not_a_dict(model, sample, type_name):
    assert_refused(model, sample, rf"a sample must be a dict or rewardplug\.Sample, got {type_name}")


def test_unreadable_image_bytes(model):
    sample = {"prompt": "Describe.", "completion": "Noise.", "images": [b"this is not an image"]}
    assert_refused(model, sample, r"image 0: image bytes could not be decoded as an image")


def test_data_uri_with_bad_base64(model):
    sample = {"prompt": "Describe.", "completion": "Noise.", "images": ["data:image/png;base64,@@not*base64@@"]}
    assert_refused(model, sample, r"image 0: data URI holds invalid base64")


def test_data_uri_that_is_not_an_image_uri(model):
    sample = {"prompt": "Describe.", "completion": "Noise.", "images": ["data:text/plain,hello"]}
    assert_refused(model, sample, r"image 0: data URI must look like 'data:image/<type>;base64,<data>'")


def test_image_path_outside_allowed_roots(tiny_path, tmp_path):
    allowed, elsewhere = tmp_path / "allowed", tmp_path / "elsewhere"
    image = random_image(84, 56, seed=3)
    for folder, name in ((allowed, "ok.png"), (elsewhere, "secret.png")):
        folder.mkdir()
        image.save(folder / name)
    rm = RewardModel.from_pretrained(tiny_path, dtype="float32", device="cpu", image_roots=[allowed])
    inside = {"prompt": "Describe.", "completion": "Noise.", "images": [str(allowed / "ok.png")]}
    escape = str(allowed / ".." / "elsewhere" / "secret.png")  # lexically inside, really outside
    (allowed / "link.png").symlink_to(elsewhere / "secret.png")  # a symlink inside pointing outside
    outside = [str(elsewhere / "secret.png"), escape, f"file://{elsewhere / 'secret.png'}", str(allowed / "link.png")]
    for path in outside:
        error = assert_refused(rm, {**inside, "images": [path]}, r"image 0: image path .* is outside the allowed")
        assert "image_roots" in str(error)
    assert rm.score([inside]) == pytest.approx(rm.score([{**inside, "images": [image]}]), abs=1e-6)


def test_in_process_default_reads_any_readable_path(tiny_path, tmp_path, monkeypatch):
    """The in-process API trusts its caller (as the model card's qwen-vl-utils code does): an absolute
    path outside the working directory is read unless the caller gives image_roots."""
    (tmp_path / "cwd").mkdir()
    random_image(84, 56, seed=3).save(tmp_path / "outside.png")
    monkeypatch.chdir(tmp_path / "cwd")
    assert ImagePolicy().local_roots is None
    rm = RewardModel.from_pretrained(tiny_path, dtype="float32", device="cpu")
    sample = {"prompt": "Describe.", "completion": "Noise.", "images": [str(tmp_path / "outside.png")]}
    assert rm.score([sample]) == pytest.approx(rm.score([{**sample, "images": [random_image(84, 56, seed=3)]}]), abs=1e-6)
    restricted = RewardModel.from_pretrained(tiny_path, dtype="float32", device="cpu", image_roots=[tmp_path / "cwd"])
    assert_refused(restricted, sample, r"image 0: image path .* is outside the allowed image roots")


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/cat.png", "https://example.com/cat.png"])
def test_http_url_refused_by_default(model, url):
    """The policy refuses before any request: port 9 (discard) or a DNS lookup would fail differently."""
    sample = {"prompt": "Describe.", "completion": "Noise.", "images": [url]}
    assert_refused(model, sample, r"image 0: image URL host '[^']+' is not allowed; fetching URLs is off")


def test_image_url_item_in_messages_refused_by_default(model):
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
                                             {"type": "text", "text": "Describe."}]},
                {"role": "assistant", "content": "Noise."}]  # fmt: skip
    assert_refused(model, {"messages": messages}, r"image 0: image URL host 'example\.com' is not allowed")


def test_image_file_that_does_not_exist(model, tmp_path):
    missing = tmp_path / "missing.png"
    sample = {"prompt": "Describe.", "completion": "Noise.", "images": [str(missing)]}
    assert_refused(model, sample, rf"image 0: image file '{missing}' does not exist or cannot be read")


def test_longer_than_max_length(model, tiny_path):
    rm = RewardModel.from_pretrained(tiny_path, dtype="float32", device="cpu", max_length=100)
    long = {"prompt": "Hi", "completion": "x" * 200}
    n = model.encode(long).num_tokens  # the same tokenizer, no limit
    assert rm.encode(GOOD_TEXT).num_tokens <= 100 < n
    assert_refused(rm, long, rf"sample has {n} tokens, over max_length=100")


def test_image_tokens_count_toward_max_length(model, tiny_path):
    rm = RewardModel.from_pretrained(tiny_path, dtype="float32", device="cpu", max_length=100)
    sample = {"prompt": "Hi", "completion": "Hello.", "images": [random_image(280, 280, seed=2)]}  # 100 image tokens
    n = model.encode(sample).num_tokens
    assert_refused(rm, sample, rf"sample has {n} tokens, over max_length=100")


def test_image_placeholder_count_mismatch(model):
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare."}]}]
    sample = {"prompt": prompt, "completion": "Same.", "images": [random_image(56, 56, seed=1)]}
    assert_refused(model, sample, r"the messages have 2 image placeholders but 1 images were given")


def test_placeholder_without_any_image(model):
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}]
    assert_refused(model, {"prompt": prompt, "completion": "Noise."},
                   r"the messages have 1 image placeholders but 0 images were given")  # fmt: skip


@pytest.mark.parametrize("item", [{"type": "video", "video": "clip.mp4"}, {"video": ["f1.png", "f2.png"]}])
def test_video_item(model, item):
    prompt = [{"role": "user", "content": [item, {"type": "text", "text": "What happens?"}]}]
    assert_refused(model, {"prompt": prompt, "completion": "Nothing."},
                   r"'prompt' message 0 item 0 holds a video; only images are supported")  # fmt: skip


def test_malformed_messages(model):
    assert_refused(model, {"messages": [{"role": "user"}]},
                   r"'messages' message 0 must be a dict with 'role' and 'content'")
    assert_refused(model, {"prompt": 42, "completion": "x"},
                   r"'prompt' must be a string or a list of messages, got int")
    assert_refused(model, {"prompt": "Hi", "completion": []}, r"'completion' is an empty list of messages")


IMG_ITEM = {"type": "image", "image": None}


@pytest.mark.parametrize(
    "content,pattern",
    [
        ([{"type": "text", "text": "Hi"}, {"type": "audio", "audio": "a.wav"}],
         r"'prompt' message 0 item 1 has type 'audio'; only 'text', 'image' and 'image_url' items are supported"),
        ([{"type": "input_audio", "input_audio": {"data": "..."}}], r"'prompt' message 0 item 0 has type 'input_audio'"),
        ([{"type": 3}], r"'prompt' message 0 item 0 has type 3"),
        ([{"audio": "a.wav"}], r"'prompt' message 0 item 0 has no 'type' and no 'text' or 'image' \(keys: \['audio'\]\)"),
        ([{"type": "text", "text": 42}], r"'prompt' message 0 item 0 is a text item whose 'text' must be a string, got int"),
        ([{"type": "text"}], r"'prompt' message 0 item 0 is a text item whose 'text' must be a string, got nothing"),
        ([{"type": "text", "text": ["a", "b"]}], r"'prompt' message 0 item 0 is a text item whose 'text' must be a string, got list"),
        (["fine", 7], r"'prompt' message 0 item 1 must be a dict, got int"),
        (42, r"'prompt' message 0 content must be a string or a list of items, got int"),
        ({"type": "text", "text": "Hi"}, r"'prompt' message 0 content must be a string or a list of items, got dict"),
    ],
)  # fmt: skip
def test_content_the_template_would_drop_is_refused(model, content, pattern):
    """Anything the chat template would silently drop (and so score the rest as if it were not there)
    is a bad sample naming the message and the item."""
    prompt = [{"role": "user", "content": content}]
    assert_refused(model, {"prompt": prompt, "completion": "Noise."}, pattern)


@pytest.mark.parametrize("role", ["tool", "System", "function", "", None, 3])
def test_unknown_role_is_refused(model, role):
    messages = [{"role": "user", "content": "Hi"}, {"role": role, "content": "data"},
                {"role": "assistant", "content": "Hello"}]  # fmt: skip
    assert_refused(model, {"messages": messages},
                   r"'messages' message 1 has role .*; roles are 'system', 'user' and 'assistant'")  # fmt: skip


def test_items_of_known_types_still_score(model):
    """The checks refuse only what cannot be scored: keyless image/text items and strings in content
    lists score exactly like their typed forms."""
    image = random_image(56, 56, seed=5)
    typed = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What?"}]},
             {"role": "assistant", "content": [{"type": "text", "text": "Dots."}]}]  # fmt: skip
    keyless = [{"role": "user", "content": [{"image": image}, "What?"]},
               {"role": "assistant", "content": [{"text": "Dots."}]}]  # fmt: skip
    a, b = model.score([{"messages": typed}, {"messages": keyless}])
    assert a == pytest.approx(b, abs=1e-6)


# ---- on_invalid ---------------------------------------------------------------------------------


def mixed_batch(tmp_path) -> tuple[list, list[int]]:
    samples = [
        GOOD_TEXT,
        {"prompt": "Hi"},  # 1: no completion
        good_image_sample(seed=1),
        "not a dict",  # 3
        {"prompt": "Describe.", "completion": "Noise.", "images": [str(tmp_path / "missing.png")]},  # 4
        {"prompt": "Why?", "completion": "Because I said so."},
    ]
    return samples, [1, 3, 4]


def test_default_raises_naming_every_bad_sample_and_computes_nothing(model, tmp_path):
    samples, bad = mixed_batch(tmp_path)
    with count_forward_calls(model) as calls, pytest.raises(InvalidSampleError) as e:
        model.score(samples)
    assert calls == [], "no forward pass may run when the call is refused"
    assert list(e.value.errors) == bad
    message = str(e.value)
    assert message.startswith("3 invalid samples:")
    for i in bad:
        assert f"sample {i}: " in message
    assert "sample 0" not in message and "sample 2" not in message
    assert "no 'completion'" in e.value.errors[1]
    assert "got str" in e.value.errors[3]
    assert "does not exist" in e.value.errors[4]


def test_on_invalid_none_scores_the_good_ones(model, tmp_path):
    samples, bad = mixed_batch(tmp_path)
    with count_forward_calls(model) as calls:
        scores = model.score(samples, on_invalid="none")
    assert calls, "the good samples must be scored"
    assert len(scores) == len(samples)
    for i, (sample, score) in enumerate(zip(samples, scores)):
        if i in bad:
            assert score is None, f"sample {i} is bad but got {score}"
        else:
            assert score == pytest.approx(model.score([sample])[0], abs=1e-5), f"sample {i}"


def test_all_bad_with_on_invalid_none(model):
    with count_forward_calls(model) as calls:
        assert model.score([{"prompt": "Hi"}, 3], on_invalid="none") == [None, None]
    assert calls == []


def test_error_lists_at_most_ten_reasons(model):
    with pytest.raises(InvalidSampleError, match=r"12 invalid samples:") as e:
        model.score([{"prompt": "Hi"}] * 12)
    assert len(e.value.errors) == 12
    assert "sample 9: " in str(e.value) and "sample 10: " not in str(e.value)
    assert "... and 2 more" in str(e.value)


def test_invalid_sample_error_pickles(model):
    """Errors cross process boundaries (Ray actors, multiprocessing) intact."""
    with pytest.raises(InvalidSampleError) as e:
        model.score([GOOD_TEXT, {"prompt": "Hi"}])
    copy = pickle.loads(pickle.dumps(e.value))
    assert copy.errors == e.value.errors and str(copy) == str(e.value)


def test_bad_arguments(model):
    with pytest.raises(ValueError, match=r"on_invalid must be 'raise' or 'none'"):
        model.score([GOOD_TEXT], on_invalid="skip")
    with pytest.raises(TypeError, match=r"wrap a single sample in a list"):
        model.score(GOOD_TEXT)
    assert model.score([]) == []
