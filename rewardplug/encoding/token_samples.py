"""Samples given as token ids: a conversation a Qwen-family policy already tokenized with this model's
chat template (prompt + completion ids), checked and normalized, never decoded and tokenized again."""

from __future__ import annotations

import numbers
from typing import TYPE_CHECKING, Any, Sequence

import torch
from PIL import Image

from ..errors import SampleError
from ..images import load_image
from .encoded import EncodedSample
from .pixel_codes import cat_pixels
from .tokens import expand_image_runs, token_type_ids

if TYPE_CHECKING:
    from .encoder import Encoder
    from .request_images import RequestImages


def encode_token_sample(
    encoder: "Encoder", input_ids: Sequence[int] | torch.Tensor, images: Sequence[Any], memo: "RequestImages"
) -> EncodedSample:
    """A conversation already tokenized with this model's chat template (prompt + completion ids of
    a Qwen-family policy), so nothing is decoded and tokenized again.

    The ids must end the way the template ends the answer; a trailing end-of-turn
    (<|im_end|>, <|endoftext|>) is normalized to "<|im_end|>\\n", and one is added when missing
    (truncated completions: flag those yourself). Image placeholders may be expanded (one
    <|image_pad|> per image token, as the processor makes them) or a single <|image_pad|> per image.
    """
    tok = encoder.tokenizer
    if hasattr(input_ids, "tolist"):  # tensors, numpy arrays
        input_ids = input_ids.tolist()
    if not isinstance(input_ids, (list, tuple)) or not all(
        isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in input_ids
    ):
        raise SampleError("input_ids must be a list of integer token ids")
    ids = [int(t) for t in input_ids]
    vocab = encoder.vocab_size or len(tok)
    if any(t < 0 or t >= vocab for t in ids):
        raise SampleError(f"input_ids hold ids outside this tokenizer's vocabulary (0..{vocab - 1})")
    if not isinstance(images, (list, tuple)):
        images = [images]
    im_end, eot = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    newline = tok.encode("\n", add_special_tokens=False)
    while ids and ids[0] in (im_end, eot):  # left padding, as OpenRLHF's decoded sequences carry it
        ids = ids[1:]
    if ids[-len(newline) - 1 :] == [im_end, *newline]:
        ids = ids[: -len(newline)]
    while ids and ids[-1] in (im_end, eot):
        ids = ids[:-1]
    if not ids:
        raise SampleError("input_ids is empty")
    ids += [im_end, *newline]
    if encoder.video_token_id is not None and encoder.video_token_id in ids:
        raise SampleError("input_ids hold video tokens; only images are supported")
    prepared = []
    for i, src in enumerate(images):
        decoded = memo.decode(src)
        if not isinstance(decoded, Image.Image):
            try:
                decoded = load_image(src, encoder.policy)  # raises the source's own reason
            except SampleError as e:
                raise SampleError(f"image {i}: {e}") from None
        prepared.append(memo.prepare(decoded, i, None))
    pixels = grid = None
    if prepared:
        grid = torch.cat([p.grid for p in prepared])
        pixels = cat_pixels([p.pixels for p in prepared])
        merge = int(encoder.image_processor.merge_size) ** 2
        ids = expand_image_runs(ids, encoder.image_token_id, [int(g.prod()) // merge for g in grid])
    elif encoder.image_token_id in ids:
        raise SampleError("input_ids hold image tokens but no images were given")
    encoder.check_length(len(ids))
    ids_t = torch.tensor(ids, dtype=torch.long)
    encoder.count(whole_conversations=1)
    return EncodedSample(
        input_ids=ids_t,
        mm_token_type_ids=token_type_ids(ids_t, encoder.image_token_id, encoder.video_token_id),
        pixels=pixels,
        image_grid_thw=grid,
        image_digests=[p.digest for p in prepared],
        position_ids=encoder.positions(ids_t, grid),
    )
