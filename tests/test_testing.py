"""make_tiny_checkpoint writes a deterministic folder in the exact layout of the hub checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from rewardplug.testing import SPECIAL_TOKENS, make_tiny_checkpoint, tiny_config

WEIGHT_FILES = ("model.safetensors", "value_head.safetensors")


def keys_and_shapes(file) -> dict[str, list[int]]:
    with safe_open(str(file), framework="pt") as f:
        return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}


def test_same_seed_gives_byte_identical_weights(tmp_path):
    a = make_tiny_checkpoint(tmp_path / "a", seed=3)
    b = make_tiny_checkpoint(tmp_path / "b", seed=3)
    c = make_tiny_checkpoint(tmp_path / "c", seed=4)
    for name in WEIGHT_FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), f"{name} differs for the same seed"
        assert (a / name).read_bytes() != (c / name).read_bytes(), f"{name} is the same for different seeds"
    for name in ("config.json", "tokenizer.json", "chat_template.json", "preprocessor_config.json"):
        assert (a / name).read_bytes() == (c / name).read_bytes(), name


def test_folder_layout(tiny_path):
    names = {p.name for p in tiny_path.iterdir()}
    expected = {"config.json", "model.safetensors", "value_head.safetensors", "tokenizer.json",
                "tokenizer_config.json", "chat_template.json", "preprocessor_config.json"}  # fmt: skip
    assert expected <= names, f"missing: {expected - names}"


def test_config_is_in_the_hub_flat_form(tiny_path):
    config = json.loads((tiny_path / "config.json").read_text())
    assert config["model_type"] == "qwen2_5_vl"
    assert config["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    assert "text_config" not in config, "the hub's Qwen2.5-VL configs keep text settings at top level"
    assert config["hidden_size"] == 64 and config["num_hidden_layers"] == 2
    assert isinstance(config["vision_config"], dict)
    assert config["vision_config"]["out_hidden_size"] == config["hidden_size"]
    assert sum(config["rope_scaling"]["mrope_section"]) == config["hidden_size"] // config["num_attention_heads"] // 2
    assert config == tiny_config()


def test_main_weights_use_the_hub_key_names(tiny_path):
    shapes = keys_and_shapes(tiny_path / "model.safetensors")
    keys = list(shapes)
    assert any(k.startswith("model.layers.0.self_attn.q_proj.") for k in keys)
    assert "model.embed_tokens.weight" in keys and "model.norm.weight" in keys
    assert any(k.startswith("visual.blocks.0.") for k in keys)
    assert any(k.startswith("visual.merger.") for k in keys)
    assert shapes["lm_head.weight"] == [len(SPECIAL_TOKENS) + 256, 64]
    # transformers 5 renamed these inside the model; the files on the hub keep the old names.
    assert not any(k.startswith(("model.language_model.", "model.visual.")) for k in keys)
    assert not any(k.startswith(("v_head.", "score.")) for k in keys), "the head lives in its own file"


def test_value_head_file(tiny_path):
    assert keys_and_shapes(tiny_path / "value_head.safetensors") == {
        "v_head.summary.weight": [1, 64],
        "v_head.summary.bias": [1],
    }


def test_tokenizer_and_processor_files(tiny_path):
    from transformers import AutoProcessor

    template = json.loads((tiny_path / "chat_template.json").read_text())["chat_template"]
    assert "<|vision_start|><|image_pad|><|vision_end|>" in template
    assert "You are a helpful assistant." in template
    preprocessor = json.loads((tiny_path / "preprocessor_config.json").read_text())
    assert preprocessor["image_processor_type"] == "Qwen2VLImageProcessor"
    assert (preprocessor["patch_size"], preprocessor["merge_size"], preprocessor["min_pixels"]) == (14, 2, 3136)

    processor = AutoProcessor.from_pretrained(tiny_path)
    tok = processor.tokenizer
    config = tiny_config()
    assert tok.convert_tokens_to_ids("<|image_pad|>") == config["image_token_id"]
    assert tok.convert_tokens_to_ids("<|vision_start|>") == config["vision_start_token_id"]
    assert tok.convert_tokens_to_ids("<|im_end|>") == config["eos_token_id"]
    assert tok.pad_token == "<|endoftext|>"
    text = "Héllo, wörld! 你好"
    assert tok.decode(tok(text)["input_ids"]) == text  # byte-level: any text round-trips


def test_weightless_folder(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "w", weights=False)
    assert (path / "config.json").is_file() and (path / "tokenizer.json").is_file()
    assert not (path / "model.safetensors").exists() and not (path / "value_head.safetensors").exists()


@pytest.mark.parametrize("seed", [0, 1])
def test_random_weights_are_usable(seed, tmp_path):
    """Each seed gives a model that loads in its declared dtype (float32) and gives finite, spread-out scores."""
    from conftest import random_image

    from rewardplug import RewardModel

    rm = RewardModel.from_pretrained(make_tiny_checkpoint(tmp_path / "rm", seed=seed), device="cpu")
    assert rm.dtype == torch.float32
    scores = rm.score([{"prompt": "Hi", "completion": "Hello."}, {"prompt": "Hi", "completion": "Go away."},
                       {"prompt": "Look.", "completion": "Noise.", "images": [random_image(56, 84)]}])  # fmt: skip
    assert all(abs(s) < 100 for s in scores)
    assert max(scores) - min(scores) > 1e-3, scores


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma2", "qwen2_vl", "qwen2_5_vl"])
def test_seq_cls_checkpoint_has_the_hub_layout(tmp_path, family):
    """config.json names the family's *ForSequenceClassification with one label; the weights hold
    score.weight [1, hidden] and no lm_head; the tokenizer carries the family's template and padding."""
    from safetensors import safe_open
    from transformers import AutoTokenizer

    from rewardplug.testing import SEQ_CLS_FAMILIES, make_tiny_seq_cls_checkpoint

    path = make_tiny_seq_cls_checkpoint(tmp_path / family, family)
    config = json.loads((path / "config.json").read_text())
    text = config.get("text_config", config)  # vision configs nest the language model's (transformers 5)
    assert config["architectures"][0].endswith("ForSequenceClassification")
    assert len(config["id2label"]) == 1 and text["pad_token_id"] is not None
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
        assert list(f.get_tensor("score.weight").shape) == [1, text["hidden_size"]]
    assert not any(k.startswith("lm_head") for k in keys)
    assert not (path / "value_head.safetensors").exists()
    if family in SEQ_CLS_FAMILIES:
        spec = SEQ_CLS_FAMILIES[family]
        tokenizer = AutoTokenizer.from_pretrained(path)
        assert tokenizer.padding_side == spec.padding_side
        assert tokenizer.pad_token_id == config["pad_token_id"] == tokenizer.convert_tokens_to_ids(spec.pad)
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}], tokenize=False)
        ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
        if spec.bos is not None:  # the template writes the BOS; the tokenizer would add a second one
            assert ids.count(tokenizer.bos_token_id) == 1
            assert tokenizer(rendered)["input_ids"][:2] == [tokenizer.bos_token_id] * 2
