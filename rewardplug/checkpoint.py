"""Find a checkpoint's files and read its value head.

Skywork-VL-Reward-7B keeps its scalar head in ``value_head.safetensors`` (``v_head.summary.weight``
[1, hidden], ``v_head.summary.bias`` [1]), written by TRL's old ValueHead. Other checkpoints of the
same shape keep a ``score.weight`` head, in that file or in the main weights. Keys are matched by
suffix so any prefix works.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CheckpointError

logger = logging.getLogger(__name__)

HEAD_SUFFIXES = (("summary.weight", "summary.bias"), ("score.weight", "score.bias"))
MAIN_HEAD_PREFIXES = ("v_head.", "score.")
HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"]


def resolve_checkpoint(name_or_path: str | os.PathLike) -> Path:
    """A local folder as is; anything else is taken as a hub id and downloaded (or read from cache)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"checkpoint folder {str(path)!r} has no config.json")
        return path
    name = str(name_or_path)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise CheckpointError(f"{name!r} is neither a checkpoint folder nor a hub id like 'org/name'")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=name, allow_patterns=HUB_FILES))
    except Exception as e:
        raise CheckpointError(
            f"could not get {name!r} from the Hugging Face hub ({type(e).__name__}: {e}); "
            "pass a local folder instead, or set HF_ENDPOINT / log in if the hub is reachable"
        ) from None


