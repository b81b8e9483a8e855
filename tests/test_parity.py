"""Scores equal the model card's own computation, written out here independently of rewardplug.

The reference is the Skywork-VL-Reward-7B card's recipe: the full ``Qwen2_5_VLForConditionalGeneration``
(with its LM head), the chat template with ``add_generation_prompt=False``, images through
``qwen_vl_utils.process_vision_info``, the processor with ``padding=True``, an fp32 ``nn.Linear`` head
read from ``value_head.safetensors`` applied to ``hidden_states[-1]``, and the value at
``attention_mask.sum(-1) - 1``. Only the image processor is pinned to the PIL backend, which is what
the card's transformers 4.x used.
"""

from __future__ import annotations

import pytest
import torch
from conftest import random_image
from qwen_vl_utils import process_vision_info
from safetensors.torch import load_file

from rewardplug import Sample

TOL = 1e-5


@pytest.fixture(scope="module")
def reference(tiny_path):
    return build_reference(tiny_path)


def build_reference(path):
    from transformers import AutoImageProcessor, AutoProcessor, Qwen2_5_VLForConditionalGeneration

    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(path)
    processor.image_processor = AutoImageProcessor.from_pretrained(path, backend="pil")
    state = load_file(str(path / "value_head.safetensors"))
    head = torch.nn.Linear(hf.config.text_config.hidden_size, 1, dtype=torch.float32)
    with torch.no_grad():
        head.weight.copy_(state["v_head.summary.weight"])
        head.bias.copy_(state["v_head.summary.bias"])
    return hf, processor, head


@torch.no_grad()
def card_score(reference, messages) -> float:
    """The model card's computation, step by step."""
    hf, processor, head = reference
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    image_inputs, video_inputs = process_vision_info(messages)
    inputs = processor(text=[text], images=image_inputs, videos=video_inputs, padding=True, return_tensors="pt")
    out = hf(**inputs, output_hidden_states=True, return_dict=True)
    values = head(out.hidden_states[-1].float()).squeeze(-1)
    score = values.gather(-1, inputs["attention_mask"].sum(-1, keepdim=True) - 1)
    return score.item()


# (system prompt or None, number of images, question, answer)
CASES = {
    "text_only": (None, 0, "Write a haiku about autumn.", "Leaves fall, red and gold,\ncrisp air hums."),
    "one_image": (None, 1, "What is in the picture?", "A noisy pattern of coloured pixels."),
    "two_images": (None, 2, "Which picture is wider?", "The second one is wider."),
    "system_prompt": ("You are a strict visual judge.", 1, "Describe the image.", "Random colourful noise."),
}


def card_messages(system, images, question, answer) -> list[dict]:
    """The card's message layout: images first, then the question, in one user turn."""
    messages = [{"role": "system", "content": system}] if system else []
    content = [{"type": "image", "image": im} for im in images] + [{"type": "text", "text": question}]
    messages.append({"role": "user", "content": content})
    messages.append({"role": "assistant", "content": answer})
    return messages


def rewardplug_forms(system, images, question, answer) -> dict[str, object]:
    """The same sample in every form rewardplug accepts (as users and TRL pass them)."""
    head = [{"role": "system", "content": system}] if system else []
    text = {"type": "text", "text": question}
    placeholders = head + [{"role": "user", "content": [{"type": "image"} for _ in images] + [text]}]
    embedded = head + [{"role": "user", "content": [{"type": "image", "image": im} for im in images] + [text]}]
    forms = {
        "messages": {"messages": card_messages(system, images, question, answer)},
        "messages_placeholders_and_column": {
            "messages": placeholders + [{"role": "assistant", "content": answer}],
            "images": list(images),
        },
        "conversational_placeholders": {
            "prompt": placeholders,
            "completion": [{"role": "assistant", "content": answer}],
            "images": list(images),
        },
        # TRL embeds the images in the prompt AND passes the dataset column: counted once.
        "conversational_embedded_and_column": {
            "prompt": embedded,
            "completion": [{"role": "assistant", "content": [{"type": "text", "text": answer}]}],
            "images": list(images),
        },
        # A plain-text user turn: the column's images go before its text, as the card orders them.
        "conversational_text_prompt_and_column": {
            "prompt": head + [{"role": "user", "content": question}],
            "completion": [{"role": "assistant", "content": answer}],
            "images": list(images),
        },
        "conversational_embedded_only": {
            "prompt": embedded,
            "completion": [{"role": "assistant", "content": answer}],
        },
    }
    if not system:  # a string prompt cannot hold a system message
        forms["string_prompt"] = {"prompt": question, "completion": answer, "images": list(images)}
        forms["sample_dataclass"] = Sample(prompt=question, completion=answer, images=list(images))
        if len(images) == 1:
            forms["string_prompt_single_image_key"] = {"prompt": question, "completion": answer, "image": images[0]}
    return forms


