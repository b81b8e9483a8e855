"""The pixel cache: prepared pixels per image content digest, bounded in bytes (LRU), shared by requests."""

from __future__ import annotations

import threading
from typing import Any

import torch
from cachetools import LRUCache
from PIL import Image

from .pixel_codes import PixelCodes
from .pixels import ExactPixels

DEFAULT_PIXEL_CACHE_BYTES = 256 * 2**20  # about 13 images of 1024x1024 (896x896 after resize), fp32


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

    def get(self, image: Image.Image, digest: str, data: bytes | None = None) -> tuple["torch.Tensor | PixelCodes", torch.Tensor]:
        """(pixels: PixelCodes or float pixel_values [patches, dim], image_grid_thw [1, 3]) of one resized image
        (data: its ``tobytes()`` when known)."""
        with self._lock:
            hit = self._entries.get(digest) if self._entries is not None else None
            if hit is not None:
                self.hits += 1
                return hit
            self.misses += 1
        entry = self.fast(image, data) if self.fast is not None else None
        if entry is None:
            out = self.image_processor(images=[image], return_tensors="pt")
            entry = (out["pixel_values"], out["image_grid_thw"])
        if self._entries is not None and _entry_bytes(entry) <= self.max_bytes:
            with self._lock:
                self._entries[digest] = entry
        return entry


def _entry_bytes(entry: tuple) -> int:
    return sum(t.nbytes if isinstance(t, PixelCodes) else t.numel() * t.element_size() for t in entry)