def read_value_head(folder: Path, filename: str | None, hidden_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (weight [1, hidden], bias [1]) as fp32 tensors on the CPU."""
    from safetensors import safe_open

    expected = (
        f"a weight ending in 'summary.weight' [1, {hidden_size}] with 'summary.bias' [1], "
        f"or 'score.weight' [1, {hidden_size}] (bias optional)"
    )
    if filename:
        head_file = folder / filename
        if head_file.is_file():
            with safe_open(str(head_file), framework="pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            return _pick_head(tensors, str(head_file), hidden_size, expected)
        main = _main_head_tensors(folder)
        if not main:
            raise CheckpointError(
                f"value head file {str(head_file)!r} does not exist, and the main weights hold no "
                f"'v_head.*' or 'score.*' keys; expected {expected}"
            )
        logger.info("no %s in %s: using the head stored in the main weights", filename, folder)
        return _pick_head(main, f"main weights of {str(folder)!r}", hidden_size, expected)
    main = _main_head_tensors(folder)
    return _pick_head(main, f"main weights of {str(folder)!r}", hidden_size, expected)


def _pick_head(tensors: dict, where: str, hidden: int, expected: str) -> tuple[torch.Tensor, torch.Tensor]:
    shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in sorted(tensors.items())) or "no keys"
    for weight_suffix, bias_suffix in HEAD_SUFFIXES:
        weights = [k for k in tensors if k.endswith(weight_suffix)]
        if not weights:
            continue
        if len(weights) > 1:
            raise CheckpointError(f"{where} has several head weights {weights}; expected exactly one")
        weight = tensors[weights[0]]
        if tuple(weight.shape) != (1, hidden):
            raise CheckpointError(
                f"{where}: head weight {weights[0]!r} has shape {list(weight.shape)}, expected [1, {hidden}] "
                f"(the backbone's hidden size)"
            )
        biases = [k for k in tensors if k.endswith(bias_suffix)]
        if biases:
            bias = tensors[biases[0]]
            if bias.numel() != 1:
                raise CheckpointError(f"{where}: head bias {biases[0]!r} has shape {list(bias.shape)}, expected [1]")
            bias = bias.reshape(1)
        elif weight_suffix == "summary.weight":
            raise CheckpointError(f"{where} has {weights[0]!r} but no 'summary.bias'; found: {shapes}")
        else:
            bias = torch.zeros(1)
        return weight.float().clone(), bias.float().clone()
    raise CheckpointError(f"{where} has no value head: expected {expected}; found: {shapes}")


def _main_head_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Head tensors (v_head.* / score.*) stored in the main safetensors files, if any."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files: dict[str, list[str]] = {}
        for key, file in weight_map.items():
            if key.startswith(MAIN_HEAD_PREFIXES):
                files.setdefault(file, []).append(key)
    elif (folder / "model.safetensors").is_file():
        files = {"model.safetensors": None}
    else:
        return {}
    found = {}
    for file, keys in files.items():
        with safe_open(str(folder / file), framework="pt") as f:
            for key in keys if keys is not None else f.keys():
                if key.startswith(MAIN_HEAD_PREFIXES):
                    found[key] = f.get_tensor(key)
    return found


# ---- what kind of reward model a checkpoint holds --------------------------------------------------

VISION_MODEL_TYPES = ("qwen2_5_vl", "qwen2_vl")
# Text models whose *ForSequenceClassification is transformers' GenericForSequenceClassification (pooling
# at the last token that is not the pad token) and whose scores rewardplug checks against it.
TEXT_MODEL_TYPES = ("llama", "qwen2", "qwen3", "gemma2")


@dataclass(frozen=True)
class CheckpointKind:
    """What ``detect_checkpoint`` found: how the folder's reward model is built and scored.

    kind: "value_head" (a Qwen2-VL / Qwen2.5-VL backbone with a separate value head, Skywork-VL-Reward),
    "vision_seq_cls" (the same backbone with a sequence-classification ``score`` head in its weights), or
    "text_seq_cls" (a text ``*ForSequenceClassification`` model with one label).
    """

    kind: str
    model_type: str
    architectures: tuple[str, ...]


def detect_checkpoint(folder: Path, value_head: str | None = "value_head.safetensors") -> CheckpointKind:
    """The kind of reward model in ``folder``, from its config and files; ``CheckpointError`` naming
    what was found when it is none rewardplug scores."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"config.json in {str(folder)!r} cannot be read: {e}") from None
    model_type = str(config.get("model_type"))
    archs = tuple(str(a) for a in config.get("architectures") or ())
    seq_cls = any(a.endswith("ForSequenceClassification") for a in archs)
    labels = _num_labels(config)
    found = f"model_type {model_type!r}, architectures {list(archs)}"
    if seq_cls and labels != 1:
        raise CheckpointError(
            f"{str(folder)!r} holds a sequence classifier with {labels} labels ({found}); a reward model "
            "has exactly one (num_labels == 1)"
        )
    if model_type in VISION_MODEL_TYPES:
        # A *ForSequenceClassification config means the 'score' head in the main weights, unless a value
        # head file is there; any other config is the value-head layout (its loader says what is missing).
        if seq_cls and not (value_head and (folder / value_head).is_file()):
            if "score.weight" not in _main_keys(folder):
                raise CheckpointError(f"{str(folder)!r} says {found} but its weights hold no 'score.weight'")
            return CheckpointKind("vision_seq_cls", model_type, archs)
        return CheckpointKind("value_head", model_type, archs)
    if model_type in TEXT_MODEL_TYPES and seq_cls:
        return CheckpointKind("text_seq_cls", model_type, archs)
    if model_type in TEXT_MODEL_TYPES:
        raise CheckpointError(
            f"{str(folder)!r} is a {model_type} model but not a sequence classifier ({found}); a text reward "
            "model must be an AutoModelForSequenceClassification checkpoint with num_labels == 1"
        )
    raise CheckpointError(
        f"{str(folder)!r} holds no reward model rewardplug scores ({found}). Supported: a Qwen2-VL / "
        f"Qwen2.5-VL backbone with value_head.safetensors or a 'score' head, and *ForSequenceClassification "
        f"checkpoints with num_labels == 1 of model_type {list(TEXT_MODEL_TYPES)}"
    )


def _num_labels(config: dict) -> int:
    if "id2label" in config and isinstance(config["id2label"], dict):
        return len(config["id2label"])
    return int(config.get("num_labels", 2))  # transformers' default


def _main_keys(folder: Path) -> list[str]:
    """Tensor names of the main weights (from the index, or the single file's header)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return list(json.loads(index.read_text())["weight_map"])
    single = folder / "model.safetensors"
    if not single.is_file():
        return []
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as f:
        return list(f.keys())
