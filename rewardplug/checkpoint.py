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
