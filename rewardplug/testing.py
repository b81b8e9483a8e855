"""Checkpoints in the exact hub format of Skywork-VL-Reward-7B, made offline.

``make_tiny_checkpoint`` writes a small random-weight Qwen2.5-VL reward model: ``config.json`` in the
flat form of the hub's Qwen2.5-VL configs, ``model.safetensors`` with the hub's key names
(``model.layers.*``, ``visual.*``, ``lm_head.weight``), ``value_head.safetensors``
(``v_head.summary.weight`` / ``v_head.summary.bias``), a byte-level Qwen2 tokenizer with the Qwen
special tokens and the Qwen2-VL chat template, and the image processor config. The weights are random:
scores mean nothing, but every code path that loads and runs the real 7B runs on it. Deterministic for
a given seed; built in seconds. Use it in your own CI.

>>> from rewardplug import RewardModel
>>> from rewardplug.testing import make_tiny_checkpoint
>>> path = make_tiny_checkpoint("/tmp/tiny-rm")
>>> rm = RewardModel.from_pretrained(path)
>>> rm.score([{"prompt": "Hi", "completion": "Hello!"}])  # doctest: +SKIP
[0.0213...]
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# Qwen2.5-VL's special tokens, in the hub's order. The tiny tokenizer gives them ids after its 256 bytes.
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]  # fmt: skip

# The chat template shipped with Qwen2.5-VL-7B-Instruct (and so with Skywork-VL-Reward-7B).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# config.json of Qwen2.5-VL-7B-Instruct / Skywork-VL-Reward-7B in the hub's flat form.
QWEN2_5_VL_7B_CONFIG: dict[str, Any] = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "hidden_act": "silu",
    "hidden_size": 3584,
    "image_token_id": 151655,
    "initializer_range": 0.02,
    "intermediate_size": 18944,
    "max_position_embeddings": 128000,
    "max_window_layers": 28,
    "model_type": "qwen2_5_vl",
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"mrope_section": [16, 24, 24], "rope_type": "default", "type": "default"},
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_sliding_window": False,
    "video_token_id": 151656,
    "vision_config": {
        "depth": 32,
        "hidden_act": "silu",
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "in_chans": 3,
        "out_hidden_size": 3584,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "spatial_patch_size": 14,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2,
        "temporal_patch_size": 2,
    },
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "vocab_size": 152064,
}

TINY_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


def tiny_config(**overrides: Any) -> dict[str, Any]:
    """The tiny checkpoint's config.json: the 7B's shape, scaled down, with the tiny tokenizer's ids."""
    ids = {tok: 256 + i for i, tok in enumerate(SPECIAL_TOKENS)}
    cfg = copy.deepcopy(QWEN2_5_VL_7B_CONFIG)
    cfg.update(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_window_layers=2, vocab_size=TINY_VOCAB_SIZE,
        rope_scaling={"mrope_section": [2, 3, 3], "rope_type": "default", "type": "default"},
        torch_dtype="float32", initializer_range=0.1,
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        vision_token_id=ids["<|vision_pad|>"],
    )  # fmt: skip
    cfg["vision_config"].update(
        depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
        fullatt_block_indexes=[1],
    )  # fmt: skip
    for key, value in overrides.items():
        if key == "vision_config":
            cfg["vision_config"].update(value)
        else:
            cfg[key] = value
    return cfg


