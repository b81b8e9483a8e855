"""Conversation -> token ids, pixels and M-RoPE positions, exactly as the model card's recipe computes them.

The recipe: ``processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)``,
images through qwen-vl-utils (``fetch_image``: RGB on white, smart resize with PIL), then the
processor (image processor for the pixels, tokenizer for the text with each ``<|image_pad|>`` expanded
to the image's token count). The encoder does the same steps itself, with the checkpoint's image
processor called explicitly (the processor object is left as loaded), so that a request's work is
done once per group instead of once per sample:

- each distinct image source of a request (same object, same bytes, path or URI) is decoded,
  resized and digested once; each distinct image content is preprocessed once (``PixelCache``, which
  also serves later requests);
- samples with the same prompt (all messages before the final answer, and their images) share one
  rendering and tokenization of the prompt and its M-RoPE positions; only the answer is tokenized per
  sample. The cut is made right after the prompt's last special token (``<|im_start|>``): the tokenizer
  splits special tokens out before anything else, so no BPE merge can cross it and the ids equal
  those of the whole conversation. Templates where that cannot be shown fall back to the whole
  conversation, sample by sample.

Each sample is still encoded on its own terms and padded later by ``collate``, so a sample's tokens
never depend on its batch or its neighbours.
"""

from __future__ import annotations

import hashlib
import logging
import numbers
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from cachetools import LRUCache
from PIL import Image
from qwen_vl_utils import fetch_image

from .errors import SampleError, ScoringError
from .images import ImagePolicy, image_digest, load_image
from .samples import Sample, to_conversation

logger = logging.getLogger(__name__)

DEFAULT_PIXEL_CACHE_BYTES = 256 * 2**20  # about 13 images of 1024x1024 (896x896 after resize), fp32
IMAGE_TOKEN, VIDEO_TOKEN = "<|image_pad|>", "<|video_pad|>"
# Stands in for the answer when the template is rendered once per prompt (private-use code points).
_ANSWER = "\ue000rewardplug:answer\ue001"
_PROBE = " \n\t\ue000probe\ue001 \n"  # whitespace at both ends: a template that strips or escapes fails

RopeIndex = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


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


def token_type_ids(input_ids: torch.Tensor, image_id: int, video_id: int | None) -> torch.Tensor:
    """``mm_token_type_ids`` as the processor makes them: 1 at image tokens, 2 at video tokens, else 0."""
    mm = (input_ids == image_id).long()
    if video_id is not None:
        mm[input_ids == video_id] = 2
    return mm


