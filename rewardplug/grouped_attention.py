"""SDPA for a language model's grouped key/value heads, without copying them on a CPU.

With an attention mask (a padded batch: the engine's suffix passes over cached prefixes) transformers'
SDPA path repeats each key/value head for its query heads (``repeat_kv``: a copy of the whole key/value
per layer and pass, 3x on bench-cpu, 7x on the 7B) because CUDA's masked SDPA kernels would fall back
to the math path with grouped heads. torch's CPU flash kernel takes them as they are (``enable_gqa``),
with the same output bit for bit. That path is registered under its own name at import, and
``use_grouped_sdpa`` sets it on a model whose attention is SDPA; every other case (a GPU, no mask, one
query, no grouping, a bias or soft-capping) calls transformers' own ``sdpa_attention_forward``, so a
model moved to a GPU keeps transformers' behaviour.
"""

from __future__ import annotations

import torch
from torch import nn

NAME = "sdpa_grouped_kv"


def grouped_sdpa_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                           is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:  # fmt: skip
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    plain = not any(kwargs.get(k) is not None for k in ("position_bias", "softcap", "s_aux", "sinks"))
    grouped = query.shape[1] != key.shape[1] and query.shape[2] > 1  # one query: transformers packs the heads
    if query.device.type != "cpu" or attention_mask is None or not grouped or not plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)  # fmt: skip
    # A mask is given: transformers' SDPA path then runs is_causal=False with it, as here.
    out = nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, enable_gqa=True
    )
    return out.transpose(1, 2).contiguous(), None


def _register() -> bool:
    """Register the function and SDPA's own mask builder under ``NAME``, at import, so that a model
    rebuilt from a config naming it (``rewardplug bench``'s card-recipe model) builds in this process."""
    try:
        from transformers import AttentionInterface, AttentionMaskInterface
        from transformers.masking_utils import sdpa_mask
    except ImportError:
        return False
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    if (major, minor) < (2, 5):  # enable_gqa
        return False
    AttentionInterface.register(NAME, grouped_sdpa_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return True


REGISTERED = _register()


def use_grouped_sdpa(language_model: nn.Module) -> bool:
    """Switch a language model whose attention is transformers' ``"sdpa"`` to ``grouped_sdpa_attention``.
    Returns whether it did; any other implementation (eager, FlashAttention-2) is left as it is."""
    config = getattr(language_model, "config", None)
    if not REGISTERED or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    language_model.set_attn_implementation(NAME)
    return True
