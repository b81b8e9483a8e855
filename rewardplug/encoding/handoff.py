"""Encoded samples handed from an encoder process to its parent through one shared-memory segment.

The sender writes every distinct tensor of a request's encoded samples (token ids, token types, positions,
image grids, pixel codes and their table, float pixels) once into a new segment and sends a small
manifest (offsets, dtypes, shapes, digests) through its pipe; tensors shared within a prompt group are
written once and stay shared on the other side. The receiver copies the segment out in one go, then
closes and unlinks it, so a segment lives only between the two steps: bytes are the same bits both ways.
Segments are named ``<prefix>-<n>``, so the parent can remove what a dead sender left behind (``sweep``).
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from multiprocessing import shared_memory
from typing import Any

import numpy as np
import torch

from .encoded import EncodedSample
from .pixel_codes import PixelCodes

_ALIGN = 64  # every tensor starts on a 64-byte boundary, so any dtype view of the copy is aligned
_SHM_DIR = "/dev/shm"


@dataclass
class Packed:
    """What goes through the pipe: the segment's name and size, and how to read the samples back."""

    segment: str | None  # None: nothing to read (no sample has a tensor)
    nbytes: int
    tensors: list[tuple[int, str, tuple[int, ...]]]  # (offset, dtype name, shape) per distinct tensor
    samples: list[Any]  # per sample: None, or a tuple of field references (see _sample_record)


def pack(encoded: list[EncodedSample | None], segment_name: str) -> Packed:
    """Write the samples' tensors into a new shared-memory segment named ``segment_name``."""
    slots: dict[int, int] = {}
    tensors: list[torch.Tensor] = []

    def ref(t: torch.Tensor | None) -> int | None:
        if t is None:
            return None
        if id(t) not in slots:
            slots[id(t)] = len(tensors)
            tensors.append(t)
        return slots[id(t)]

    def pixels_record(p: Any) -> Any:
        if p is None:
            return None
        if isinstance(p, PixelCodes):
            parts = [(ref(v), None if size is None else tuple(size)) for v, size in p.parts]
            return ("codes", parts, ref(p.table), p.temporal, p.patch, p.merge)
        return ("tensor", ref(p))

    records: list[Any] = []
    codes_seen: dict[int, Any] = {}
    for s in encoded:
        if s is None:
            records.append(None)
            continue
        key = id(s.pixels)
        if key not in codes_seen:
            codes_seen[key] = pixels_record(s.pixels)
        records.append((ref(s.input_ids), ref(s.mm_token_type_ids), ref(s.position_ids), ref(s.image_grid_thw),
                        codes_seen[key], key, list(s.image_digests)))  # fmt: skip
    layout, offset = [], 0
    for t in tensors:
        layout.append((offset, str(t.dtype).removeprefix("torch."), tuple(t.shape)))
        offset += -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
    if offset == 0:
        return Packed(None, 0, layout, records)
    segment = shared_memory.SharedMemory(name=segment_name, create=True, size=offset)
    try:
        for (start, _, _), t in zip(layout, tensors):
            n = t.numel() * t.element_size()
            if n:
                view = np.frombuffer(segment.buf, dtype=np.uint8, count=n, offset=start)
                view[:] = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
                del view
    except BaseException:
        segment.close()
        segment.unlink()
        raise
    segment.close()
    return Packed(segment_name, offset, layout, records)


def unpack(packed: Packed, tables: dict[bytes, torch.Tensor] | None = None) -> list[EncodedSample | None]:
    """Read the samples back (one copy of the segment), then close and unlink the segment.

    tables: pixel-code tables by their bytes; a table found there is used as it is (``PixelCodes``
    concatenate only when their tables are the same object), a new one is added."""
    whole = torch.empty(packed.nbytes, dtype=torch.uint8)
    if packed.segment is not None:
        segment = shared_memory.SharedMemory(name=packed.segment)
        try:
            source = np.frombuffer(segment.buf, dtype=np.uint8, count=packed.nbytes)
            whole.numpy()[:] = source
            del source
        finally:
            segment.close()
            segment.unlink()
    tensors = []
    for start, dtype, shape in packed.tensors:
        dt = getattr(torch, dtype)
        n = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dt).element_size()
        tensors.append(whole[start : start + n].view(dt).reshape(shape))
    tables = {} if tables is None else tables

    def table(slot: int) -> torch.Tensor:
        t = tensors[slot]
        return tables.setdefault(t.numpy().tobytes(), t)

    def pixels(record: Any) -> Any:
        if record is None:
            return None
        if record[0] == "tensor":
            return tensors[record[1]]
        _, parts, table_slot, temporal, patch, merge = record
        return PixelCodes([(tensors[v], size) for v, size in parts], table(table_slot), temporal, patch, merge)

    out: list[EncodedSample | None] = []
    shared: dict[int, Any] = {}
    for r in packed.samples:
        if r is None:
            out.append(None)
            continue
        ids, mm, positions, grid, pixels_record, pixels_key, digests = r
        if pixels_key not in shared:
            shared[pixels_key] = pixels(pixels_record)
        get = (lambda k: None if k is None else tensors[k])
        out.append(EncodedSample(get(ids), get(mm), shared[pixels_key], get(grid), digests, get(positions)))
    return out


def discard(packed: Packed) -> None:
    """Unlink a packed segment that will not be read."""
    if packed.segment is not None:
        _unlink(packed.segment)


def sweep(prefix: str) -> list[str]:
    """Unlink every segment named ``<prefix>-*`` (what a dead sender left); returns their names."""
    names = [os.path.basename(p) for p in glob.glob(os.path.join(_SHM_DIR, glob.escape(prefix) + "-*"))]
    for name in names:
        _unlink(name)
    return names


def _unlink(name: str) -> None:
    try:
        segment = shared_memory.SharedMemory(name=name)
    except FileNotFoundError:
        return
    segment.close()
    segment.unlink()
