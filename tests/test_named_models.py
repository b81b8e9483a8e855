"""Built-in model names: random-7b's shape, its device-independent random values, and loading by name."""

from __future__ import annotations

import zlib

import pytest
import torch

from rewardplug import named_models as nm
from rewardplug.testing import QWEN2_5_VL_7B_CONFIG, tiny_config


def test_random_7b_config_has_the_7b_numbers_with_all_layers():
    cfg = nm.random_7b_config()
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "rope_theta", "rms_norm_eps", "rope_scaling"):  # fmt: skip
        assert cfg[key] == QWEN2_5_VL_7B_CONFIG[key], key
    assert cfg["vision_config"] == QWEN2_5_VL_7B_CONFIG["vision_config"]


def test_random_7b_config_uses_the_tiny_tokenizer_ids():
    cfg, tiny = nm.random_7b_config(), tiny_config()
    for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id", "eos_token_id"):
        assert cfg[key] == tiny[key] < 300, key  # the tiny byte-level tokenizer's ids, not the 151k ones


@pytest.mark.parametrize(("layers", "depth", "full"), [(1, 1, [0]), (2, 2, [1]), (4, 5, [4]), (7, 8, [7]),
                                                        (14, 16, [7, 15]), (28, 32, [7, 15, 23, 31])])  # fmt: skip
def test_fewer_layers_scale_the_vision_depth_and_keep_full_attention_blocks_valid(layers, depth, full):
    cfg = nm.random_7b_config(layers)
    assert cfg["num_hidden_layers"] == cfg["max_window_layers"] == layers
    assert cfg["vision_config"]["depth"] == depth
    assert cfg["vision_config"]["fullatt_block_indexes"] == full


@pytest.mark.parametrize("layers", [0, 29, -1])
def test_layers_out_of_range_are_refused(layers):
    with pytest.raises(ValueError, match="layers"):
        nm.random_7b_config(layers)


def test_layers_are_refused_for_other_models():
    with pytest.raises(ValueError, match="random-7b"):
        nm.load(nm.TINY, layers=2)


def test_random_7b_is_refused_on_a_device_map():
    with pytest.raises(ValueError, match="one device"):
        nm.load(nm.RANDOM_7B, layers=1, device_map="auto")


def test_hash_values_have_the_asked_std_and_depend_on_seed_and_salt():
    a = torch.empty(300, 700)
    nm.hash_uniform_(a, 0.02, seed=0, salt=1)
    assert abs(a.std().item() - 0.02) < 2e-4 and abs(a.mean().item()) < 2e-4
    assert a.abs().max().item() <= 0.02 * 3**0.5
    again, other_salt, other_seed = torch.empty_like(a), torch.empty_like(a), torch.empty_like(a)
    nm.hash_uniform_(again, 0.02, seed=0, salt=1)
    nm.hash_uniform_(other_salt, 0.02, seed=0, salt=2)
    nm.hash_uniform_(other_seed, 0.02, seed=1, salt=1)
    assert torch.equal(a, again)
    assert (a != other_salt).float().mean() > 0.99 and (a != other_seed).float().mean() > 0.99
    # Rows are not shifted copies of each other (the hash mixes, unlike a counter).
    assert torch.corrcoef(a[:50])[~torch.eye(50, dtype=torch.bool)].abs().max() < 0.2


def test_hash_values_in_bf16_are_the_fp32_values_rounded(monkeypatch):
    monkeypatch.setattr(nm, "_CHUNK", 1000)  # chunk boundaries must not change any value
    a, b = torch.empty(5001), torch.empty(5001, dtype=torch.bfloat16)
    nm.hash_uniform_(a, 0.05, seed=3, salt=7)
    monkeypatch.setattr(nm, "_CHUNK", 1 << 20)
    nm.hash_uniform_(b, 0.05, seed=3, salt=7)
    assert torch.equal(a.to(torch.bfloat16), b)


