"""Token rules every encoding path shares: the image and video placeholder tokens, ``mm_token_type_ids``,
and each image's run of placeholder tokens made as long as the image needs."""

from __future__ import annotations

import torch

from ..errors import SampleError

IMAGE_TOKEN, VIDEO_TOKEN = "<|image_pad|>", "<|video_pad|>"


def token_type_ids(input_ids: torch.Tensor, image_id: int, video_id: int | None) -> torch.Tensor:
    """``mm_token_type_ids`` as the processor makes them: 1 at image tokens, 2 at video tokens, else 0."""
    mm = (input_ids == image_id).long()
    if video_id is not None:
        mm[input_ids == video_id] = 2
    return mm


def expand_image_runs(ids: list[int], image_id: int, sizes: list[int], single_only: bool = False) -> list[int]:
    """Make each run of image tokens as long as its image needs (a run of 1 is expanded).

    single_only: every run must be a single token (text rendered by the chat template)."""
    out, k, i = [], 0, 0
    while i < len(ids):
        if ids[i] != image_id:
            out.append(ids[i])
            i += 1
            continue
        j = i
        while j < len(ids) and ids[j] == image_id:
            j += 1
        if k >= len(sizes):
            raise SampleError(f"the sample holds more image placeholders than the {len(sizes)} images given")
        if j - i != 1 and (single_only or j - i != sizes[k]):
            raise SampleError(
                f"image {k} has {j - i} image tokens but this model's processor makes {sizes[k]} "
                "(min_pixels/max_pixels differ from the policy's?)"
            )
        out += [image_id] * sizes[k]
        k, i = k + 1, j
    if k != len(sizes):
        raise SampleError(f"{len(sizes)} images were given but the sample holds {k} image placeholders")
    return out
