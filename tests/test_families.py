"""Every reward-model family scores what its own transformers class computes on one unpadded sample.

References are the transformers classes themselves: ``AutoModelForSequenceClassification`` for the text
families, and for Qwen2-VL / Qwen2.5-VL with a ``score`` head (no such class ships in transformers 5)
``GenericForSequenceClassification`` over the family's pretrained model, as transformers composes every
``*ForSequenceClassification`` (``rewardplug.testing.vision_seq_cls_class``). Inputs follow each
family's recipe: the chat template rendered to text, then the tokenizer without added special tokens
(text), or the processor over ``process_vision_info`` (vision). Nothing of the head is written here.
"""

from __future__ import annotations

import pytest
import torch
from conftest import random_image, text_of_length

from rewardplug import RewardEngine, RewardModel
from rewardplug.encoding.text_encoder import text_messages
from rewardplug.families import ScoringModel
from rewardplug.families.text import TextRewardModel
from rewardplug.families.vision_score import ScoreHeadVisionModel
from rewardplug.testing import SEQ_CLS_FAMILIES, make_tiny_seq_cls_checkpoint, vision_seq_cls_class

TOL = 1e-5
TEXT = sorted(SEQ_CLS_FAMILIES)
VISION = ["qwen2_vl", "qwen2_5_vl"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {f: make_tiny_seq_cls_checkpoint(root / f, f, seed=1) for f in TEXT + VISION}


def text_samples() -> list[dict]:
    """Two prompt groups of different lengths (both longer than Gemma 2's window of 24), a lone sample,
    an empty answer, and a conversational one."""
    long_p, short_p = text_of_length(160, seed=1), text_of_length(60, seed=2)
    out = [{"prompt": long_p, "completion": text_of_length(n, seed=10 + n)} for n in (5, 40, 90)]
    out += [{"prompt": short_p, "completion": text_of_length(n, seed=20 + n)} for n in (1, 33, 70)]
    out.append({"prompt": "Hi", "completion": "Hello there!"})
    out.append({"prompt": short_p, "completion": ""})
    out.append({"prompt": [{"role": "user", "content": "What is 2+2?"}],
                "completion": [{"role": "assistant", "content": " It is 4. "}]})  # fmt: skip
    return out


@torch.no_grad()
def class_scores(path, samples) -> list[float]:
    """The family's own class on each sample alone (the card's / TRL's recipe for the ids)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    out = []
    for sample in samples:
        text = tokenizer.apply_chat_template(text_messages(sample), tokenize=False)
        inputs = tokenizer(text, add_special_tokens=False, return_tensors="pt")
        out.append(model(**inputs).logits[0, 0].item())
    return out


def count_suffix_passes(module) -> list[int]:
    """Counts backbone calls that run on top of a cached prefix (a forward hook, nothing replaced)."""
    calls = [0]

    def hook(module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None and cache.get_seq_length() > 0:
            calls[0] += 1

    module.register_forward_pre_hook(hook, with_kwargs=True)
    return calls


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("family", TEXT)
def test_text_family_batched_scores_equal_its_class_on_one_unpadded_sample(checkpoints, family, padding_side):
    model = RewardModel.from_pretrained(checkpoints[family], dtype="float32", device="cpu", padding_side=padding_side)
    assert isinstance(model, TextRewardModel) and isinstance(model, ScoringModel)
    samples = text_samples()
    got = model.score(samples, batch_size=len(samples))  # one padded batch of every length
    assert got == pytest.approx(class_scores(checkpoints[family], samples), abs=TOL)


@pytest.mark.parametrize("family", TEXT)
def test_text_family_engine_scores_with_shared_prefixes_equal_its_class(checkpoints, family):
    model = RewardModel.from_pretrained(checkpoints[family], dtype="float32", device="cpu")
    suffix_passes = count_suffix_passes(model.backbone)
    samples = text_samples()
    engine = RewardEngine(model, metrics=None, max_wait_ms=50)
    try:
        got = engine.score(samples)
    finally:
        engine.close(timeout=30)
    assert got == pytest.approx(class_scores(checkpoints[family], samples), abs=TOL)
    assert suffix_passes[0] >= 1  # the two prompt groups ran their prompts once, as a cached prefix


@pytest.mark.parametrize("family", TEXT)
def test_text_family_suffix_passes_over_prefixes_of_different_lengths_equal_its_class(checkpoints, family):
    """The protocol's prefix and suffix passes as the engine's runner makes them: prompts of different
    lengths in one right-padded prefix batch, so each suffix row follows padding holes (Gemma 2's window
    of 24 tokens must count real distances, not cache slots)."""
    from rewardplug.encoding import EncodedSample, collate

    model = RewardModel.from_pretrained(checkpoints[family], dtype="float32", device="cpu")
    samples = text_samples()[:6]  # two groups: a long and a short prompt, three answers each
    encoded = [model.encode(s) for s in samples]
    cuts = [int((e.input_ids == model.turn_start_token_id).nonzero()[-1]) + 1 for e in encoded]
    prefixes = collate([EncodedSample(e.input_ids[:p], e.mm_token_type_ids[:p], position_ids=e.position_ids[:, :p])
                        for e, p in ((encoded[0], cuts[0]), (encoded[3], cuts[3]))], model.pad_token_id, "right")  # fmt: skip
    assert prefixes.attention_mask.sum(1).tolist() == [cuts[0], cuts[3]] and cuts[0] != cuts[3]
    suffixes = collate([EncodedSample(e.input_ids[p:], e.mm_token_type_ids[p:], position_ids=e.position_ids[:, p:])
                        for e, p in zip(encoded, cuts)], model.pad_token_id, "right")  # fmt: skip
    cache = model.forward_prefixes(prefixes)
    got = model.forward_suffixes(cache, torch.tensor([0, 0, 0, 1, 1, 1]), prefixes.attention_mask, suffixes)
    assert got.tolist() == pytest.approx(class_scores(checkpoints[family], samples), abs=TOL)


def test_llama_pools_before_its_trailing_pad_token(checkpoints):
    """Llama's pad token is its <|eot_id|>, which ends every turn: the class pools at the token before."""
    model = RewardModel.from_pretrained(checkpoints["llama"], dtype="float32", device="cpu")
    tok = model.processor.tokenizer
    encoded = model.encode({"prompt": "Hi", "completion": "Yes"})
    assert tok.convert_ids_to_tokens(int(encoded.input_ids[-1])) == "s"  # "Yes", not "<|eot_id|>"
    assert model.encoder.counters.trailing_pad_dropped == 1


def test_text_family_reads_only_the_text_of_vision_samples(checkpoints):
    model = RewardModel.from_pretrained(checkpoints["qwen3"], dtype="float32", device="cpu")
    picture = random_image(40, 30)
    with_image = {"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}],
                  "completion": "Noise.", "images": [picture]}  # fmt: skip
    plain = {"prompt": "Describe.", "completion": "Noise."}
    assert model.score([with_image]) == pytest.approx(model.score([plain]), abs=0)


def test_text_family_bad_samples_get_their_own_reason(checkpoints):
    """Token ids of a policy cannot be read by another tokenizer; Gemma's template refuses a system turn."""
    model = RewardModel.from_pretrained(checkpoints["gemma2"], dtype="float32", device="cpu")
    samples = [
        {"input_ids": [1, 2, 3]},
        {"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello"}]},
        {"prompt": "Hi", "completion": "Hello"},
    ]  # fmt: skip
    scores = model.score(samples, on_invalid="none")
    assert scores[:2] == [None, None] and isinstance(scores[2], float)
    _, errors = model.encode_many(samples)
    assert "token ids" in errors[0]
    assert "System role not supported" in errors[1]


