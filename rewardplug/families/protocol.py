"""The protocol between a reward model and the engine (``RewardEngine``, its runner and scheduler)."""

from __future__ import annotations

from typing import Any, Protocol, Sequence, runtime_checkable

import torch

from ..encoding import Batch, EncodedSample


@runtime_checkable
class ScoringModel(Protocol):
    """What the engine asks of a reward model. Every family implements all of it; a family without a
    vision tower never gets ``image_features`` calls (its samples carry no images)."""

    processor: Any  # .tokenizer: the model's tokenizer
    padding_side: str

    @property
    def config(self) -> Any: ...  # the backbone's transformers config (its text config: layers, heads)

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def pad_token_id(self) -> int: ...  # fills padding in collated batches (masked: any id works)

    @property
    def turn_start_token_id(self) -> int | None: ...  # a prompt group's shared prefix ends at its last one

    @property
    def prefers_unpadded_batches(self) -> bool: ...

    def encode(self, sample: Any) -> EncodedSample: ...

    def encode_many(self, samples: Sequence[Any]) -> tuple[list[EncodedSample | None], dict[int, str]]: ...

    def image_features(self, pixels: Any, image_grid_thw: torch.Tensor) -> list[torch.Tensor]: ...

    def forward(
        self, batch: Batch, image_embeds: Sequence[torch.Tensor] | None = None, *, on_device: bool = False
    ) -> torch.Tensor: ...

    def forward_prefixes(self, prefixes: Batch, image_embeds: Sequence[torch.Tensor] | None = None) -> Any: ...

    def forward_suffixes(
        self, cache: Any, rows: torch.Tensor, prefix_mask: torch.Tensor, suffixes: Batch, *, on_device: bool = False
    ) -> torch.Tensor: ...

    def score(self, samples: Sequence[Any], **kwargs: Any) -> list[float | None]: ...