def make_tiny_checkpoint(
    path: str | os.PathLike,
    *,
    seed: int = 0,
    config: dict[str, Any] | None = None,
    max_pixels: int = 256 * 28 * 28,
    weights: bool = True,
) -> Path:
    """Write a complete hub-format reward-model folder at ``path`` and return it.

    config: a full config.json dict (default ``tiny_config()``); pass ``QWEN2_5_VL_7B_CONFIG`` with
        ``weights=False`` for a weightless folder that loads on the meta device.
    max_pixels: the image processor's default max_pixels (small, so CPU tests stay fast).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(config or tiny_config())
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    _write_processor(path, max_pixels)
    if weights:
        _write_weights(path, config, seed)
    return path


def cached_tiny_checkpoint(seed: int = 0) -> Path:
    """The tiny checkpoint in rewardplug's cache folder, built once (atomically, so parallel workers
    and Ray actors can call this at the same time)."""
    name = f"tiny-qwen2.5-vl-rm-seed{seed}-v1"
    return cached_checkpoint(name, lambda folder: make_tiny_checkpoint(folder, seed=seed))


def cached_checkpoint(name: str, build) -> Path:
    """``build(folder)``'s checkpoint in rewardplug's cache folder (``$REWARDPLUG_CACHE``, default
    ``~/.cache/rewardplug``) under ``name``, built once and reused by every later process (atomically:
    parallel workers and Ray actors may call this at the same time). ``name`` must change whenever what
    ``build`` writes does."""
    root = Path(os.environ.get("REWARDPLUG_CACHE", Path.home() / ".cache" / "rewardplug"))
    target = root / name
    if (target / "value_head.safetensors").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
    try:
        build(tmp)
        os.rename(tmp, target)
    except OSError:
        if not (target / "value_head.safetensors").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _write_processor(path: Path, max_pixels: int) -> None:
    """Tokenizer, chat template and image processor config, laid out as on the hub."""
    from transformers import Qwen2Tokenizer

    vocab = {ch: i for i, ch in enumerate(_byte_symbols() + SPECIAL_TOKENS)}
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=[], eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token=None, model_max_length=131072,
    )  # fmt: skip
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    tokenizer.save_pretrained(path)
    (path / "chat_template.json").write_text(json.dumps({"chat_template": QWEN2_VL_CHAT_TEMPLATE}, indent=2) + "\n")
    (path / "chat_template.jinja").unlink(missing_ok=True)
    preprocessor = {
        "min_pixels": 3136,
        "max_pixels": max_pixels,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2_5_VLProcessor",
    }
    (path / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")


def _byte_symbols() -> list[str]:
    """The 256 printable symbols that byte-level BPE (GPT-2, Qwen) uses for the bytes 0..255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def hub_key(key: str) -> str:
    """transformers 5 parameter name -> the key it has in the hub's safetensors files."""
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model.") :]
    if key.startswith("model.visual."):
        return key[len("model.") :]
    return key


