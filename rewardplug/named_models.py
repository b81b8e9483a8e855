"""Built-in model names that every command and loader accepts beside hub ids and folders.

``tiny`` is the embedded tiny checkpoint (random weights, the exact hub format, built in seconds);
``bench-cpu`` a CPU-sized model with the 7B's proportions; ``random-7b`` the Qwen2.5-VL-7B
architecture with random weights built on the target device (no download). Their scores mean
nothing: ``is_random`` says so and ``banner`` is what a command prints when one is used.

``random-7b`` is built on the meta device from a weightless folder (the 7B's config.json with the
tiny checkpoint's tokenizer, processor and token ids), then its tensors are allocated on the target
device in the target dtype and filled there from an integer hash of (tensor, element index): the
same values on every device and in every dtype (up to the dtype's rounding), so a CPU fp32 copy and
a GPU bf16 copy are the same model. Seconds, no download, nothing on disk but the small folder.
``layers`` keeps the first N of its 28 language layers (and 32 x N / 28 vision blocks) for machines
too small for the whole model.
"""

from __future__ import annotations

import math
import os
import zlib
from pathlib import Path
from typing import Any

TINY = "tiny"
BENCH_CPU = "bench-cpu"
RANDOM_7B = "random-7b"
RANDOM_WEIGHTS = (TINY, BENCH_CPU, RANDOM_7B)

RANDOM_7B_LAYERS = 28  # Qwen2.5-VL-7B's language layers
RANDOM_7B_VISION_DEPTH = 32
RANDOM_7B_STD = 0.02  # the config's initializer_range: the std of every matrix and embedding


def banner(model: str) -> str:
    """The warning a command prints whenever a random-weight model is used."""
    return (
        "=" * 78
        + f"\n  model {model!r}: RANDOM WEIGHTS, the scores mean nothing.\n"
        "  It runs the same loading and scoring code as the real model. With the real weights:\n"
        "    --model Skywork/Skywork-VL-Reward-7B\n"
        + "=" * 78
    )


def is_random(model: str | os.PathLike) -> bool:
    """True for the built-in random-weight names."""
    return str(model) in RANDOM_WEIGHTS


def checkpoint_path(model: str | os.PathLike) -> str:
    """A model argument as something ``RewardModel.from_pretrained`` reads: ``tiny`` and ``bench-cpu``
    become folders written once per process (cached); hub ids and folders are returned unchanged.
    ``random-7b`` has no folder: load it with ``load``."""
    model = str(model)
    if model == TINY:
        from .testing import cached_tiny_checkpoint

        return str(cached_tiny_checkpoint())
    if model == BENCH_CPU:
        return str(_bench_cpu_checkpoint())
    if model == RANDOM_7B:
        raise ValueError("'random-7b' is built on the device, not read from a folder: use rewardplug.named_models.load")
    return model


def load(model: str | os.PathLike, **options: Any):
    """``RewardModel.from_pretrained`` for a hub id, a folder or a built-in name.

    For ``random-7b`` also: ``layers`` (language layers, 1-28, default 28) and ``seed`` (default 0);
    ``dtype`` defaults to the 7B's bf16 and ``device`` to the first GPU, else the CPU. Other names
    refuse ``layers``."""
    if str(model) == RANDOM_7B:
        return load_random_7b(**options)
    if options.pop("layers", None) is not None:
        raise ValueError(f"layers applies to {RANDOM_7B!r} only, not to {str(model)!r}")
    from .model import RewardModel

    return RewardModel.from_pretrained(checkpoint_path(model), **options)


# ---- random-7b -------------------------------------------------------------------------------------