@pytest.fixture(scope="module")
def random_1_layer():
    return nm.load(nm.RANDOM_7B, layers=1, dtype="float32", device="cpu", image_roots=None)


def test_random_7b_loads_with_the_7b_widths(random_1_layer):
    rm = random_1_layer
    text, vision = rm.config.text_config, rm.config.vision_config
    assert (text.hidden_size, text.intermediate_size, text.vocab_size) == (3584, 18944, 152064)
    assert len(rm.backbone.language_model.layers) == 1 and len(rm.backbone.visual.blocks) == 1
    assert vision.hidden_size == 1280 and vision.out_hidden_size == 3584
    assert rm.device.type == "cpu" and rm.dtype == torch.float32
    assert rm.name_or_path == nm.RANDOM_7B and nm.is_random(rm.name_or_path)
    assert rm.image_processor.size["longest_edge"] == 12845056  # the 7B's pixel bounds, not the tiny checkpoint's


def test_random_7b_values_are_the_hash_of_their_names(random_1_layer):
    rm = random_1_layer
    name = "visual.patch_embed.proj.weight"
    param = dict(rm.backbone.named_parameters())[name]
    expected = torch.empty_like(param)
    nm.hash_uniform_(expected, 0.02, 0, zlib.crc32(name.encode()))
    assert torch.equal(param, expected)
    lm = rm.backbone.language_model
    assert torch.all(lm.norm.weight == 1) and torch.all(lm.layers[0].self_attn.q_proj.bias == 0)
    used = len(rm.processor.tokenizer)
    assert lm.embed_tokens.weight[:used].std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.all(lm.embed_tokens.weight[used:] == 0)  # no token id reaches these rows


def test_random_7b_rotary_frequencies_are_what_transformers_computes(random_1_layer):
    for module in random_1_layer.backbone.modules():
        if "RotaryEmbedding" in type(module).__name__:
            fresh = type(module)(module.config)
            assert torch.equal(module.inv_freq, fresh.inv_freq), type(module).__name__
    assert torch.isfinite(torch.cat([p.flatten()[:1000] for p in random_1_layer.backbone.parameters()])).all()


def test_random_7b_scores_are_finite_distinct_and_batch_independent(random_1_layer):
    from rewardplug.workload import make_workload

    rm = random_1_layer
    samples = make_workload(rm.processor.tokenizer, 1, 3, 56, 3, 9, seed=4)
    alone = rm.score(samples, batch_size=1)
    together = rm.score(samples, batch_size=3)
    assert all(torch.isfinite(torch.tensor(alone)))
    assert max(abs(a - b) for a, b in zip(alone, together)) <= 1e-5
    assert max(alone) - min(alone) > 1e-3  # different answers, different scores


def test_banner_says_the_scores_mean_nothing():
    text = nm.banner(nm.RANDOM_7B)
    assert "RANDOM WEIGHTS" in text and "mean nothing" in text and "random-7b" in text


def test_bench_cpu_is_written_once_into_the_cache_and_reused_by_later_processes(tmp_path):
    """bench-cpu's checkpoint (about 484 MB) lands in rewardplug's cache folder once; a second process
    finds it there instead of writing another copy (each process used to leave one in /tmp)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "REWARDPLUG_CACHE": str(tmp_path / "cache"), "TMPDIR": str(tmp_path / "tmp")}
    (tmp_path / "tmp").mkdir()
    code = "from rewardplug import named_models as nm; print(nm.checkpoint_path('bench-cpu'))"
    paths = [subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
             .stdout.strip() for _ in range(2)]  # fmt: skip
    assert paths[0] == paths[1] and paths[0].startswith(str(tmp_path / "cache"))
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [os.path.basename(paths[0])]
    assert list((tmp_path / "tmp").iterdir()) == []  # nothing left in the temporary folder
    assert (tmp_path / "cache" / os.path.basename(paths[0]) / "value_head.safetensors").is_file()
