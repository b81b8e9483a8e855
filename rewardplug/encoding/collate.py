"""Collation: encoded samples -> one padded batch (left or right padding; pixels concatenated, codes stay codes)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .encoded import EncodedSample
from .pixel_codes import PixelCodes, cat_pixels, pixel_values


@dataclass
class Batch:
    """Padded model inputs for several samples."""

    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    mm_token_type_ids: torch.Tensor  # [B, L]
    last_index: torch.Tensor  # [B] position of each sample's last real token
    position_ids: torch.Tensor | None  # [3, B, L], zeros at padding
    pixels: "torch.Tensor | PixelCodes | None"  # float pixel_values, or codes the model expands on its device
    image_grid_thw: torch.Tensor | None

    @property
    def pixel_values(self) -> torch.Tensor | None:
        return pixel_values(self.pixels)

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
    pixels = [s.pixels for s in samples if s.pixels is not None]
    grids = [s.image_grid_thw for s in samples if s.image_grid_thw is not None]
    return Batch(
        input_ids=ids,
        attention_mask=mask,
        mm_token_type_ids=mm,
        last_index=last,
        position_ids=positions,
        pixels=cat_pixels(pixels),
        image_grid_thw=torch.cat(grids) if grids else None,
    )
