"""Bad checkpoints fail with a message that says what is wrong; the accepted head layouts load."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from conftest import random_image
from safetensors.torch import load_file, save_file

from rewardplug import CheckpointError, RewardModel

HIDDEN = 64  # the tiny checkpoint's hidden size
EXPECTED_HEAD = re.escape("'summary.weight' [1, 64]") + ".*" + re.escape("'summary.bias' [1]")


def load(path, **kwargs) -> RewardModel:
    return RewardModel.from_pretrained(path, dtype="float32", device="cpu", **kwargs)


def copy_checkpoint(tiny_path, tmp_path):
    return shutil.copytree(tiny_path, tmp_path / "ckpt")


def samples() -> list[dict]:
    return [
        {"prompt": "Hi", "completion": "Hello."},
        {"prompt": "Describe.", "completion": "Noise.", "images": [random_image(84, 56, seed=5)]},
    ]


def original_head(tiny_path) -> dict[str, torch.Tensor]:
    return load_file(str(tiny_path / "value_head.safetensors"))


def write_head(path, tensors: dict[str, torch.Tensor]) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "value_head.safetensors"))


def add_to_main_weights(path, tensors: dict[str, torch.Tensor]) -> None:
    state = load_file(str(path / "model.safetensors"))
    state.update(tensors)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})


# ---- value head ---------------------------------------------------------------------------------


def test_missing_head_file_and_no_head_in_main_weights(tiny_path, tmp_path):
    path = copy_checkpoint(tiny_path, tmp_path)
    (path / "value_head.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"value_head\.safetensors.*does not exist") as e:
        load(path)
    assert re.search(EXPECTED_HEAD, str(e.value)), str(e.value)
    assert "v_head.*" in str(e.value)


def test_head_file_with_wrong_keys(tiny_path, tmp_path):
    path = copy_checkpoint(tiny_path, tmp_path)
    write_head(path, {"head.linear.weight": torch.zeros(1, HIDDEN), "head.linear.bias": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"value_head\.safetensors.* has no value head") as e:
        load(path)
    message = str(e.value)
    assert re.search(EXPECTED_HEAD, message), message
    assert "head.linear.weight [1, 64]" in message  # what was found instead


def test_head_with_wrong_hidden_size(tiny_path, tmp_path):
    path = copy_checkpoint(tiny_path, tmp_path)
    write_head(path, {"v_head.summary.weight": torch.zeros(1, 32), "v_head.summary.bias": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"'v_head\.summary\.weight' has shape \[1, 32\], expected \[1, 64\]"):
        load(path)


def test_head_weight_without_bias(tiny_path, tmp_path):
    path = copy_checkpoint(tiny_path, tmp_path)
    write_head(path, {"v_head.summary.weight": original_head(tiny_path)["v_head.summary.weight"]})
    with pytest.raises(CheckpointError, match=r"'v_head\.summary\.weight' but no 'summary\.bias'"):
        load(path)


def test_head_bias_with_wrong_shape(tiny_path, tmp_path):
    path = copy_checkpoint(tiny_path, tmp_path)
    head = original_head(tiny_path)
    write_head(path, {"v_head.summary.weight": head["v_head.summary.weight"], "v_head.summary.bias": torch.zeros(2)})
    with pytest.raises(CheckpointError, match=r"head bias 'v_head\.summary\.bias' has shape \[2\], expected \[1\]"):
        load(path)


def test_several_head_weights_are_ambiguous(tiny_path, tmp_path):
    path = copy_checkpoint(tiny_path, tmp_path)
    head = original_head(tiny_path)
    write_head(path, {**head, "other.summary.weight": head["v_head.summary.weight"].clone()})
    with pytest.raises(CheckpointError, match=r"several head weights"):
        load(path)


def test_score_weight_head_without_bias_loads(model, tiny_path, tmp_path):
    """A sequence-classification style head: score.weight only, bias taken as 0."""
    path = copy_checkpoint(tiny_path, tmp_path)
    head = original_head(tiny_path)
    write_head(path, {"score.weight": head["v_head.summary.weight"]})
    rm = load(path)
    bias = head["v_head.summary.bias"].item()
    assert rm.value_head.bias.item() == 0.0
    assert rm.score(samples()) == pytest.approx([s - bias for s in model.score(samples())], abs=1e-5)


def test_head_in_main_weights_when_head_file_is_absent(model, tiny_path, tmp_path):
    path = copy_checkpoint(tiny_path, tmp_path)
    add_to_main_weights(path, original_head(tiny_path))
    (path / "value_head.safetensors").unlink()
    rm = load(path)
    assert rm.score(samples()) == pytest.approx(model.score(samples()), abs=1e-6)


def test_value_head_none_reads_the_main_weights(model, tiny_path, tmp_path):
    """value_head=None ignores value_head.safetensors (here a different head) and uses model.safetensors."""
    path = copy_checkpoint(tiny_path, tmp_path)
    head = original_head(tiny_path)
    add_to_main_weights(path, head)
    write_head(path, {k: -v for k, v in head.items()})  # a decoy head in the file
    from_main = load(path, value_head=None)
    from_file = load(path)
    expected = model.score(samples())
    assert from_main.score(samples()) == pytest.approx(expected, abs=1e-6)
    assert from_file.score(samples()) == pytest.approx([-s for s in expected], abs=1e-5)


def test_value_head_none_without_head_in_main_weights(tiny_path):
    with pytest.raises(CheckpointError, match=r"main weights of .* has no value head: expected .*summary\.weight"):
        load(tiny_path, value_head=None)


def test_custom_value_head_file_name(model, tiny_path, tmp_path):
    path = copy_checkpoint(tiny_path, tmp_path)
    (path / "value_head.safetensors").rename(path / "reward_head.safetensors")
    assert load(path, value_head="reward_head.safetensors").score(samples()) == pytest.approx(
        model.score(samples()), abs=1e-6
    )


def shard_main_weights(path, head: dict[str, torch.Tensor] | None = None) -> None:
    """Split model.safetensors into two files with an index, as the 7B is stored on the hub."""
    state = load_file(str(path / "model.safetensors"))
    state.update(head or {})
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2 :]}  # fmt: skip
    for file, names in shards.items():
        save_file({k: state[k] for k in names}, str(path / file), metadata={"format": "pt"})
    weight_map = {k: file for file, names in shards.items() for k in names}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "model.safetensors").unlink()


def test_sharded_checkpoint_gives_the_same_scores(model, tiny_path, tmp_path):
    path = copy_checkpoint(tiny_path, tmp_path)
    shard_main_weights(path)
    assert load(path).score(samples()) == pytest.approx(model.score(samples()), abs=1e-6)


def test_head_in_sharded_main_weights(model, tiny_path, tmp_path):
    path = copy_checkpoint(tiny_path, tmp_path)
    shard_main_weights(path, head=original_head(tiny_path))
    (path / "value_head.safetensors").unlink()
    assert load(path).score(samples()) == pytest.approx(model.score(samples()), abs=1e-6)


# ---- folder and config --------------------------------------------------------------------------


def test_folder_without_config(tiny_path, tmp_path):
    path = copy_checkpoint(tiny_path, tmp_path)
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"checkpoint folder .*ckpt.* has no config\.json"):
        load(path)


@pytest.mark.parametrize("name", ["/nonexistent/skywork-rm", "./not-here", "not/a/hub/id", "plainname"])
def test_nonexistent_path_that_is_not_a_hub_id(tmp_path, name, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=r"is neither a checkpoint folder nor a hub id like 'org/name'"):
        load(name)


def test_unsupported_model_type(tiny_path, tmp_path):
    path = copy_checkpoint(tiny_path, tmp_path)
    config = {"model_type": "bert", "architectures": ["BertForSequenceClassification"], "id2label": {"0": "LABEL_0"}}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"holds no reward model rewardplug scores \(model_type 'bert', "
                       r"architectures \['BertForSequenceClassification'\]\).*Qwen2\.5-VL.*'llama', 'qwen2', "
                       r"'qwen3', 'gemma2'"):  # fmt: skip
        load(path)


def test_text_model_that_is_not_a_sequence_classifier(tiny_path, tmp_path):
    """A causal LM has no reward head: the error names its class and what a text reward model is."""
    path = copy_checkpoint(tiny_path, tmp_path)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(CheckpointError, match=r"is a llama model but not a sequence classifier \(model_type 'llama', "
                       r"architectures \['LlamaForCausalLM'\]\).*num_labels == 1"):  # fmt: skip
        load(path)


def test_sequence_classifier_with_several_labels(tiny_path, tmp_path):
    path = copy_checkpoint(tiny_path, tmp_path)
    config = {"model_type": "qwen3", "architectures": ["Qwen3ForSequenceClassification"],
              "id2label": {"0": "bad", "1": "good"}}  # fmt: skip
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"sequence classifier with 2 labels .*Qwen3ForSequenceClassification"
                       r".*exactly one \(num_labels == 1\)"):  # fmt: skip
        load(path)


def test_vision_sequence_classifier_without_score_weight(tiny_path, tmp_path):
    """A Qwen2.5-VL config that names the sequence-classification class, with neither a head file nor
    'score.weight': the error says which head is missing."""
    path = copy_checkpoint(tiny_path, tmp_path)
    config = json.loads((path / "config.json").read_text())
    config.update(architectures=["Qwen2_5_VLForSequenceClassification"], num_labels=1)
    (path / "config.json").write_text(json.dumps(config))
    (path / "value_head.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"Qwen2_5_VLForSequenceClassification.*weights hold no 'score\.weight'"):
        load(path)


def test_unreadable_config(tiny_path, tmp_path):
    path = copy_checkpoint(tiny_path, tmp_path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json in .* cannot be read"):
        load(path)


def test_missing_main_weights(tiny_path, tmp_path):
    path = copy_checkpoint(tiny_path, tmp_path)
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"weights in .* cannot be loaded"):
        load(path)


def test_hub_id_that_cannot_be_fetched(tmp_path, monkeypatch):
    """An 'org/name' that is not a local folder goes to the hub; offline, the error says what to do."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network attempt at all
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=r"could not get 'rewardplug-tests/no-such-rm' from the Hugging Face hub"
                       r".*pass a local folder"):  # fmt: skip
        load("rewardplug-tests/no-such-rm")