# ---- Qwen2-VL / Qwen2.5-VL with a score head ----------------------------------------------------------


def vision_samples() -> list[dict]:
    a, b = random_image(84, 56, seed=5), random_image(60, 90, seed=6)
    q = text_of_length(50, seed=3)
    out = [{"prompt": q, "completion": text_of_length(n, seed=n), "images": [a]} for n in (3, 30, 60)]
    out.append({"prompt": "Two pictures?", "completion": "Yes, two.", "images": [a, b]})
    out.append({"prompt": "No picture.", "completion": "Fine."})
    return out


@torch.no_grad()
def vision_class_scores(path, family, samples) -> list[float]:
    from qwen_vl_utils import process_vision_info
    from transformers import AutoImageProcessor, AutoProcessor

    model = vision_seq_cls_class(family).from_pretrained(path, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(path)
    processor.image_processor = AutoImageProcessor.from_pretrained(path, backend="pil")
    out = []
    for s in samples:
        content = [{"type": "image", "image": im} for im in s.get("images", [])] + [{"type": "text", "text": s["prompt"]}]
        messages = [{"role": "user", "content": content}, {"role": "assistant", "content": s["completion"]}]
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        images, _ = process_vision_info(messages)
        inputs = processor(text=[text], images=images, return_tensors="pt")
        out.append(model(**inputs).logits[0, 0].item())
    return out


@pytest.mark.parametrize("family", VISION)
def test_vision_score_head_through_the_engine_equals_its_class(checkpoints, family):
    model = RewardModel.from_pretrained(checkpoints[family], dtype="float32", device="cpu")
    assert isinstance(model, ScoreHeadVisionModel) and model.value_head.bias is None
    samples = vision_samples()
    expected = vision_class_scores(checkpoints[family], family, samples)
    assert model.score(samples, batch_size=len(samples)) == pytest.approx(expected, abs=TOL)
    suffix_passes = count_suffix_passes(model.backbone.language_model)
    engine = RewardEngine(model, metrics=None, max_wait_ms=50)
    try:
        got = engine.score(samples)
    finally:
        engine.close(timeout=30)
    assert got == pytest.approx(expected, abs=TOL)
    assert suffix_passes[0] >= 1  # the three answers to one picture shared its prompt
