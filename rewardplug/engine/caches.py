"""Vision tower outputs kept by image content, least recently used first out, bounded in bytes."""

from __future__ import annotations

import threading

import torch
from cachetools import LRUCache


def _nbytes(features: torch.Tensor) -> int:
    return features.numel() * features.element_size()


class VisionCache:
    """``max_bytes`` bounds the tensors kept (the runner stores copies with their own storage, so the
    bound is real memory); a tensor larger than the whole budget is not kept; 0 keeps nothing."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._entries = LRUCache(maxsize=max(self.max_bytes, 1), getsizeof=_nbytes)
        self._lock = threading.Lock()  # the model thread writes; stats() reads from any thread

    @property
    def bytes(self) -> int:
        with self._lock:
            return int(self._entries.currsize)

    def get(self, digest: str) -> torch.Tensor | None:
        with self._lock:
            return self._entries.get(digest)  # a hit becomes the most recently used

    def put(self, digest: str, features: torch.Tensor) -> None:
        if _nbytes(features) > self.max_bytes:
            return
        with self._lock:
            if digest not in self._entries:
                self._entries[digest] = features  # evicts the least recently used until it fits

    def values(self) -> list[torch.Tensor]:
        with self._lock:
            return list(self._entries.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
