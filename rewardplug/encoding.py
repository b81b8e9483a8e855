"""Conversation -> token ids and pixels, exactly as the model card's recipe computes them.

The recipe: ``processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)``,
images through qwen-vl-utils (``fetch_image``: RGB on white, smart resize with PIL), then the
processor. Each sample is encoded alone and padded later by ``collate``, so a sample's tokens never
depend on its batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from qwen_vl_utils import fetch_image

from .errors import SampleError
from .images import ImagePolicy, image_digest
from .samples import to_conversation


@dataclass
class EncodedSample:
    """One sample's model inputs (no batch dimension)."""

    input_ids: torch.Tensor  # [L] int64
    mm_token_type_ids: torch.Tensor  # [L] 0 text, 1 image
    pixel_values: torch.Tensor | None = None  # [patches, C*T*P*P]
    image_grid_thw: torch.Tensor | None = None  # [images, 3]
    image_digests: list[str] = field(default_factory=list)
    position_ids: torch.Tensor | None = None  # [3, L] M-RoPE positions, set by RewardModel.encode

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_patches(self) -> int:
        return 0 if self.pixel_values is None else int(self.pixel_values.shape[0])


@dataclass
class Encoder:
    """Encodes samples for one checkpoint's processor."""

    processor: Any
    policy: ImagePolicy
    min_pixels: int
    max_pixels: int
    max_length: int | None = None
    patch_size: int = 14

    def encode(self, sample: Any) -> EncodedSample:
        conv = to_conversation(sample, self.policy)
        text = self.processor.apply_chat_template(conv.messages, tokenize=False, add_generation_prompt=False)
        images = [self._resize(im, i) for i, im in enumerate(conv.images)]
        out = self.processor(text=[text], images=images or None, return_tensors="pt")
        input_ids = out["input_ids"][0]
        if self.max_length is not None and input_ids.shape[0] > self.max_length:
            raise SampleError(f"sample has {input_ids.shape[0]} tokens, over max_length={self.max_length}")
        mm = out.get("mm_token_type_ids")
        mm = torch.zeros_like(input_ids) if mm is None else mm[0]
        return EncodedSample(
            input_ids=input_ids,
            mm_token_type_ids=mm,
            pixel_values=out.get("pixel_values"),
            image_grid_thw=out.get("image_grid_thw"),
            image_digests=[image_digest(im) for im in images],
        )

    def _resize(self, image: Image.Image, index: int) -> Image.Image:
        """qwen-vl-utils' own step: RGB (RGBA on white) and smart resize to multiples of 28."""
        try:
            return fetch_image(
                {"image": image, "min_pixels": self.min_pixels, "max_pixels": self.max_pixels},
                image_patch_size=self.patch_size,
            )
        except ValueError as e:  # e.g. aspect ratio over 200
            raise SampleError(f"image {index}: {e}") from None


@dataclass
class Batch:
    """Padded model inputs for several samples."""

    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    mm_token_type_ids: torch.Tensor  # [B, L]
    last_index: torch.Tensor  # [B] position of each sample's last real token
    position_ids: torch.Tensor | None  # [3, B, L], zeros at padding
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None

    @property
    def padded_tokens(self) -> int:
        return int(self.input_ids.numel())


def collate(samples: list[EncodedSample], pad_token_id: int, padding_side: str = "right") -> Batch:
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    length = max(s.num_tokens for s in samples)
    ids = torch.full((len(samples), length), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(samples), length), dtype=torch.long)
    mm = torch.zeros((len(samples), length), dtype=torch.long)
    last = torch.empty(len(samples), dtype=torch.long)
    with_positions = all(s.position_ids is not None for s in samples)
    positions = torch.zeros((3, len(samples), length), dtype=torch.long) if with_positions else None
    for row, s in enumerate(samples):
        n = s.num_tokens
        cols = slice(0, n) if padding_side == "right" else slice(length - n, length)
        ids[row, cols] = s.input_ids
        mask[row, cols] = 1
        mm[row, cols] = s.mm_token_type_ids
        if positions is not None:
            positions[:, row, cols] = s.position_ids
        last[row] = n - 1 if padding_side == "right" else length - 1
    pixels = [s.pixel_values for s in samples if s.pixel_values is not None]
    grids = [s.image_grid_thw for s in samples if s.image_grid_thw is not None]
    return Batch(
        input_ids=ids,
        attention_mask=mask,
        mm_token_type_ids=mm,
        last_index=last,
        position_ids=positions,
        pixel_values=torch.cat(pixels) if pixels else None,
        image_grid_thw=torch.cat(grids) if grids else None,
    )
