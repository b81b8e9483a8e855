"""Conversation -> token ids and pixels, exactly as the model card's recipe computes them.

The recipe: ``processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)``,
images through qwen-vl-utils (``fetch_image``: RGB on white, smart resize with PIL), then the
processor. Each sample is encoded alone and padded later by ``collate``, so a sample's tokens never
depend on its batch.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from PIL import Image
from qwen_vl_utils import fetch_image
from transformers import BatchFeature

from .errors import SampleError
from .images import ImagePolicy, image_digest, load_image
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
    min_pixels: int | None = None  # None: qwen-vl-utils' own defaults, as the model card's code has them
    max_pixels: int | None = None
    max_length: int | None = None
    patch_size: int = 14

    def __post_init__(self):
        # The G completions of a GRPO group share their images: preprocess each distinct image once.
        self._pixel_cache = PixelCache(self.processor.image_processor)
        self.processor.image_processor = self._pixel_cache

    def encode(self, sample: Any) -> EncodedSample:
        if isinstance(sample, dict) and "input_ids" in sample:
            return self.encode_tokens(sample["input_ids"], sample.get("images") or [])
        conv = to_conversation(sample, self.policy)
        text = self.processor.apply_chat_template(conv.messages, tokenize=False, add_generation_prompt=False)
        images = [self._resize(im, i, size) for i, (im, size) in enumerate(zip(conv.images, conv.sizes))]
        digests = [image_digest(im) for im in images]
        with self._pixel_cache.digests(digests):
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
            image_digests=digests,
        )

    def encode_tokens(self, input_ids: Sequence[int] | torch.Tensor, images: Sequence[Any]) -> EncodedSample:
        """A conversation already tokenized with this model's chat template (prompt + completion ids of
        a Qwen-family policy), so nothing is decoded and tokenized again.

        The ids must end the way the template ends the answer; a trailing end-of-turn
        (<|im_end|>, <|endoftext|>) is normalized to "<|im_end|>\\n", and one is added when missing
        (truncated completions: flag those yourself). Image placeholders may be expanded (one
        <|image_pad|> per image token, as the processor makes them) or a single <|image_pad|> per image.
        """
        tok = self.processor.tokenizer
        ids = [int(t) for t in (input_ids.tolist() if isinstance(input_ids, torch.Tensor) else input_ids)]
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
        loaded = []
        for i, src in enumerate(images):
            try:
                loaded.append(self._resize(load_image(src, self.policy), i))
            except SampleError as e:
                raise SampleError(f"image {i}: {e}") from None
        image_id = tok.convert_tokens_to_ids("<|image_pad|>")
        pixel_values = grid = None
        digests = [image_digest(im) for im in loaded]
        if loaded:
            with self._pixel_cache.digests(digests):
                out = self.processor.image_processor(images=loaded, return_tensors="pt")
            pixel_values, grid = out["pixel_values"], out["image_grid_thw"]
            merge = self.processor.image_processor.merge_size ** 2
            ids = _expand_image_runs(ids, image_id, [int(g.prod()) // merge for g in grid])
        elif image_id in ids:
            raise SampleError("input_ids hold image tokens but no images were given")
        if self.max_length is not None and len(ids) > self.max_length:
            raise SampleError(f"sample has {len(ids)} tokens, over max_length={self.max_length}")
        input_ids = torch.tensor(ids, dtype=torch.long)
        return EncodedSample(
            input_ids=input_ids,
            mm_token_type_ids=(input_ids == image_id).long(),
            pixel_values=pixel_values,
            image_grid_thw=grid,
            image_digests=digests,
        )

    def _resize(self, image: Image.Image, index: int, size: dict | None = None) -> Image.Image:
        """qwen-vl-utils' own step: RGB (RGBA on white) and smart resize to multiples of 28, with the
        bounds the caller gave (from_pretrained, or the image item), else qwen-vl-utils' defaults. The
        processor then applies the checkpoint's own bounds, as in the model card's code."""
        item = {"image": image}
        item.update({k: v for k, v in (("min_pixels", self.min_pixels), ("max_pixels", self.max_pixels)) if v})
        item.update(size or {})
        try:
            return fetch_image(item, image_patch_size=self.patch_size)
        except ValueError as e:  # e.g. aspect ratio over 200
            raise SampleError(f"image {index}: {e}") from None


class PixelCache:
    """Stands in for the processor's image processor and remembers its output per image content.

    The processor calls it as usual (so its token expansion is untouched); the encoder announces the
    content digests of the images it is about to pass, so nothing is hashed twice. Entries are exact
    copies of what the image processor returned for that image alone (images are processed one by one
    there too), so scores do not change. Bounded; safe to share between threads.
    """

    def __init__(self, image_processor: Any, max_entries: int = 256):
        self.inner = image_processor
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._lock = threading.Lock()
        self._local = threading.local()
        self.hits = self.misses = 0

    def __getattr__(self, name: str):  # merge_size, patch_size, size, ...: the real processor's
        return getattr(self.inner, name)

    @contextmanager
    def digests(self, digests: list[str]):
        self._local.digests = digests
        try:
            yield
        finally:
            self._local.digests = None

    def __call__(self, images=None, **kwargs):
        digests = getattr(self._local, "digests", None)
        images = images if isinstance(images, list) else [images]
        if digests is None or len(digests) != len(images) or kwargs.get("return_tensors") != "pt":
            return self.inner(images, **kwargs)
        options = tuple(sorted((k, repr(v)) for k, v in kwargs.items()))
        pixels, grids = [], []
        for image, digest in zip(images, digests):
            key = (digest, options)
            with self._lock:
                hit = self._entries.get(key)
                if hit is not None:
                    self._entries.move_to_end(key)
                    self.hits += 1
            if hit is None:
                out = self.inner([image], **kwargs)
                hit = (out["pixel_values"], out["image_grid_thw"])
                with self._lock:
                    self.misses += 1
                    self._entries[key] = hit
                    while len(self._entries) > self.max_entries:
                        self._entries.popitem(last=False)
            pixels.append(hit[0])
            grids.append(hit[1])
        return BatchFeature({"pixel_values": torch.cat(pixels), "image_grid_thw": torch.cat(grids)})


def _expand_image_runs(ids: list[int], image_id: int, sizes: list[int]) -> list[int]:
    """Make each run of image tokens as long as its image needs (a run of 1 is expanded)."""
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
            raise SampleError(f"input_ids hold more image placeholders than the {len(sizes)} images given")
        if j - i not in (1, sizes[k]):
            raise SampleError(
                f"image {k} has {j - i} image tokens in input_ids but this model's processor makes {sizes[k]} "
                "(min_pixels/max_pixels differ from the policy's?)"
            )
        out += [image_id] * sizes[k]
        k, i = k + 1, j
    if k != len(sizes):
        raise SampleError(f"{len(sizes)} images were given but input_ids hold {k} image placeholders")
    return out


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