def random_7b_config(layers: int | None = None) -> dict:
    """Qwen2.5-VL-7B's config.json with the tiny tokenizer's special-token ids (the vocabulary stays
    152,064 rows) and, for ``layers`` < 28, the first ``layers`` language layers and
    ``round(32 x layers / 28)`` vision blocks, full attention in every 8th block and the last."""
    import copy

    from .testing import QWEN2_5_VL_7B_CONFIG, tiny_config

    layers = RANDOM_7B_LAYERS if layers is None else int(layers)
    if not 1 <= layers <= RANDOM_7B_LAYERS:
        raise ValueError(f"layers must be between 1 and {RANDOM_7B_LAYERS}, got {layers}")
    config = copy.deepcopy(QWEN2_5_VL_7B_CONFIG)
    tiny = tiny_config()
    for key in ("bos_token_id", "eos_token_id", "image_token_id", "video_token_id", "vision_start_token_id",
                "vision_end_token_id", "vision_token_id"):  # fmt: skip
        config[key] = tiny[key]
    depth = max(1, round(RANDOM_7B_VISION_DEPTH * layers / RANDOM_7B_LAYERS))
    config.update(num_hidden_layers=layers, max_window_layers=layers)
    config["vision_config"].update(depth=depth, fullatt_block_indexes=_full_attention_blocks(depth))
    return config


def _full_attention_blocks(depth: int) -> list[int]:
    """The 7B's pattern (7, 15, 23, 31 of 32: every 8th block) for ``depth`` blocks, the last always."""
    return sorted({k for k in range(depth) if (k + 1) % 8 == 0} | {depth - 1})


def load_random_7b(*, layers: int | None = None, seed: int = 0, dtype: Any = "auto", device: Any = None, **options: Any):
    """The Qwen2.5-VL-7B reward model with random weights, built on ``device`` in ``dtype``.

    options: any other ``RewardModel.from_pretrained`` option (image bounds, attention implementation,
    caches, ...) except ``device_map``/``max_memory`` (one device)."""
    import torch

    from .model import RewardModel

    if options.get("device_map") is not None or options.get("max_memory") is not None:
        raise ValueError(f"{RANDOM_7B!r} is built on one device: pass device, not device_map/max_memory")
    options.pop("device_map", None)
    options.pop("max_memory", None)
    options.pop("value_head", None)
    resize_on_device = options.pop("resize_on_device", None)
    target = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if target.type == "cuda" and target.index is None:
        target = torch.device("cuda", torch.cuda.current_device())
    folder = random_7b_folder(layers)
    rm = RewardModel.from_pretrained(folder, dtype=dtype, device="meta", **options)
    materialize(rm, target, seed)
    rm.name_or_path = RANDOM_7B
    rm.encoder.resize_on_device = bool(target.type == "cuda" if resize_on_device is None else resize_on_device)
    return rm


_RANDOM_7B_DIRS: dict[int, Path] = {}


def random_7b_folder(layers: int | None = None) -> Path:
    """The weightless folder ``random-7b`` is built from (config.json, tokenizer, processor), written
    once per process and layer count. The processor keeps the 7B's pixel bounds."""
    config = random_7b_config(layers)
    n = config["num_hidden_layers"]
    folder = _RANDOM_7B_DIRS.get(n)
    if folder is None or not (folder / "config.json").is_file():
        import tempfile

        from .testing import make_tiny_checkpoint

        root = Path(tempfile.mkdtemp(prefix="rewardplug-random-7b-"))
        folder = make_tiny_checkpoint(root / f"random-7b-{n}-layers", config=config, weights=False,
                                      max_pixels=12845056)  # fmt: skip
        _RANDOM_7B_DIRS[n] = folder
    return folder


