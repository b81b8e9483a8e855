"""The text encoder takes samples.to_conversation's conversation: one check of a sample's shape (the
same reasons as a vision model gives), then only the text work."""

from __future__ import annotations

import pytest
from conftest import random_image
from transformers import AutoTokenizer

from rewardplug.encoding.text_encoder import TextEncoder, text_messages
from rewardplug.errors import SampleError
from rewardplug.images import ImagePolicy
from rewardplug.samples import to_conversation
from rewardplug.testing import make_tiny_seq_cls_checkpoint


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    path = make_tiny_seq_cls_checkpoint(tmp_path_factory.mktemp("text-rm"), "qwen3", seed=1)
    return TextEncoder(AutoTokenizer.from_pretrained(path))


BAD = [
    {"prompt": "Hi"},  # no completion
    {"completion": "Yes"},  # no prompt
    {"question": "Hi", "answer": "Yes"},
    {"messages": [{"role": "user", "content": "Hi"}]},  # does not end with the answer
    {"messages": [{"role": "tool", "content": "Hi"}, {"role": "assistant", "content": "Yes"}]},
    {"prompt": [{"role": "user", "content": [{"type": "audio", "audio": "a.wav"}]}], "completion": "Yes"},
    "not a dict",
]


@pytest.mark.parametrize("sample", BAD, ids=range(len(BAD)))
def test_a_bad_sample_gets_the_reason_to_conversation_gives(encoder, sample):
    with pytest.raises(SampleError) as expected:
        to_conversation(sample, ImagePolicy())
    encoded, errors = encoder.encode_many([sample, {"prompt": "Hi", "completion": "Yes"}])
    assert errors == {0: str(expected.value)} and encoded[1] is not None


def test_token_ids_are_refused_naming_the_tokenizer(encoder):
    _, errors = encoder.encode_many([{"input_ids": [1, 2, 3]}])
    assert "token ids of another model's tokenizer" in errors[0]


def test_text_messages_of_a_conversation_leave_images_out_and_join_text_items():
    picture = random_image(20, 10)
    sample = {"prompt": [{"role": "user", "content": [{"type": "image"}, "Describe.", {"text": "Briefly."}]}],
              "completion": [{"role": "assistant", "content": [{"type": "text", "text": "Noise."}]}],
              "images": [picture]}  # fmt: skip
    conversation = to_conversation(sample, ImagePolicy())
    expected = [{"role": "user", "content": "Describe.\nBriefly."}, {"role": "assistant", "content": "Noise."}]
    assert text_messages(conversation) == expected
    assert text_messages(sample) == expected  # a sample goes through to_conversation first


def test_a_text_model_never_reads_a_samples_images(encoder):
    """Images are left out of a text model's input, so they are not read: a path that does not exist and a
    URL (never fetched) give the same token ids as the sample without them (docs/reward-models.md)."""
    plain = {"prompt": "What is 2 + 2?", "completion": "4."}
    with_images = [
        {**plain, "images": ["/nonexistent/picture.png"]},
        {"prompt": [{"role": "user", "content": [{"type": "image", "image": "https://example.com/a.png"},
                                                 {"type": "text", "text": "What is 2 + 2?"}]}], "completion": "4."},
    ]  # fmt: skip
    encoded, errors = encoder.encode_many([plain, *with_images])
    assert errors == {}, errors
    for e in encoded[1:]:
        assert e.input_ids.tolist() == encoded[0].input_ids.tolist()

