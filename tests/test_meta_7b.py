"""The real Skywork-VL-Reward-7B architecture, built on the meta device through the normal loading path.

No weights are read: ``make_tiny_checkpoint(..., config=QWEN2_5_VL_7B_CONFIG, weights=False)`` writes
the hub's config.json, tokenizer and processor files, and ``RewardModel.from_pretrained(device="meta")``
builds the model from them. The parameter count is computed here by hand from the config.
"""

from __future__ import annotations

import pytest
import torch

from rewardplug import RewardModel
from rewardplug.testing import QWEN2_5_VL_7B_CONFIG, make_tiny_checkpoint

CFG = QWEN2_5_VL_7B_CONFIG


def linear(n_in: int, n_out: int, bias: bool = True) -> int:
    return n_in * n_out + (n_out if bias else 0)


def text_parameters(c: dict) -> int:
    h, inter, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    kv = h // c["num_attention_heads"] * c["num_key_value_heads"]
    attention = linear(h, h) + 2 * linear(h, kv) + linear(h, h, bias=False)  # q, k, v with bias; o without
    mlp = 3 * linear(h, inter, bias=False)  # gate, up, down
    layer = attention + mlp + 2 * h  # two RMSNorms
    return c["vocab_size"] * h + layers * layer + h  # embeddings, layers, final norm


def vision_parameters(v: dict) -> int:
    d, inter = v["hidden_size"], v["intermediate_size"]
    patch = v["in_chans"] * v["temporal_patch_size"] * v["patch_size"] ** 2 * d  # Conv3d, no bias
    block = 2 * d + linear(d, 3 * d) + linear(d, d) + 2 * linear(d, inter) + linear(inter, d)
    merged = d * v["spatial_merge_size"] ** 2
    merger = d + linear(merged, merged) + linear(merged, v["out_hidden_size"])  # ln_q, 2-layer MLP
    return patch + v["depth"] * block + merger


@pytest.fixture(scope="module")
def meta_7b(tmp_path_factory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("skywork-7b-meta"), config=QWEN2_5_VL_7B_CONFIG, weights=False)
    assert not (path / "model.safetensors").exists()
    return RewardModel.from_pretrained(path, device="meta", dtype="bfloat16")


def test_hand_formula_matches_the_published_size():
    """Qwen2.5-VL-7B is published as 8.29B parameters, lm_head included."""
    lm_head = CFG["vocab_size"] * CFG["hidden_size"]
    total = text_parameters(CFG) + vision_parameters(CFG["vision_config"]) + lm_head
    assert 8.28e9 < total < 8.30e9, total


def test_parameter_count_and_memory(meta_7b):
    vision = sum(p.numel() for p in meta_7b.backbone.visual.parameters())
    language = sum(p.numel() for p in meta_7b.backbone.language_model.parameters())
    hidden = CFG["hidden_size"]
    expected = text_parameters(CFG) + vision_parameters(CFG["vision_config"]) + hidden + 1  # + value head
    n = meta_7b.num_parameters()
    mem = meta_7b.memory_bytes()
    report = (
        f"7B on meta: num_parameters={n:,} (expected {expected:,}; vision {vision:,}, language {language:,}), "
        f"memory_bytes={mem:,} ({mem / 2**30:.2f} GiB in bf16 + fp32 head)"
    )
    print("\n" + report)
    assert vision == vision_parameters(CFG["vision_config"]), report
    assert 0.66e9 < vision < 0.68e9, report
    assert language == text_parameters(CFG), report
    assert n == expected, report
    assert n == pytest.approx(8.29e9 - CFG["vocab_size"] * hidden, rel=2e-3), report  # no lm_head
    # bf16 backbone (2 bytes each) and the fp32 head (4 bytes each).
    assert mem == 2 * (n - hidden - 1) + 4 * (hidden + 1), report
    assert 14.4 < mem / 2**30 < 14.5, report


def test_dtypes_devices_and_no_lm_head(meta_7b):
    assert meta_7b.dtype == torch.bfloat16
    assert meta_7b.device.type == "meta"
    assert meta_7b.value_head.weight.dtype == torch.float32
    assert tuple(meta_7b.value_head.weight.shape) == (1, 3584)
    names = [n for n, _ in meta_7b.backbone.named_parameters()]
    assert not any("lm_head" in n for n in names)


def test_config_values_came_through(meta_7b):
    text, vision = meta_7b.config.text_config, meta_7b.config.vision_config
    assert meta_7b.config.model_type == "qwen2_5_vl"
    assert (text.hidden_size, text.intermediate_size, text.num_hidden_layers) == (3584, 18944, 28)
    assert (text.num_attention_heads, text.num_key_value_heads, text.vocab_size) == (28, 4, 152064)
    assert text.rms_norm_eps == 1e-6
    rope = getattr(text, "rope_parameters", None) or text.rope_scaling
    assert rope["mrope_section"] == [16, 24, 24]
    assert rope.get("rope_theta", getattr(text, "rope_theta", None)) == 1e6
    assert (vision.depth, vision.hidden_size, vision.intermediate_size, vision.num_heads) == (32, 1280, 3420, 16)
    assert (vision.out_hidden_size, vision.patch_size, vision.spatial_merge_size) == (3584, 14, 2)
    assert (vision.temporal_patch_size, vision.window_size) == (2, 112)
    assert list(vision.fullatt_block_indexes) == [7, 15, 23, 31]
    assert len(meta_7b.backbone.language_model.layers) == 28
    assert len(meta_7b.backbone.visual.blocks) == 32
    assert meta_7b.config.image_token_id == 151655
    assert meta_7b.config.vision_start_token_id == 151652