def materialize(rm, device, seed: int = 0) -> None:
    """Allocate a meta-device RewardModel's tensors on ``device`` (their dtypes kept) and fill them:
    matrices and embeddings uniform with std 0.02, biases 0, norms 1, the value head with std
    1/sqrt(hidden) (so scores spread about one unit), rotary frequencies as transformers computes them.
    A tensor's values depend on its name and the seed only, so fewer layers give a prefix of the model.
    Embedding rows past the tokenizer's ids (the tiny tokenizer has 270 of the 152,064) are 0."""
    import torch
    from torch import nn

    with torch.no_grad():
        rm.backbone.to_empty(device=device)
        rm.value_head.to_empty(device=device)
        hidden = rm.value_head.in_features
        embed = rm.backbone.get_input_embeddings().weight
        for name, param in rm.backbone.named_parameters():
            if param is embed:  # rows no token id of the tokenizer reaches stay 0: a 545M-value fill saved
                used = len(rm.processor.tokenizer)
                param[used:].zero_()
                hash_uniform_(param[:used], RANDOM_7B_STD, seed, zlib.crc32(name.encode()))
            elif name.endswith("bias"):
                param.zero_()
            elif "norm" in name or "ln_q" in name:
                param.fill_(1.0)
            else:
                hash_uniform_(param, RANDOM_7B_STD, seed, zlib.crc32(name.encode()))
        hash_uniform_(rm.value_head.weight, 1 / math.sqrt(hidden), seed, zlib.crc32(b"value_head.weight"))
        rm.value_head.bias.zero_()
        for module in rm.backbone.modules():
            if "RotaryEmbedding" in type(module).__name__ and hasattr(module, "inv_freq"):
                fresh = type(module)(module.config)  # on the CPU, as transformers builds it
                for name, buffer in fresh.named_buffers():
                    getattr(module, name).copy_(buffer)
        leftover = [n for n, b in rm.backbone.named_buffers()
                    if not any(n.endswith(s) for s in ("inv_freq", "original_inv_freq"))]  # fmt: skip
        if leftover:  # a buffer to_empty left uninitialized that nobody fills: refuse rather than run on garbage
            raise RuntimeError(f"random-7b: no initializer for buffers {leftover}")
    assert isinstance(rm.value_head, nn.Linear)


_M32 = 0xFFFFFFFF
_CHUNK = 1 << 20  # elements hashed at once: small in-place temporaries, cache-resident on a CPU


def hash_uniform_(tensor, std: float, seed: int, salt: int) -> None:
    """Fill ``tensor`` in place with uniform values of standard deviation ``std`` from a 32-bit integer
    hash of (seed, salt, element index): integer arithmetic, exact on every device, then one fp32
    multiply, so the values are bitwise the same on a CPU and a GPU before the cast to the dtype."""
    import torch

    flat = tensor.view(-1)
    total = flat.numel()
    scale = std * math.sqrt(3.0)  # uniform on [-a, a] has std a / sqrt(3)
    base = ((seed * 0x9E3779B1) ^ ((salt & _M32) * 0x85EBCA6B)) & _M32
    chunk = min(_CHUNK if flat.device.type == "cpu" else 1 << 26, total)
    x = torch.empty(chunk, device=flat.device, dtype=torch.int64)
    y = torch.empty_like(x)
    u = torch.empty(chunk, device=flat.device, dtype=torch.float32)
    for start in range(0, total, chunk):
        n = min(chunk, total - start)
        xs, ys, us = x[:n], y[:n], u[:n]
        torch.arange(start + base, start + base + n, out=xs)
        xs.bitwise_and_(_M32)
        for _ in range(2):  # a well-mixing 32-bit hash; products stay below 2**59
            torch.bitwise_right_shift(xs, 16, out=ys)
            xs.bitwise_xor_(ys).mul_(0x45D9F3B).bitwise_and_(_M32)
        torch.bitwise_right_shift(xs, 16, out=ys)
        xs.bitwise_xor_(ys).bitwise_right_shift_(8)  # 24 bits
        us.copy_(xs).mul_(2.0 / (1 << 24)).sub_(1.0)  # exact: multiples of 2**-23 in [-1, 1)
        flat[start : start + n].copy_(us.mul_(scale))


# ---- bench-cpu -------------------------------------------------------------------------------------

def _bench_cpu_checkpoint() -> Path:
    """bench-cpu's checkpoint (484 MB: the full vocabulary), written once into rewardplug's cache folder
    and reused by every later process; its name carries a digest of its config, so a changed config
    gets a new folder. (It used to be written into a new temporary folder per process, never removed.)"""
    from .bench import bench_cpu_config
    from .encoding.digests import digest
    from .testing import cached_checkpoint, make_tiny_checkpoint

    config = bench_cpu_config()
    name = f"bench-cpu-{digest(config, 12845056)[:12]}"
    return cached_checkpoint(name, lambda folder: make_tiny_checkpoint(folder, seed=0, config=config,
                                                                       max_pixels=12845056))  # fmt: skip