def case_images(n: int) -> list:
    sizes = [(120, 90), (150, 60)]
    return [random_image(w, h, seed=10 + i) for i, (w, h) in enumerate(sizes[:n])]


@pytest.mark.parametrize("case", list(CASES))
def test_score_equals_model_card_computation(model, reference, case):
    system, n_images, question, answer = CASES[case]
    images = case_images(n_images)
    expected = card_score(reference, card_messages(system, images, question, answer))
    forms = rewardplug_forms(system, images, question, answer)
    scores = model.score(list(forms.values()))
    got = dict(zip(forms, scores))
    for form, score in got.items():
        assert score == pytest.approx(expected, abs=TOL), f"{case}/{form}: rewardplug {score} vs card {expected}"
    # The forms encode to the same tokens and pixels: only batch float rounding may separate them.
    assert max(scores) - min(scores) <= 1e-6, got
    encodings = [model.encode(sample) for sample in forms.values()]
    for form, enc in zip(forms, encodings):
        assert enc.input_ids.tolist() == encodings[0].input_ids.tolist(), form
        assert enc.num_patches == encodings[0].num_patches, form


def test_cases_give_distinct_scores(model):
    """Guards the parity test against a degenerate model that scores everything alike."""
    samples = [{"messages": card_messages(s, case_images(n), q, a)} for s, n, q, a in CASES.values()]
    scores = model.score(samples)
    assert len({round(s, 3) for s in scores}) == len(scores), scores


def test_images_in_messages_are_not_counted_twice(model):
    """An image embedded in the prompt and also given in the column is one image, not two."""
    image = case_images(1)[0]
    embedded = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Hi?"}]}]
    encoded = model.encode({"prompt": embedded, "completion": "Hello.", "images": [image]})
    assert encoded.image_grid_thw.shape[0] == 1
    assert len(encoded.image_digests) == 1


def test_caller_messages_are_not_mutated(model):
    image = case_images(1)[0]
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}]
    model.score([{"prompt": prompt, "completion": "Noise.", "images": [image]}])
    assert prompt == [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}]


def test_large_image_parity_with_the_7b_pixel_bounds(tmp_path):
    """With the real checkpoint's processor bounds (min 3136, max 12845056 pixels, the same as
    qwen-vl-utils' defaults) a large image is resized exactly as the card resizes it."""
    from rewardplug import RewardModel
    from rewardplug.testing import make_tiny_checkpoint

    path = make_tiny_checkpoint(tmp_path / "rm", seed=1, max_pixels=12845056)
    rm = RewardModel.from_pretrained(path, dtype="float32", device="cpu")
    image = random_image(700, 500, seed=4)  # over the tiny default max_pixels (200704)
    expected = card_score(build_reference(path), card_messages(None, [image], "What is this?", "Noise."))
    got = rm.score([{"prompt": "What is this?", "completion": "Noise.", "images": [image]}])[0]
    assert got == pytest.approx(expected, abs=TOL)


def test_large_image_parity_with_non_default_pixel_bounds(model, reference):
    """A checkpoint whose processor bounds differ from qwen-vl-utils' defaults (the tiny one: max
    200704 pixels): the card resizes twice (qwen-vl-utils' defaults, then the processor), and so does
    rewardplug, so a 700x500 image still scores exactly as the card scores it."""
    image = random_image(700, 500, seed=4)
    expected = card_score(reference, card_messages(None, [image], "What is this?", "Noise."))
    got = model.score([{"prompt": "What is this?", "completion": "Noise.", "images": [image]}])[0]
    assert got == pytest.approx(expected, abs=TOL)