class PixelCodes:
    """Images' pixels as uint8 values, with the processor's arithmetic as a table, expanded where used.

    Each part is one or more images' values in patch order ``[patches, 3, P, P]``, or one whole image
    ``[H, W, 3]`` still to be resized to ``(height, width)`` with Pillow's bicubic filter
    (``rewardplug.resize``: the same bytes as Pillow, computed on the model's device). ``values(move)``
    moves the parts (e.g. to the GPU), resizes and reorders there, and gives the image processor's
    float32 pixels bitwise: a lookup of each value in a 3 x 256 table, then the temporal copies. So the
    host copies, caches and ships 1 byte per value instead of 4 x temporal_patch_size (8x less).
    """

    __slots__ = ("parts", "table", "temporal", "patch", "merge")

    def __init__(self, parts: list, table: torch.Tensor, temporal: int, patch: int, merge: int):
        self.parts = parts  # [(uint8 tensor, None or (height, width) to resize to)]
        self.table = table  # [3 * 256] float32
        self.temporal, self.patch, self.merge = temporal, patch, merge

    def _patches(self, part) -> int:
        values, size = part
        return int(values.shape[0]) if size is None else (size[0] // self.patch) * (size[1] // self.patch)

    @property
    def shape(self) -> tuple[int, int]:
        return (sum(self._patches(p) for p in self.parts), 3 * self.temporal * self.patch * self.patch)

    @property
    def nbytes(self) -> int:
        return sum(v.numel() for v, _ in self.parts) + self.table.numel() * 4

    @property
    def codes(self) -> torch.Tensor:
        """The uint8 values in patch order [patches, 3, P, P] (whole images resized here, on the host)."""
        return torch.cat([self._in_patches(*p) for p in self.parts])

    def _with(self, parts: list) -> "PixelCodes":
        return PixelCodes(parts, self.table, self.temporal, self.patch, self.merge)

    def compatible(self, other: Any) -> bool:
        return isinstance(other, PixelCodes) and other.table is self.table and (
            other.temporal, other.patch, other.merge) == (self.temporal, self.patch, self.merge)  # fmt: skip

    def split(self, sizes: list[int]) -> list["PixelCodes"]:
        """Split by patch counts (one image each, as the runner does); whole images are never cut."""
        out, parts = [], list(self.parts)
        for size in sizes:
            taken: list = []
            while size > 0:
                values, target = parts.pop(0)
                n = self._patches((values, target))
                if n > size:
                    if target is not None:
                        raise ValueError("a split would cut through an image")
                    values, rest = values[:size], values[size:]
                    parts.insert(0, (rest, None))
                    n = size
                taken.append((values, target))
                size -= n
            out.append(self._with(taken))
        return out

    def values(self, move: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """The float32 pixels [patches, C*T*P*P], computed after ``move`` (e.g. to the model's device)."""
        move = move or (lambda t: t)
        codes = torch.cat([self._in_patches(move(v), size) for v, size in self.parts])
        table = move(self.table)
        offsets = torch.arange(0, 3 * 256, 256, device=codes.device).view(1, 3, 1, 1)
        looked_up = table[codes.long() + offsets]  # [n, 3, P, P]
        n, c, p, q = looked_up.shape
        return looked_up.unsqueeze(2).expand(n, c, self.temporal, p, q).reshape(n, c * self.temporal * p * q)

    def _in_patches(self, values: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
        if size is None:
            return values
        from .resize import pillow_rule, resize_bicubic

        h, w = size
        image = resize_bicubic(values, h, w, bool(pillow_rule()))
        p, m = self.patch, self.merge
        gh, gw = h // p, w // p
        grid = image.reshape(gh // m, m, p, gw // m, m, p, 3).permute(0, 3, 1, 4, 6, 2, 5)
        return grid.reshape(gh * gw, 3, p, p)


def pixel_values(pixels: "torch.Tensor | PixelCodes | None", move: Callable | None = None) -> torch.Tensor | None:
    """Float pixels of an encoded sample's or a batch's ``pixels``, made after ``move`` for codes."""
    if isinstance(pixels, PixelCodes):
        return pixels.values(move)
    return move(pixels) if move is not None and pixels is not None else pixels


def cat_pixels(parts: list) -> "torch.Tensor | PixelCodes | None":
    """Concatenate several images' pixels: codes stay codes when they share a table, else floats."""
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    if isinstance(first, PixelCodes) and all(first.compatible(p) for p in parts):
        return first._with([part for p in parts for part in p.parts])
    return torch.cat([pixel_values(p) for p in parts])


class ExactPixels:
    """The PIL Qwen2-VL image processor's arithmetic, done as a table lookup: bitwise the same pixels.

    For an RGB image that the processor would not resize (qwen-vl-utils already resized it to multiples
    of 28 within the same bounds), the processor computes per value ``float32(float64(v) * scale)``, then
    ``(x - mean[c]) / std[c]`` in float32, then a reshape into patches. Each output value depends only on
    the uint8 value and its channel, so a 3 x 256 table computed with the same operations in the same
    dtypes gives the same bits. The host only reorders the uint8 values into patches (``PixelCodes``);
    the lookup is done where the pixels are used. Anything else (another processor class or backend, a
    mode other than RGB, a size the processor would change) returns None: the caller uses the processor.
    A self-check against the processor on a probe image turns the table off if they ever differ.
    """

    def __init__(self, image_processor: Any):
        self.image_processor = ip = image_processor
        self.enabled = type(ip).__name__ == "Qwen2VLImageProcessorPil" and all(
            getattr(ip, k, None) for k in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb")
        )
        if not self.enabled:
            return
        import numpy as np

        values = np.arange(256, dtype=np.uint8).astype(np.float64) * ip.rescale_factor
        x = values.astype(np.float32)
        mean = np.array(ip.image_mean, dtype=np.float32)[:, None]
        std = np.array(ip.image_std, dtype=np.float32)[:, None]
        self.table = torch.from_numpy(((x[None, :] - mean) / std).astype(np.float32).reshape(-1))  # [3 * 256]
        self.factor = int(ip.patch_size) * int(ip.merge_size)
        self.enabled = self._agrees_with_processor()

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not self.enabled or image.mode != "RGB":
            return None
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        ip = self.image_processor
        w, h = image.size
        if smart_resize(h, w, factor=self.factor, min_pixels=ip.size.shortest_edge,
                        max_pixels=ip.size.longest_edge) != (h, w):  # fmt: skip
            return None
        import numpy as np

        p, m, t = int(ip.patch_size), int(ip.merge_size), int(ip.temporal_patch_size)
        gh, gw = h // p, w // p
        codes = np.asarray(image).reshape(gh // m, m, p, gw // m, m, p, 3).transpose(0, 3, 1, 4, 6, 2, 5)
        codes = torch.from_numpy(np.ascontiguousarray(codes).reshape(gh * gw, 3, p, p))
        return PixelCodes([(codes, None)], self.table, t, p, m), torch.tensor([[1, gh, gw]], dtype=torch.long)

    def deferred(self, image: Image.Image, height: int, width: int) -> tuple[PixelCodes, torch.Tensor] | None:
        """Codes of an RGB image not resized yet: the resize to (height, width) happens where the pixels
        are used (``PixelCodes.values``); None where that would not give the processor's bits."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        from .resize import pillow_rule

        ip = self.image_processor
        if not self.enabled or image.mode != "RGB" or pillow_rule() is None:
            return None
        if smart_resize(height, width, factor=self.factor, min_pixels=ip.size.shortest_edge,
                        max_pixels=ip.size.longest_edge) != (height, width):  # fmt: skip
            return None
        import numpy as np

        p, m, t = int(ip.patch_size), int(ip.merge_size), int(ip.temporal_patch_size)
        whole = torch.from_numpy(np.array(image))  # [H, W, 3] uint8, a copy of its own
        return PixelCodes([(whole, (height, width))], self.table, t, p, m), torch.tensor(
            [[1, height // p, width // p]], dtype=torch.long)  # fmt: skip

    def _agrees_with_processor(self) -> bool:
        import numpy as np

        rng = np.random.default_rng(0)
        probe = Image.fromarray(rng.integers(0, 256, (56, 84, 3), dtype=np.uint8), "RGB")
        self.enabled = True
        mine = self(probe)
        ref = self.image_processor(images=[probe], return_tensors="pt")
        same = mine is not None and torch.equal(mine[0].values(), ref["pixel_values"]) and torch.equal(mine[1], ref["image_grid_thw"])
        if not same:
            logger.warning("fast pixel path disagrees with %s; using the processor", type(self.image_processor).__name__)
        return same


class PixelCache:
    """The image processor's output per image content, bounded in bytes (LRU, cachetools).

    Entries are exact: the image processor handles images one by one, so an image's pixels do not depend
    on the others in the call. ``max_bytes`` (default 256 MiB) counts the pixel tensors; an image larger
    than the whole budget is processed but not kept; 0 keeps nothing. Safe to share between threads.
    Misses go through ``ExactPixels`` where it applies (bitwise the processor's pixels), else the
    image processor itself. Entries from the fast path are ``PixelCodes`` (1 byte per value, so the
    budget holds 8x as many images as float pixels would take).
    """

    def __init__(self, image_processor: Any, max_bytes: int = DEFAULT_PIXEL_CACHE_BYTES, exact_fast_path: bool = True):
        self.image_processor = image_processor
        self.fast = ExactPixels(image_processor) if exact_fast_path else None
        self.max_bytes = int(max_bytes)
        self._entries: LRUCache | None = (
            LRUCache(maxsize=self.max_bytes, getsizeof=_entry_bytes) if self.max_bytes > 0 else None
        )
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    @property
    def bytes(self) -> int:
        with self._lock:
            return int(self._entries.currsize) if self._entries is not None else 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries) if self._entries is not None else 0

    def peek(self, digest: str) -> tuple["torch.Tensor | PixelCodes", torch.Tensor] | None:
        """The entry of ``digest`` if kept (counted as a hit), else None (not counted)."""
        with self._lock:
            hit = self._entries.get(digest) if self._entries is not None else None
            if hit is not None:
                self.hits += 1
            return hit

    def put(self, digest: str, entry: tuple) -> None:
        """Keep an entry made elsewhere (within the budget, as ``get`` keeps its own)."""
        if self._entries is not None and _entry_bytes(entry) <= self.max_bytes:
            with self._lock:
                self._entries[digest] = entry

    def get(self, image: Image.Image, digest: str) -> tuple["torch.Tensor | PixelCodes", torch.Tensor]:
        """(pixels: PixelCodes or float pixel_values [patches, dim], image_grid_thw [1, 3]) of one resized image."""
        with self._lock:
            hit = self._entries.get(digest) if self._entries is not None else None
            if hit is not None:
                self.hits += 1
                return hit
            self.misses += 1
        entry = self.fast(image) if self.fast is not None else None
        if entry is None:
            out = self.image_processor(images=[image], return_tensors="pt")
            entry = (out["pixel_values"], out["image_grid_thw"])
        if self._entries is not None and _entry_bytes(entry) <= self.max_bytes:
            with self._lock:
                self._entries[digest] = entry
        return entry


def _entry_bytes(entry: tuple) -> int:
    return sum(t.nbytes if isinstance(t, PixelCodes) else t.numel() * t.element_size() for t in entry)


@dataclass
class _Image:
    """One image of a request, resized and digested once."""

    image: Image.Image | None  # None when the pixels came from the cache
    digest: str
    pixels: "torch.Tensor | PixelCodes | None" = None
    grid: torch.Tensor | None = None


class _RequestImages:
    """Per-request memo: each distinct source decoded once, each decoded image resized and digested once."""

    def __init__(self, encoder: "Encoder"):
        self.encoder = encoder
        self._decoded: dict[Any, tuple[Any, Any]] = {}  # source key -> (source, decoded image or source)
        self._resized: dict[tuple, _Image] = {}  # (content digest, size options) -> _Image
        self._by_object: dict[tuple, _Image] = {}  # (id(decoded), size options) -> _Image
        self._keep: list = []  # objects whose id() is a key stay alive for the request

    def decode(self, source: Any) -> Any:
        """The decoded PIL image, or the source itself when it is not decodable (the sample's own
        normalization then reports the failure with its usual message)."""
        if source is None or isinstance(source, Image.Image):
            return source
        try:
            key = _source_key(source)
            hash(key)
        except Exception:  # noqa: BLE001 - an odd source: no sharing; the sample's normalization judges it
            return source
        if key is None:
            return source
        if key not in self._decoded:
            try:
                decoded = load_image(source, self.encoder.policy)
                self.encoder._count(images_decoded=1)
            except Exception:  # noqa: BLE001 - left as it was: to_conversation reports it as usual
                decoded = source
            self._decoded[key] = (source, decoded)
        return self._decoded[key][1]

    def prepare(self, image: Image.Image, index: int, size: dict | None) -> _Image:
        """The image resized and digested: once per object, and once per content (copies of one picture,
        as a dataset hands out a new object per row, hash their pixels but are resized once)."""
        options = tuple(sorted((k, repr(v)) for k, v in (size or {}).items()))
        by_object = (id(image), options)
        found = self._by_object.get(by_object)
        if found is None:
            content = image_digest(image)
            found = self._resized.get((content, options))
            if found is None:
                # Resizing is deterministic: the picture's content and the resize settings identify the result,
                # so pixels an earlier request made are found before resizing again.
                digest = _digest(content, options, self.encoder._resize_settings)
                cached = self.encoder.pixel_cache.peek(digest)
                deferred = None if cached is not None else self.encoder._deferred(image, index, size)
                if cached is not None:
                    found = _Image(None, digest, *cached)
                elif deferred is not None:
                    self.encoder.pixel_cache.put(digest, deferred)
                    found = _Image(None, digest, *deferred)
                    self.encoder._count(images_resized=1)
                else:
                    found = _Image(self.encoder._resize(image, index, size), digest)
                    self.encoder._count(images_resized=1)
                self._resized[(content, options)] = found
            self._by_object[by_object] = found
            self._keep.append(image)
        if found.pixels is None:
            found.pixels, found.grid = self.encoder.pixel_cache.get(found.image, found.digest)
        return found

    def predecode(self, sample: Any) -> Any:
        """A shallow copy of the sample with its image sources replaced by decoded images."""
        if isinstance(sample, Sample):
            sample = sample.to_dict()
        if not isinstance(sample, dict) or "input_ids" in sample:
            return sample
        out = dict(sample)
        for key in ("images", "image"):
            column = sample.get(key)
            if isinstance(column, (list, tuple)):
                out[key] = [self.decode(s) for s in column]
            elif column is not None:
                out[key] = self.decode(column)
        for key in ("messages", "prompt", "completion"):
            if key in sample:
                out[key] = self._in_messages(sample[key])
        return out

    def _in_messages(self, messages: Any) -> Any:
        if isinstance(messages, dict):
            return self._in_message(messages)
        if not isinstance(messages, (list, tuple)):
            return messages
        return [self._in_message(m) for m in messages]

    def _in_message(self, message: Any) -> Any:
        if not isinstance(message, dict) or not isinstance(message.get("content"), (list, tuple)):
            return message
        items = []
        for item in message["content"]:
            if isinstance(item, dict) and item.get("image") is not None:
                item = {**item, "image": self.decode(item["image"])}
            elif isinstance(item, dict) and item.get("image_url") is not None and item.get("image") is None:
                url = item["image_url"]
                decoded = self.decode(url.get("url") if isinstance(url, dict) else url)
                if isinstance(decoded, Image.Image):
                    item = {**{k: v for k, v in item.items() if k != "image_url"}, "type": "image", "image": decoded}
            items.append(item)
        return {**message, "content": items}


def _digest(*parts: Any) -> str:
    return hashlib.blake2b(repr(parts).encode(), digest_size=16).hexdigest()


def _source_key(source: Any) -> Any:
    """Identity of an image source within one request: same bytes, path or URI, or the same object."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return ("bytes", bytes(source))
    if isinstance(source, str):
        return ("str", source)
    if isinstance(source, os.PathLike):
        return ("str", os.fspath(source))
    if isinstance(source, dict):
        if source.get("bytes") is not None:
            data = source["bytes"]
            return ("bytes", bytes(data)) if isinstance(data, (bytes, bytearray, memoryview)) else None
        for k in ("path", "url"):
            if isinstance(source.get(k), str) and source[k]:
                return ("str", source[k])
        return None
    return ("object", id(source))  # numpy arrays and the like: the object itself


@dataclass
class _Group:
    """A prompt shared by several samples: its tokens and positions, computed once."""

    ids: torch.Tensor  # prompt tokens up to and including its last special token, image runs expanded
    positions: torch.Tensor | None  # [3, P]
    next_position: int
    between: str  # template text from the cut to the answer ("assistant\n")
    after: str  # template text after the answer ("<|im_end|>\n")
    pixels: "torch.Tensor | PixelCodes | None"
    image_grid_thw: torch.Tensor | None
    digests: list[str]


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
        self._cut_tokens = self._safe_cut_tokens()

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
        images = _RequestImages(self)
        groups: dict[str, _Group | None] = {}
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
        self._count(samples=len(samples))
        return encoded, errors

    # ---- one sample ----------------------------------------------------------------------------

    def _encode(self, sample: Any, images: _RequestImages, groups: dict) -> EncodedSample:
        if isinstance(sample, dict) and "input_ids" in sample:
            found = sample.get("images")
            return self._encode_tokens(sample["input_ids"], [] if found is None else found, images)
        conv = to_conversation(images.predecode(sample), self.policy)
        prepared = [images.prepare(im, i, size) for i, (im, size) in enumerate(zip(conv.images, conv.sizes))]
        answer = conv.messages[-1]
        text = _answer_text(answer)
        if self.share_prompts and self._cut_tokens and text is not None:
            key = _prompt_key(conv.messages[:-1], answer, conv.images, prepared)
            if key not in groups:
                groups[key] = self._group(conv.messages[:-1], answer, prepared)
            group = groups[key]
            if group is not None:
                return self._from_group(group, text)
        return self._whole(conv.messages, prepared)

    def _group(self, prompt: list[dict], answer: dict, prepared: list[_Image]) -> _Group | None:
        """Render and tokenize a prompt once; None when the template does not allow the cut."""
        as_list = isinstance(answer["content"], list)

        def render(content: str) -> str:
            body = [{**answer["content"][0], "text": content}] if as_list else content
            return self._render(prompt + [{**answer, "content": body}])

        text = render(_ANSWER)
        self._count(prompts_rendered=2)
        if text.count(_ANSWER) != 1:
            return None
        head, after = text.split(_ANSWER)
        if render(_PROBE) != head + _PROBE + after:  # the template must insert the answer verbatim
            return None
        cut = max((head.rfind(t) + len(t) for t in self._cut_tokens if t in head), default=-1)
        between = head[cut:] if cut >= 0 else ""
        if cut < 0 or any(t in between + after for t in (IMAGE_TOKEN, VIDEO_TOKEN)):
            return None
        ids, pixels, grid = self._prompt_ids(head[:cut], prepared, add_special_tokens=True)
        positions = self._positions(ids, grid)
        if positions is not None and not bool((positions[:, -1] == positions[0, -1]).all()):
            return None  # the prompt must end on a text token for the answer's positions to follow on
        next_position = int(positions[0, -1]) + 1 if positions is not None else 0
        return _Group(ids, positions, next_position, between, after, pixels, grid, [p.digest for p in prepared])

    def _from_group(self, group: _Group, answer: str) -> EncodedSample:
        suffix = self._tokenize(group.between + answer + group.after, add_special_tokens=False)
        if self.image_token_id in suffix or (self.video_token_id is not None and self.video_token_id in suffix):
            raise SampleError("the answer holds image or video tokens but no image of its own")
        suffix_ids = torch.tensor(suffix, dtype=torch.long)
        ids = torch.cat([group.ids, suffix_ids])
        self._check_length(len(ids))
        positions = None
        if group.positions is not None:
            tail = torch.arange(len(suffix), dtype=group.positions.dtype) + group.next_position
            positions = torch.cat([group.positions, tail.expand(3, -1)], dim=1)
        self._count(prompts_shared=1)
        return EncodedSample(
            input_ids=ids,
            mm_token_type_ids=token_type_ids(ids, self.image_token_id, self.video_token_id),
            pixels=group.pixels,
            image_grid_thw=group.image_grid_thw,
            image_digests=list(group.digests),
            position_ids=positions,
        )

    def _whole(self, messages: list[dict], prepared: list[_Image]) -> EncodedSample:
        text = self._render(messages)
        ids, pixels, grid = self._prompt_ids(text, prepared, add_special_tokens=True)
        self._check_length(len(ids))
        self._count(whole_conversations=1)
        return EncodedSample(
            input_ids=ids,
            mm_token_type_ids=token_type_ids(ids, self.image_token_id, self.video_token_id),
            pixels=pixels,
            image_grid_thw=grid,
            image_digests=[p.digest for p in prepared],
            position_ids=self._positions(ids, grid),
        )

    def _prompt_ids(self, text: str, prepared: list[_Image], add_special_tokens: bool):
        """Token ids of rendered text with one <|image_pad|> per image, each expanded to its image's token
        count (the processor expands the text instead: the same ids, since <|image_pad|> is a special token)."""
        ids = self._tokenize(text, add_special_tokens=add_special_tokens)
        if self.video_token_id is not None and self.video_token_id in ids:
            raise SampleError("the conversation holds a video token; only images are supported")
        pixels = grid = None
        if prepared:
            merge = int(self.image_processor.merge_size) ** 2
            grid = torch.cat([p.grid for p in prepared])
            pixels = cat_pixels([p.pixels for p in prepared])
            ids = _expand_image_runs(ids, self.image_token_id, [int(g.prod()) // merge for g in grid], single_only=True)
        elif self.image_token_id in ids:
            raise SampleError("the text holds image tokens (<|image_pad|>) but the sample has no image")
        return torch.tensor(ids, dtype=torch.long), pixels, grid

    def _encode_tokens(self, input_ids: Sequence[int] | torch.Tensor, images: Sequence[Any], memo: _RequestImages):
        """A conversation already tokenized with this model's chat template (prompt + completion ids of
        a Qwen-family policy), so nothing is decoded and tokenized again.

        The ids must end the way the template ends the answer; a trailing end-of-turn
        (<|im_end|>, <|endoftext|>) is normalized to "<|im_end|>\\n", and one is added when missing
        (truncated completions: flag those yourself). Image placeholders may be expanded (one
        <|image_pad|> per image token, as the processor makes them) or a single <|image_pad|> per image.
        """
        tok = self.tokenizer
        if hasattr(input_ids, "tolist"):  # tensors, numpy arrays
            input_ids = input_ids.tolist()
        if not isinstance(input_ids, (list, tuple)) or not all(
            isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in input_ids
        ):
            raise SampleError("input_ids must be a list of integer token ids")
        ids = [int(t) for t in input_ids]
        vocab = self.vocab_size or len(tok)
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
        if self.video_token_id is not None and self.video_token_id in ids:
            raise SampleError("input_ids hold video tokens; only images are supported")
        prepared = []
        for i, src in enumerate(images):
            decoded = memo.decode(src)
            if not isinstance(decoded, Image.Image):
                try:
                    decoded = load_image(src, self.policy)  # raises the source's own reason
                except SampleError as e:
                    raise SampleError(f"image {i}: {e}") from None
            prepared.append(memo.prepare(decoded, i, None))
        pixels = grid = None
        if prepared:
            grid = torch.cat([p.grid for p in prepared])
            pixels = cat_pixels([p.pixels for p in prepared])
            merge = int(self.image_processor.merge_size) ** 2
            ids = _expand_image_runs(ids, self.image_token_id, [int(g.prod()) // merge for g in grid])
        elif self.image_token_id in ids:
            raise SampleError("input_ids hold image tokens but no images were given")
        self._check_length(len(ids))
        ids_t = torch.tensor(ids, dtype=torch.long)
        self._count(whole_conversations=1)
        return EncodedSample(
            input_ids=ids_t,
            mm_token_type_ids=token_type_ids(ids_t, self.image_token_id, self.video_token_id),
            pixels=pixels,
            image_grid_thw=grid,
            image_digests=[p.digest for p in prepared],
            position_ids=self._positions(ids_t, grid),
        )

    # ---- pieces --------------------------------------------------------------------------------

    def _render(self, messages: list[dict]) -> str:
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)

    def _tokenize(self, text: str, add_special_tokens: bool) -> list[int]:
        return self.tokenizer(text, add_special_tokens=add_special_tokens, return_attention_mask=False)["input_ids"]

    def _positions(self, ids: torch.Tensor, grid: torch.Tensor | None) -> torch.Tensor | None:
        if self.rope_index is None:
            return None
        mm = token_type_ids(ids, self.image_token_id, self.video_token_id)
        return self.rope_index(ids[None], mm[None], grid)[:, 0]

    def _check_length(self, n: int) -> None:
        if self.max_length is not None and n > self.max_length:
            raise SampleError(f"sample has {n} tokens, over max_length={self.max_length}")

    @property
    def _resize_settings(self) -> tuple:
        return ("qwen-vl-utils", self.min_pixels, self.max_pixels, self.patch_size)

    def _deferred(self, image: Image.Image, index: int, size: dict | None):
        """(PixelCodes, grid) of an image whose resize is left to the device, or None (resize here)."""
        fast = self.pixel_cache.fast
        if not self.resize_on_device or fast is None or not fast.enabled or image.mode != "RGB":
            return None
        from qwen_vl_utils.vision_process import IMAGE_MAX_TOKEN_NUM, IMAGE_MIN_TOKEN_NUM, SPATIAL_MERGE_SIZE
        from qwen_vl_utils.vision_process import smart_resize as qwen_smart_resize

        item = {k: v for k, v in (("min_pixels", self.min_pixels), ("max_pixels", self.max_pixels)) if v}
        item.update(size or {})
        factor = self.patch_size * SPATIAL_MERGE_SIZE
        try:  # fetch_image's own arithmetic for the size it resizes to
            if "resized_height" in item and "resized_width" in item:
                height, width = qwen_smart_resize(item["resized_height"], item["resized_width"], factor=factor)
            else:
                width, height = image.size
                height, width = qwen_smart_resize(
                    height, width, factor=factor,
                    min_pixels=item.get("min_pixels", IMAGE_MIN_TOKEN_NUM * factor**2),
                    max_pixels=item.get("max_pixels", IMAGE_MAX_TOKEN_NUM * factor**2),
                )  # fmt: skip
        except ValueError as e:  # e.g. aspect ratio over 200
            raise SampleError(f"image {index}: {e}") from None
        return fast.deferred(image, height, width)

    def _resize(self, image: Image.Image, index: int, size: dict | None = None) -> Image.Image:
        """qwen-vl-utils' own step: RGB (RGBA on white) and smart resize to multiples of 28, with the
        bounds the caller gave (from_pretrained, or the image item), else qwen-vl-utils' defaults. The
        image processor then applies the checkpoint's own bounds, as in the model card's code."""
        item = {"image": image}
        item.update({k: v for k, v in (("min_pixels", self.min_pixels), ("max_pixels", self.max_pixels)) if v})
        item.update(size or {})
        try:
            return fetch_image(item, image_patch_size=self.patch_size)
        except ValueError as e:  # e.g. aspect ratio over 200
            raise SampleError(f"image {index}: {e}") from None

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for k, v in deltas.items():
                setattr(self.counters, k, getattr(self.counters, k) + v)

    def _safe_cut_tokens(self) -> tuple[str, ...]:
        """Special tokens after which the text may be cut without changing the ids: split out before
        normalization and pre-tokenization (not normalized, no lstrip/rstrip), none the start of another,
        and a tokenizer that adds nothing at the end of a sequence."""
        tok = self.tokenizer
        added = {t.content: t for t in getattr(tok, "added_tokens_decoder", {}).values()}
        cut = added.get("<|im_start|>")
        if cut is None or cut.normalized or cut.lstrip or cut.rstrip or cut.single_word:
            return ()
        if any(other != cut.content and other.startswith(cut.content) for other in added):
            return ()
        probe = "a<|im_start|>b"
        plain = self._tokenize(probe, add_special_tokens=False)
        special = self._tokenize(probe, add_special_tokens=True)
        if special[len(special) - len(plain) :] != plain:  # something appended (an EOS): the cut would move it
            return ()
        return (cut.content,)


def _answer_text(answer: dict) -> str | None:
    """The final answer as plain text when it can be tokenized apart from its prompt, else None."""
    content = answer.get("content")
    if isinstance(content, str):
        return content
    if (
        isinstance(content, list)
        and len(content) == 1
        and isinstance(content[0], dict)
        and content[0].get("type") == "text"
        and isinstance(content[0].get("text"), str)
        and not any(k in content[0] for k in ("image", "image_url", "video"))
    ):
        return content[0]["text"]
    return None


def _prompt_key(prompt: list[dict], answer: dict, images: list[Image.Image], prepared: list[_Image]) -> str:
    """Everything the template sees of a sample except the answer's text; images by content digest."""
    digests = {id(im): p.digest for im, p in zip(images, prepared)}

    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return tuple(sorted((str(k), plain(v)) for k, v in value.items()))
        if isinstance(value, (list, tuple)):
            return tuple(plain(v) for v in value)
        if isinstance(value, Image.Image):
            return ("image", digests.get(id(value), id(value)))
        if value is None or isinstance(value, (str, int, float, bool)):
            return value
        return ("object", type(value).__name__, id(value))  # never equal to another object's

    shape = {k: v for k, v in answer.items() if k != "content"}
    form = "str" if isinstance(answer["content"], str) else plain([{k: v for k, v in answer["content"][0].items() if k != "text"}])
    return repr((plain(prompt), plain(shape), form))


def _expand_image_runs(ids: list[int], image_id: int, sizes: list[int], single_only: bool = False) -> list[int]:
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
