"""Pixel codes: images' pixels as uint8 values plus the processor's arithmetic as a 3 x 256 table,
expanded to the processor's float32 pixels where they are used (on the model's device)."""

from __future__ import annotations

from typing import Any, Callable

import torch

from .resize import pillow_rule, resize_bicubic


class PixelCodes:
    """Images' pixels as uint8 values, with the processor's arithmetic as a table, expanded where used.

    Each part is one or more images' values in patch order ``[patches, 3, P, P]``, or one whole image
    ``[H, W, 3]`` still to be resized to ``(height, width)`` with Pillow's bicubic filter
    (``rewardplug.encoding.resize``: the same bytes as Pillow, computed on the model's device). ``values(move)``
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

