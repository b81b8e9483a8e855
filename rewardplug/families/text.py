"""Text reward models: any ``AutoModelForSequenceClassification`` checkpoint with one label whose class
is transformers' ``GenericForSequenceClassification`` (Llama, Qwen2, Qwen3, Gemma 2).

The score is what the model's own class computes on one unpadded sample: ``score`` (a linear without
bias, in the model's dtype) on the last hidden state at the last token that is not
``config.pad_token_id`` (the encoder drops trailing pad tokens, see ``rewardplug.encoding.text_encoder``).
Batches of any padding and cached prompt prefixes give the same numbers: positions are each sample's
own (0..L-1), padding is masked, and for sliding-window layers (Gemma 2) each row's cached prefix is
moved to end right before its suffix, so distances between tokens are the unpadded ones.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
from torch import nn

from ..checkpoint import CheckpointKind
from ..encoding import Batch
from ..encoding.text_encoder import TextEncoder, TextProcessor
from ..errors import CheckpointError
from ..grouped_attention import use_grouped_sdpa
from ..model import RewardModel, _resolve_dtype, cache_argument, take_rows

logger = logging.getLogger(__name__)

# Tokens that open a chat turn, by template family: the last one of a sample ends its shareable prompt.
TURN_START_TOKENS = ("<|im_start|>", "<|start_header_id|>", "<start_of_turn>")


class TextRewardModel(RewardModel):
    """A text ``*ForSequenceClassification`` reward model with the engine's interface.

    ``backbone`` is the base model (``model.model``: embeddings, layers, final norm) and ``value_head``
    the class's ``score`` linear; ``processor.tokenizer`` is the checkpoint's tokenizer.
    """

    @classmethod
    def _load(
        cls,
        folder,
        name: str,
        found: CheckpointKind,
        *,
        dtype: Any,
        device: Any,
        device_map: Any,
        max_memory: Any,
        attn_implementation: str | None,
        max_length: int | None,
        padding_side: str,
        **image_options: Any,  # the vision families' options: nothing to apply to a text model
    ) -> "TextRewardModel":
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

        try:
            config = AutoConfig.from_pretrained(folder)
        except Exception as e:
            raise CheckpointError(f"config.json in {str(folder)!r} cannot be read: {e}") from None
        torch_dtype = _resolve_dtype(dtype, config)
        if device is None and device_map is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        kwargs: dict[str, Any] = {"dtype": torch_dtype}
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
        if str(device) == "meta":
            with torch.device("meta"):
                full = AutoModelForSequenceClassification.from_config(config, **kwargs)
        else:
            if device_map is not None:
                kwargs.update(device_map=device_map, max_memory=max_memory)
            try:
                full = AutoModelForSequenceClassification.from_pretrained(folder, **kwargs)
            except (OSError, ValueError, RuntimeError) as e:
                raise CheckpointError(f"weights in {str(folder)!r} cannot be loaded: {e}") from e
            if device_map is None:
                full.to(device)
        full.eval()
        head = getattr(full, "score", None)
        if not isinstance(head, nn.Linear) or head.out_features != 1:
            raise CheckpointError(
                f"{str(folder)!r}: {type(full).__name__} has no one-output 'score' linear ({found.architectures})"
            )
        backbone = getattr(full, full.base_model_prefix)
        use_grouped_sdpa(backbone)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        try:
            encoder = TextEncoder(tokenizer, config.get_text_config().pad_token_id, max_length)
        except ValueError as e:
            raise CheckpointError(f"{str(folder)!r}: {e}") from None
        return cls(backbone, head, TextProcessor(tokenizer), encoder, name, padding_side)

    # ---- what the engine reads -----------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.backbone.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.backbone.get_input_embeddings().weight.dtype

    @property
    def pad_token_id(self) -> int:
        tok = self.processor.tokenizer
        for candidate in (tok.pad_token_id, tok.eos_token_id, 0):
            if candidate is not None:
                return candidate
        return 0

    @property
    def turn_start_token_id(self) -> int | None:
        tok = self.processor.tokenizer
        vocab = tok.get_vocab()
        for token in TURN_START_TOKENS:
            if token in vocab:
                return vocab[token]
        return None

    @property
    def image_processor(self):
        return None

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.backbone.parameters()) + sum(p.numel() for p in self.value_head.parameters())

    @property
    def _sliding(self) -> bool:
        """Whether some layers attend within a window (Gemma 2): cached prefixes must end at their suffix."""
        text = self.config.get_text_config()
        types = getattr(text, "layer_types", None) or ()
        return bool(getattr(text, "sliding_window", None)) and any("sliding" in t for t in types)

    # ---- passes --------------------------------------------------------------------------------

    def image_features(self, pixels: Any, image_grid_thw: torch.Tensor) -> list[torch.Tensor]:
        raise TypeError(f"{type(self).__name__} has no vision tower: its samples carry no images")

    def _inputs(self, batch: Batch, image_embeds: Sequence[torch.Tensor] | None) -> dict[str, Any]:
        if batch.position_ids is None:
            raise ValueError("batch has no position_ids: encode samples with the model's encode")
        to = self.to_device
        return {
            "input_ids": to(batch.input_ids),
            "attention_mask": to(batch.attention_mask),
            "position_ids": to(batch.position_ids[0]),
        }

    @torch.inference_mode()
    def forward(
        self, batch: Batch, image_embeds: Sequence[torch.Tensor] | None = None, *, on_device: bool = False
    ) -> torch.Tensor:
        out = self.backbone(**self._inputs(batch, None), use_cache=False)
        scores = self._head(out.last_hidden_state, batch.last_index)
        return scores if on_device else scores.cpu()

    @torch.inference_mode()
    def forward_prefixes(self, prefixes: Batch, image_embeds: Sequence[torch.Tensor] | None = None):
        from transformers import DynamicCache

        # A plain cache of full layers: the config's would keep only a window of a sliding layer's keys.
        name = cache_argument(self.backbone)
        out = self.backbone(**self._inputs(prefixes, None), **{name: DynamicCache()}, use_cache=True)
        return getattr(out, name)

    @torch.inference_mode()
    def forward_suffixes(
        self, cache, rows: torch.Tensor, prefix_mask: torch.Tensor, suffixes: Batch, *, on_device: bool = False
    ) -> torch.Tensor:
        """Score completions on top of cached prefixes (see ``RewardModel.forward_suffixes``)."""
        from transformers import DynamicCache

        to = self.to_device
        prefix_mask = prefix_mask[rows]
        order = None
        if self._sliding:  # each row's real prefix tokens moved to the end of its prefix slots
            width = prefix_mask.shape[1]
            shift = width - prefix_mask.sum(1, keepdim=True)
            order = (torch.arange(width)[None] - shift) % width
            prefix_mask = prefix_mask.gather(1, order)
        mask = to(torch.cat([prefix_mask, suffixes.attention_mask], dim=1))
        dev_rows = to(rows)
        layers = []
        for k, v, *_ in cache:
            k, v = take_rows(k, dev_rows), take_rows(v, dev_rows)
            if order is not None:
                index = to(order, k.device)[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
                k, v = k.gather(2, index), v.gather(2, index)
            layers.append((k, v))
        out = self.backbone(
            input_ids=to(suffixes.input_ids),
            attention_mask=mask,
            position_ids=to(suffixes.position_ids[0]),
            **{cache_argument(self.backbone): DynamicCache(layers)},
            use_cache=True,
        )
        scores = self._head(out.last_hidden_state, suffixes.last_index)
        return scores if on_device else scores.cpu()