def _write_weights(path: Path, config: dict, seed: int) -> None:
    from safetensors.torch import save_file
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    hf_config = AutoConfig.from_pretrained(path)
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = Qwen2_5_VLForConditionalGeneration._from_config(hf_config, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in model.state_dict().items():
        # Fresh draws instead of the library's init: fixed by the seed whatever transformers does, and
        # large enough that different samples get clearly different scores.
        if name.endswith("norm.weight") or name.endswith("ln_q.weight") or ".norm" in name:
            value = 1.0 + 0.1 * torch.randn(tensor.shape, generator=generator)
        else:
            value = 0.1 * torch.randn(tensor.shape, generator=generator)
        state[hub_key(name)] = value.contiguous()
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    hidden = config["hidden_size"]
    head = {
        "v_head.summary.weight": torch.randn((1, hidden), generator=generator) / hidden**0.5,
        "v_head.summary.bias": 0.1 * torch.randn((1,), generator=generator),
    }
    save_file(head, str(path / "value_head.safetensors"), metadata={"format": "pt"})


def make_tiny_text_policy(path: str | os.PathLike, *, seed: int = 2) -> Path:
    """A tiny random text-only policy (Qwen2 causal LM) sharing the tiny checkpoint's tokenizer, for
    testing RL loops whose policy is a plain LLM while the reward model sees no images."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    _write_processor(path, 256 * 28 * 28)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = QWEN2_VL_CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    for name in ("preprocessor_config.json", "chat_template.json"):
        (path / name).unlink(missing_ok=True)
    config = Qwen2Config(
        vocab_size=TINY_VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        bos_token_id=256, eos_token_id=258, pad_token_id=256, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    Qwen2ForCausalLM(config).save_pretrained(path)
    return path


# ---- preference data for offline evaluation and pair building -------------------------------------

VLREWARDBENCH_SOURCES = ["WildVision", "VLFeedback", "POVID", "RLAIF-V", "RLHF-V", "MMMU-Pro", "MathVerse"]


def _noise_png(rng, width: int, height: int) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    pixels = (rng.random((height, width, 3)) * 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def _words(rng, n: int) -> str:
    vocab = ["red", "circle", "noise", "pixel", "blue", "the", "a", "picture", "shows", "maybe", "green", "square"]
    return " ".join(vocab[int(i)] for i in rng.integers(0, len(vocab), n))


def make_preference_set(
    path: str | os.PathLike,
    *,
    n_pairs: int = 8,
    layout: str = "vlrewardbench",
    fmt: str = "jsonl",
    images: str = "path",
    ties: int = 1,
    seed: int = 0,
) -> Path:
    """Write a small preference data set with generated images and return its path.

    layout: "vlrewardbench" (id, query, image, response [2 answers], human_ranking, models,
        query_source cycling through VL-RewardBench's sources) or "pairs" (prompt, images, chosen,
        rejected, category).
    fmt: "jsonl" (file), "parquet" (file) or "dataset" (a datasets.save_to_disk folder).
    images: "path" (PNG files next to the data, stored relative), "bytes" (PNG bytes; in JSONL a
        ``data:image/png;base64,`` URI; in parquet a ``{"bytes", "path"}`` dict) or "pil" (dataset only:
        an Image feature, read back as PIL images).
    ties: the first ``ties`` pairs get the same answer twice (equal scores: a tie, counted wrong).
    Answers are random words: which of a pair scores higher is whatever the model says; compute it with
    ``RewardModel.score``. Deterministic for a seed.
    """
    import base64

    import numpy as np

    if layout not in ("vlrewardbench", "pairs") or fmt not in ("jsonl", "parquet", "dataset"):
        raise ValueError(f"unknown layout {layout!r} or fmt {fmt!r}")
    if images not in ("path", "bytes", "pil") or (images == "pil" and fmt != "dataset"):
        raise ValueError(f"images={images!r} does not fit fmt={fmt!r}")
    path = Path(path)
    root = path if fmt == "dataset" else path.parent
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    questions = ["What is in the picture?", "Describe the image.", "Which colors dominate?", "Count the shapes."]
    rows = []
    for i in range(n_pairs):
        png = _noise_png(rng, int(rng.integers(40, 120)), int(rng.integers(40, 120)))
        if images == "path":
            (root / "images").mkdir(exist_ok=True)
            (root / "images" / f"img{i}.png").write_bytes(png)
            image: Any = f"images/img{i}.png"
        elif images == "bytes" and fmt == "jsonl":
            image = "data:image/png;base64," + base64.b64encode(png).decode()
        elif images == "bytes" and fmt == "parquet":
            image = {"bytes": png, "path": None}
        else:
            image = png
        if images == "pil":
            import io

            from PIL import Image

            image = Image.open(io.BytesIO(png))
        good = _words(rng, int(rng.integers(3, 30)))
        bad = good if i < ties else _words(rng, int(rng.integers(3, 30)))
        question = questions[i % len(questions)]
        source = VLREWARDBENCH_SOURCES[i % len(VLREWARDBENCH_SOURCES)]
        if layout == "vlrewardbench":
            first_is_best = bool(rng.integers(0, 2))
            rows.append({
                "id": f"{source}_{i}", "query": question, "image": image,
                "response": [good, bad] if first_is_best else [bad, good],
                "human_ranking": [0, 1] if first_is_best else [1, 0],
                "models": ["model-a", "model-b"], "query_source": source,
            })  # fmt: skip
        else:
            rows.append({"prompt": question, "images": [image], "chosen": good, "rejected": bad,
                         "category": ["alpha", "beta", "gamma"][i % 3]})  # fmt: skip
    if fmt == "jsonl":
        with path.open("w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        import datasets

        ds = datasets.Dataset.from_list(rows)
        if images == "pil":  # an Image feature: datasets stores the PNG bytes and gives PIL images back
            column, feature = ("image", datasets.Image()) if layout == "vlrewardbench" else ("images", [datasets.Image()])
            ds = ds.cast_column(column, feature)
        ds.save_to_disk(str(path))
    return path


def make_completion_set(
    path: str | os.PathLike,
    *,
    n_prompts: int = 4,
    per_prompt: int = 4,
    scores: bool = False,
    duplicate: bool = True,
    seed: int = 0,
) -> Path:
    """Write a JSONL file of ``per_prompt`` completions for each of ``n_prompts`` prompts (each with a
    generated PNG next to the file, referenced by relative path), and return its path.

    scores: add a ``score`` column of made-up numbers (for selection logic; not the model's).
    duplicate: the first prompt's last completion repeats its first one (equal scores: never a pair).
    """
    import numpy as np

    path = Path(path)
    (path.parent / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    with path.open("w") as f:
        for p in range(n_prompts):
            (path.parent / "images" / f"prompt{p}.png").write_bytes(_noise_png(rng, 64, 48 + 8 * p))
            answers = [_words(rng, int(rng.integers(3, 25))) for _ in range(per_prompt)]
            values = [float(v) for v in rng.normal(size=per_prompt)]
            if duplicate and p == 0 and per_prompt > 1:
                answers[-1], values[-1] = answers[0], values[0]
            for answer, value in zip(answers, values):
                row = {"prompt": f"Question {p}: what is shown?", "completion": answer,
                       "images": [f"images/prompt{p}.png"]}  # fmt: skip
                if scores:
                    row["score"] = value
                f.write(json.dumps(row) + "\n")
    return path


# ---- sequence-classification reward models (AutoModelForSequenceClassification, num_labels=1) -----

# Chat templates as the families ship them (Llama 3 and Gemma 2 verbatim; Qwen2.5 and Qwen3 reduced
# to plain text turns, their default system prompt and Qwen3's empty think block kept).
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
QWEN2_5_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN3_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'assistant' and loop.last %}"
    "<|im_start|>assistant\n<think>\n\n</think>\n\n{{ message['content'] | trim }}<|im_end|>\n"
    "{% else %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
GEMMA2_CHAT_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)


@dataclass(frozen=True)
class SeqClsFamily:
    """What a tiny sequence-classification checkpoint of one family looks like."""

    architecture: str  # config.json "architectures"
    specials: tuple[str, ...]  # special tokens, ids after the 256 bytes
    bos: str | None  # added in front by the tokenizer (and by the template, as the hub's do)
    eos: str
    pad: str  # the tokenizer's pad token; config.json's pad_token_id is its id
    padding_side: str
    chat_template: str
    config: dict = field(default_factory=dict)  # the model config, tiny


_LLAMA_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
_GEMMA_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>")
_QWEN3_SPECIALS = tuple(SPECIAL_TOKENS) + ("<think>", "</think>")
_TEXT_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False)  # fmt: skip

SEQ_CLS_FAMILIES: dict[str, SeqClsFamily] = {
    # Llama 3.1 with the pad token set to its end of turn (a common reward-model setup): the class pools
    # at the last token before the trailing <|eot_id|>. Left padding.
    "llama": SeqClsFamily(
        "LlamaForSequenceClassification", _LLAMA_SPECIALS, "<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>", "left",
        LLAMA3_CHAT_TEMPLATE,
        dict(_TEXT_SHAPE, model_type="llama", rms_norm_eps=1e-5, rope_theta=500000.0,
             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 1024}),
    ),  # fmt: skip
    "qwen2": SeqClsFamily(
        "Qwen2ForSequenceClassification", tuple(SPECIAL_TOKENS), None, "<|im_end|>", "<|endoftext|>", "right",
        QWEN2_5_CHAT_TEMPLATE, dict(_TEXT_SHAPE, model_type="qwen2", rms_norm_eps=1e-6, rope_theta=1000000.0),
    ),  # fmt: skip
    "qwen3": SeqClsFamily(
        "Qwen3ForSequenceClassification", _QWEN3_SPECIALS, None, "<|im_end|>", "<|endoftext|>", "left",
        QWEN3_CHAT_TEMPLATE,
        dict(_TEXT_SHAPE, model_type="qwen3", head_dim=16, rms_norm_eps=1e-6, rope_theta=1000000.0),
    ),  # fmt: skip
    # Gemma 2 with a sliding window shorter than the test conversations, so cached prefixes cross it.
    "gemma2": SeqClsFamily(
        "Gemma2ForSequenceClassification", _GEMMA_SPECIALS, "<bos>", "<eos>", "<pad>", "right",
        GEMMA2_CHAT_TEMPLATE,
        dict(_TEXT_SHAPE, model_type="gemma2", head_dim=16, query_pre_attn_scalar=16, sliding_window=24,
             attn_logit_softcapping=50.0, final_logit_softcapping=30.0, rms_norm_eps=1e-6,
             hidden_activation="gelu_pytorch_tanh"),
    ),  # fmt: skip
}
VISION_SEQ_CLS_FAMILIES = ("qwen2_vl", "qwen2_5_vl")


def _text_tokenizer(family: SeqClsFamily):
    """A byte-level BPE tokenizer with the family's special tokens, its BOS rule and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    symbols = _byte_symbols() + list(family.specials)
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(symbols)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(family.specials))
    if family.bos is not None:
        bos = symbols.index(family.bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{family.bos} $A", pair=f"{family.bos} $A {family.bos} $B", special_tokens=[(family.bos, bos)]
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=family.bos, eos_token=family.eos, pad_token=family.pad,
        padding_side=family.padding_side, model_max_length=131072,
    )  # fmt: skip
    tokenizer.chat_template = family.chat_template
    return tokenizer


def _fill_random(model: torch.nn.Module, seed: int) -> None:
    """Fresh draws for every parameter (see ``_write_weights``): fixed by the seed, clearly non-trivial."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("ln_q.weight"):
                value = (0.0 if "gemma" in type(model).__name__.lower() else 1.0) + 0.1 * torch.randn(param.shape, generator=generator)
            else:
                value = 0.1 * torch.randn(param.shape, generator=generator)
            param.copy_(value)


def make_tiny_seq_cls_checkpoint(
    path: str | os.PathLike, family: str, *, seed: int = 0, config: dict[str, Any] | None = None
) -> Path:
    """Write a tiny random ``*ForSequenceClassification`` reward model (num_labels=1) of ``family`` in
    the hub's layout and return its folder.

    Text families (``SEQ_CLS_FAMILIES``: llama, qwen2, qwen3, gemma2): ``config.json`` with the class in
    ``architectures``, ``model.safetensors`` as ``save_pretrained`` writes it (``model.*`` and
    ``score.weight`` [1, hidden], no bias), and the family's tokenizer (its special tokens, BOS rule,
    pad token and padding side) with its chat template. Llama and Qwen3 pad on the left, the others on
    the right; Llama's pad token is its end-of-turn token. ``config`` overrides the text model's shape
    (hidden_size, num_hidden_layers, ...), e.g. for benchmarks.

    Vision families (``qwen2_vl``, ``qwen2_5_vl``): transformers has no ``*ForSequenceClassification``
    class for them; such a checkpoint is the backbone's weights (``model.language_model.*``,
    ``model.visual.*``; the older ``model.layers.*`` / ``visual.*`` layout loads the same) plus
    ``score.weight`` [1, hidden], no ``lm_head`` and no ``value_head.safetensors``, with
    ``architectures`` naming the sequence-classification class, as ``save_pretrained`` of
    ``vision_seq_cls_class(family)`` writes it, and the Qwen-VL processor files.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if family in VISION_SEQ_CLS_FAMILIES:
        return _make_vision_seq_cls(path, family, seed)
    if family not in SEQ_CLS_FAMILIES:
        known = sorted(SEQ_CLS_FAMILIES) + list(VISION_SEQ_CLS_FAMILIES)
        raise ValueError(f"unknown family {family!r}; one of {known}")
    spec = SEQ_CLS_FAMILIES[family]
    tokenizer = _text_tokenizer(spec)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in spec.specials}
    cfg = dict(spec.config, **(config or {}))
    cfg.update(vocab_size=256 + len(spec.specials), architectures=[spec.architecture],
               num_labels=1, pad_token_id=ids[spec.pad], eos_token_id=ids[spec.eos], torch_dtype="float32",
               bos_token_id=ids[spec.bos] if spec.bos else None)  # fmt: skip
    model_type = cfg.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    _fill_random(model, seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _make_vision_seq_cls(path: Path, family: str, seed: int) -> Path:
    config = tiny_config(architectures=["Qwen2_5_VLForSequenceClassification"], num_labels=1,
                         pad_token_id=256 + SPECIAL_TOKENS.index("<|endoftext|>"))  # fmt: skip
    if family == "qwen2_vl":
        config.update(model_type="qwen2_vl", architectures=["Qwen2VLForSequenceClassification"])
        config["vision_config"] = {
            "depth": 2, "embed_dim": 32, "hidden_size": 64, "mlp_ratio": 2, "num_heads": 2, "in_chans": 3,
            "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "hidden_act": "quick_gelu",
        }  # fmt: skip
    make_tiny_checkpoint(path, config=config, weights=False)
    if family == "qwen2_vl":
        pre = json.loads((path / "preprocessor_config.json").read_text())
        pre["processor_class"] = "Qwen2VLProcessor"
        (path / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n")
    from transformers import AutoConfig

    model = vision_seq_cls_class(family)._from_config(AutoConfig.from_pretrained(path), dtype=torch.float32)
    _fill_random(model, seed)
    model.save_pretrained(path)  # transformers 5's layout (model.language_model.*, model.visual.*, score.weight)
    return path


def vision_seq_cls_class(family: str):
    """``Qwen2VLForSequenceClassification`` / ``Qwen2_5_VLForSequenceClassification`` as transformers
    composes every text model's class (``GenericForSequenceClassification`` over the family's
    pretrained model): transformers 5 ships none for these two, so this is the reference a hub
    checkpoint with a ``score`` head is read against."""
    from transformers.modeling_layers import GenericForSequenceClassification

    if family == "qwen2_5_vl":
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLPreTrainedModel as base
    elif family == "qwen2_vl":
        from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLPreTrainedModel as base
    else:
        raise ValueError(f"no vision sequence-classification family {family!r}")
    name = {"qwen2_5_vl": "Qwen2_5_VLForSequenceClassification", "qwen2_vl": "Qwen2VLForSequenceClassification"}[family]
    return type(name, (GenericForSequenceClassification, base), {})


def cached_seq_cls_checkpoint(family: str, seed: int = 0) -> Path:
    """``make_tiny_seq_cls_checkpoint`` in rewardplug's cache folder, built once (atomically)."""
    root = Path(os.environ.get("REWARDPLUG_CACHE", Path.home() / ".cache" / "rewardplug"))
    target = root / f"tiny-{family}-seq-cls-seed{seed}-v1"
    if (target / "model.safetensors").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=root))
    try:
        make_tiny_seq_cls_checkpoint(tmp, family, seed=seed)
        os.rename(tmp, target)
    except OSError:
        if not (target / "model.safetensors").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
