"""What the encoder hands out: one sample's model inputs (``EncodedSample``) and the encoder's counters."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .pixel_codes import PixelCodes, pixel_values


@dataclass
class EncodedSample:
    """One sample's model inputs (no batch dimension)."""

    input_ids: torch.Tensor  # [L] int64
    mm_token_type_ids: torch.Tensor  # [L] 0 text, 1 image, 2 video
    pixels: "torch.Tensor | PixelCodes | None" = None  # shared (not copied) within a group; see pixel_values
    image_grid_thw: torch.Tensor | None = None  # [images, 3]
    image_digests: list[str] = field(default_factory=list)
    position_ids: torch.Tensor | None = None  # [3, L] M-RoPE positions (set when the encoder has a rope_index)

    @property
    def pixel_values(self) -> torch.Tensor | None:
        """The image processor's pixels [patches, C*T*P*P] float32 (made on the host from ``pixels``,
        which the model expands on its own device instead)."""
        return pixel_values(self.pixels)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_patches(self) -> int:
        return 0 if self.pixels is None else int(self.pixels.shape[0])


@dataclass
class EncoderCounters:
    """What the encoder did since it was made (for tests, benchmarks and stats)."""

    samples: int = 0
    images_decoded: int = 0  # image sources decoded (a PIL image passed in costs nothing)
    images_resized: int = 0  # qwen-vl-utils resize + content digest
    prompts_rendered: int = 0  # chat template renderings of a shared prompt (twice per group: answer and probe)
    prompts_shared: int = 0  # samples whose prompt tokens came from their group
    whole_conversations: int = 0  # samples tokenized whole (no group, or a template that forbids the cut)

    def snapshot(self) -> dict[str, int]:
        return dict(self.__dict__)
