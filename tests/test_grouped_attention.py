"""Grouped key/value heads in the masked SDPA passes on a CPU (``rewardplug.grouped_attention``): the same
output bit for bit as transformers' own SDPA path, taken where it should be, and only there."""

from __future__ import annotations

import pytest
import torch
from conftest import random_image, text_of_length
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from rewardplug import RewardEngine, RewardModel
from rewardplug.grouped_attention import NAME, grouped_sdpa_attention
from rewardplug.testing import cached_seq_cls_checkpoint


class Layer(torch.nn.Module):
    """What the attention functions read from a decoder layer's attention module."""

    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


def padded_mask(rows: int, queries: int, keys: int, lengths: list[int]) -> torch.Tensor:
    """Suffix queries over ``keys - queries`` prefix keys: causal, each row's prefix padded after ``lengths``."""
    mask = torch.ones(rows, 1, queries, keys, dtype=torch.bool).tril(keys - queries)
    for row, n in enumerate(lengths):
        mask[row, :, :, n : keys - queries] = False
    return mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("queries", [1, 7, 40])
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (28, 4), (6, 2)])
def test_grouped_sdpa_equals_transformers_sdpa_bitwise_under_a_mask(queries, heads, kv_heads, dtype):
    torch.manual_seed(queries + heads)
    rows, keys = 3, 90
    q = torch.randn(rows, heads, queries, 16, dtype=dtype)
    k, v = torch.randn(rows, kv_heads, keys, 16, dtype=dtype), torch.randn(rows, kv_heads, keys, 16, dtype=dtype)
    mask = padded_mask(rows, queries, keys, [50, 31, 9])
    layer = Layer(heads // kv_heads)
    expected, _ = sdpa_attention_forward(layer, q, k, v, mask, scaling=0.3)
    got, _ = grouped_sdpa_attention(layer, q, k, v, mask, scaling=0.3)
    assert got.shape == expected.shape == (rows, queries, heads, 16)
    assert torch.equal(got, expected)


def test_grouped_sdpa_gives_transformers_answer_for_softcap():
    """A layer with logit soft-capping (Gemma 2) gets transformers' own answer (5.25 refuses it: SDPA cannot
    cap; 5.10 ran it uncapped), never a silently uncapped grouped pass of ours."""
    q, k, v = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 9, 8), torch.randn(1, 2, 9, 8)
    mask, layer = padded_mask(1, 5, 9, [4]), Layer(2)
    try:
        expected, _ = sdpa_attention_forward(layer, q, k, v, mask, softcap=30.0)
    except ValueError as refused:
        with pytest.raises(ValueError, match=str(refused)[:20]):
            grouped_sdpa_attention(layer, q, k, v, mask, softcap=30.0)
    else:
        assert torch.equal(grouped_sdpa_attention(layer, q, k, v, mask, softcap=30.0)[0], expected)


def test_vision_model_on_cpu_runs_its_language_model_on_grouped_sdpa(model):
    assert model.backbone.language_model.config._attn_implementation == NAME
    assert model.backbone.visual.config._attn_implementation == "sdpa"  # no grouped heads there


def test_eager_attention_is_left_as_asked(tiny_path):
    rm = RewardModel.from_pretrained(tiny_path, dtype="float32", device="cpu", attn_implementation="eager")
    assert rm.backbone.language_model.config._attn_implementation == "eager"


def test_text_family_on_cpu_runs_on_grouped_sdpa():
    rm = RewardModel.from_pretrained(cached_seq_cls_checkpoint("qwen2"), dtype="float32", device="cpu")
    assert rm.backbone.config._attn_implementation == NAME


def grpo_samples() -> list[dict]:
    out = []
    for p in range(2):
        image = random_image(120, 90, seed=p)
        for g in range(4):
            out.append({"images": [image], "prompt": text_of_length(30 + p, p),
                        "completion": text_of_length(5 + 9 * g, 10 * p + g)})  # fmt: skip
    return out


def suffix_attention_heads(rm: RewardModel, samples: list[dict], monkeypatch) -> tuple[list[float], set]:
    """Engine scores, and (query heads, key heads) of every masked SDPA call (the suffix passes), seen by a
    wrapper that records each call's shapes and runs the real function."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    heads = set()

    def recording(query, key, *args, **kwargs):
        if kwargs.get("attn_mask") is not None and query.shape[-2] > 1:
            heads.add((query.shape[1], key.shape[1]))
        return sdpa(query, key, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    with RewardEngine(rm, metrics=None) as engine:
        scores = engine.score(samples)
    monkeypatch.undo()
    return scores, heads


def test_engine_suffix_passes_read_grouped_heads_and_score_bitwise_as_transformers_sdpa(tiny_path, monkeypatch):
    rm = RewardModel.from_pretrained(tiny_path, dtype="float32", device="cpu", image_roots=None)
    samples = grpo_samples()
    grouped, grouped_heads = suffix_attention_heads(rm, samples, monkeypatch)
    rm.backbone.language_model.set_attn_implementation("sdpa")
    repeated, repeated_heads = suffix_attention_heads(rm, samples, monkeypatch)
    assert grouped_heads == {(4, 2)}  # the tiny model's 4 query heads over its 2 key/value heads, no copy
    assert repeated_heads == {(4, 4)}  # transformers' path: each key/value head repeated
    assert grouped == repeated
