"""The encoder: conversation -> token ids, pixels and M-RoPE positions, exactly as the model card's recipe
computes them, with a request's work done once per group instead of once per sample.

The recipe: ``processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)``,
images through qwen-vl-utils (``fetch_image``: RGB on white, smart resize with PIL), then the
processor (image processor for the pixels, tokenizer for the text with each ``<|image_pad|>`` expanded
to the image's token count). The encoder does the same steps itself, with the checkpoint's image
processor called explicitly (the processor object is left as loaded):

- each distinct image source of a request is decoded, resized and digested once
  (``request_images``); each distinct image content is preprocessed once (``pixel_cache``, which also
  serves later requests);
- samples with the same prompt share one rendering and tokenization of the prompt and its positions
  (``prompt_groups``); only the answer is tokenized per sample;
- samples given as token ids are checked and used as they are (``token_samples``).

Each sample is still encoded on its own terms and padded later by ``collate``, so a sample's tokens
never depend on its batch or its neighbours.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from ..errors import SampleError, ScoringError
from ..images import ImagePolicy
from ..samples import to_conversation
from .digests import prompt_key
from .encoded import EncodedSample, EncoderCounters
from .pixel_cache import DEFAULT_PIXEL_CACHE_BYTES, PixelCache
from .pixel_codes import cat_pixels
from .prompt_groups import PromptGroup, answer_text, build_group, encode_in_group, safe_cut_tokens
from .request_images import PreparedImage, RequestImages
from .token_samples import encode_token_sample
from .tokens import IMAGE_TOKEN, VIDEO_TOKEN, expand_image_runs, token_type_ids

RopeIndex = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


@dataclass
class Encoder:
    """Encodes samples for one checkpoint's processor.

    image_processor: the image processor used for pixels (default: the processor's own).
    pixel_cache_bytes: budget of the pixel cache (image processor outputs by content), default 256 MiB.
    rope_index: computes M-RoPE positions ``(ids [1, L], mm_token_type_ids [1, L], grid) -> [3, 1, L]``
        (the model's ``get_rope_index``); None leaves ``position_ids`` unset.
    share_prompts: tokenize a prompt shared by several samples of a request once (default). False
        tokenizes every conversation whole; the ids are the same either way.
    vocab_size: the model's vocabulary size; token samples with ids outside it are refused.
    """

    processor: Any
    policy: ImagePolicy
    min_pixels: int | None = None  # None: qwen-vl-utils' own defaults, as the model card's code has them
    max_pixels: int | None = None
    max_length: int | None = None
    patch_size: int = 14
    image_processor: Any = None
    pixel_cache_bytes: int = DEFAULT_PIXEL_CACHE_BYTES
    rope_index: RopeIndex | None = None
    share_prompts: bool = True
    vocab_size: int | None = None  # the model's embedding rows (token samples are checked against it)
    resize_on_device: bool = False  # RGB images go to the device whole; Pillow's resize is done there, bit for bit

    def __post_init__(self):
        if self.image_processor is None:
            self.image_processor = self.processor.image_processor
        self.pixel_cache = PixelCache(self.image_processor, self.pixel_cache_bytes)
        self.counters = EncoderCounters()
        self._lock = threading.Lock()
        tok = self.tokenizer
        self.image_token_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
        video = tok.convert_tokens_to_ids(VIDEO_TOKEN)
        self.video_token_id = video if isinstance(video, int) and video != tok.unk_token_id else None
        self.cut_tokens = safe_cut_tokens(self)

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    # ---- public --------------------------------------------------------------------------------

    def encode(self, sample: Any) -> EncodedSample:
        """One sample; raises SampleError when it cannot be scored."""
        encoded, errors = self.encode_many([sample])
        if errors:
            raise SampleError(errors[0])
        return encoded[0]

    def encode_many(self, samples: Sequence[Any]) -> tuple[list[EncodedSample | None], dict[int, str]]:
        """Encode a request's samples, sharing image and prompt work between them.

        Returns the encoded samples (None for a bad one) and ``{index: reason}`` for the bad ones. Any
        other failure (a bug, a processor error) is not a sample's fault: it raises ScoringError.
        Safe to call from several threads at once.
        """
        images = RequestImages(self)
        groups: dict[str, PromptGroup | None] = {}
        encoded: list[EncodedSample | None] = []
        errors: dict[int, str] = {}
        for i, sample in enumerate(samples):
            try:
                encoded.append(self._encode(sample, images, groups))
            except SampleError as e:
                encoded.append(None)
                errors[i] = str(e)
            except Exception as e:  # noqa: BLE001 - not the sample's fault: fail the request loudly
                raise ScoringError(f"encoding sample {i} failed: {type(e).__name__}: {e}") from e
        self.count(samples=len(samples))
        return encoded, errors

    # ---- one sample ----------------------------------------------------------------------------

    def _encode(self, sample: Any, images: RequestImages, groups: dict) -> EncodedSample:
        if isinstance(sample, dict) and "input_ids" in sample:
            found = sample.get("images")
            return encode_token_sample(self, sample["input_ids"], [] if found is None else found, images)
        conv = to_conversation(images.predecode(sample), self.policy)
        prepared = [images.prepare(im, i, size) for i, (im, size) in enumerate(zip(conv.images, conv.sizes))]
        answer = conv.messages[-1]
        text = answer_text(answer)
        if self.share_prompts and self.cut_tokens and text is not None:
            key = prompt_key(conv.messages[:-1], answer, conv.images, [p.digest for p in prepared])
            if key not in groups:
                groups[key] = build_group(self, conv.messages[:-1], answer, prepared)
            group = groups[key]
            if group is not None:
                return encode_in_group(self, group, text)
        return self._whole(conv.messages, prepared)

    def _whole(self, messages: list[dict], prepared: list[PreparedImage]) -> EncodedSample:
        text = self.render(messages)
        ids, pixels, grid = self.ids_with_images(text, prepared, add_special_tokens=True)
        self.check_length(len(ids))
        self.count(whole_conversations=1)
        return EncodedSample(
            input_ids=ids,
            mm_token_type_ids=token_type_ids(ids, self.image_token_id, self.video_token_id),
            pixels=pixels,
            image_grid_thw=grid,
            image_digests=[p.digest for p in prepared],
            position_ids=self.positions(ids, grid),
        )

    # ---- pieces (also used by prompt_groups and token_samples) -----------------------------------

    def ids_with_images(self, text: str, prepared: list[PreparedImage], add_special_tokens: bool):
        """Token ids of rendered text with one <|image_pad|> per image, each expanded to its image's token
        count (the processor expands the text instead: the same ids, since <|image_pad|> is a special token)."""
        ids = self.tokenize(text, add_special_tokens=add_special_tokens)
        if self.video_token_id is not None and self.video_token_id in ids:
            raise SampleError("the conversation holds a video token; only images are supported")
        pixels = grid = None
        if prepared:
            merge = int(self.image_processor.merge_size) ** 2
            grid = torch.cat([p.grid for p in prepared])
            pixels = cat_pixels([p.pixels for p in prepared])
            ids = expand_image_runs(ids, self.image_token_id, [int(g.prod()) // merge for g in grid], single_only=True)
        elif self.image_token_id in ids:
            raise SampleError("the text holds image tokens (<|image_pad|>) but the sample has no image")
        return torch.tensor(ids, dtype=torch.long), pixels, grid

    def render(self, messages: list[dict]) -> str:
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)

    def tokenize(self, text: str, add_special_tokens: bool) -> list[int]:
        tok = self.tokenizer
        backend = getattr(tok, "_tokenizer", None)
        # What the tokenizer's __call__ does for one text with no truncation or padding, without its Python
        # layers (a quarter of a sample's encode time): the same backend call, so the same ids.
        if (
            type(backend).__module__ == "tokenizers"
            and backend.truncation is None
            and backend.padding is None
            and backend.encode_special_tokens == bool(getattr(tok, "split_special_tokens", False))
        ):
            return backend.encode(text, add_special_tokens=add_special_tokens).ids
        return tok(text, add_special_tokens=add_special_tokens, return_attention_mask=False)["input_ids"]

    def positions(self, ids: torch.Tensor, grid: torch.Tensor | None) -> torch.Tensor | None:
        if self.rope_index is None:
            return None
        mm = token_type_ids(ids, self.image_token_id, self.video_token_id)
        return self.rope_index(ids[None], mm[None], grid)[:, 0]

    def check_length(self, n: int) -> None:
        if self.max_length is not None and n > self.max_length:
            raise SampleError(f"sample has {n} tokens, over max_length={self.max_length}")

    def count(self, **deltas: int) -> None:
        with self._lock:
            for k, v in deltas.items():
                setattr(self.counters, k, getattr(self.counters, k) + v)
