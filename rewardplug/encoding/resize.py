"""Pillow's bicubic resize of 8-bit images, bit for bit, as tensor operations on any device.

qwen-vl-utils resizes every image with ``PIL.Image.resize`` (bicubic). Pillow's algorithm is exact
integer arithmetic once its coefficients are known: per output column (then row), up to ``ksize``
weights computed in double precision, normalized, turned into 22-bit fixed point; each output value
is ``clip8((sum(input * weight) + 2**21) >> 22)``, horizontal pass first (rounded to uint8), then
vertical. The coefficients are computed here with the same double operations in the same order
(numpy float64, no fused multiply-add), and the sums are integers, so the result is the same bytes on
a GPU as on Pillow's CPU path. Recent Pillow (13 here) may run the vertical pass first; ``pillow_rule`` checks probes
against the installed Pillow and says which order it follows, or None (then the encoder resizes with
Pillow on the host). ``tests/test_resize.py`` compares both on many sizes.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

PRECISION_BITS = 32 - 8 - 2
_SUPPORT = 2.0  # bicubic


def _bicubic(x: np.ndarray) -> np.ndarray:
    a = -0.5
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


@functools.lru_cache(maxsize=512)
def coefficients(in_size: int, out_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(index [out, ksize] int64, weight [out, ksize] int32) of Pillow's ``precompute_coeffs`` and
    ``normalize_coeffs_8bpc`` for a full-image box; unused taps have weight 0 and index 0."""
    scale = float(np.float32(in_size) - np.float32(0)) / out_size  # (double)(in1 - in0) / outSize, box in float
    filterscale = max(scale, 1.0)
    support = _SUPPORT * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    xx = np.arange(out_size, dtype=np.float64)
    center = 0.0 + (xx + 0.5) * scale
    ss = 1.0 / filterscale
    xmin = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)  # (int) truncates; then clamped at 0
    xmax = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - xmin
    taps = np.arange(ksize)
    used = taps[None, :] < xmax[:, None]
    w = np.where(used, _bicubic((taps[None, :] + xmin[:, None] - center[:, None] + 0.5) * ss), 0.0)
    ww = np.zeros(out_size)
    for k in range(ksize):  # the C loop's order of additions
        ww = ww + w[:, k]
    w = np.where((ww != 0.0)[:, None], w / np.where(ww != 0.0, ww, 1.0)[:, None], w)
    scaled = w * (1 << PRECISION_BITS)
    fixed = np.where(w < 0, np.trunc(-0.5 + scaled), np.trunc(0.5 + scaled)).astype(np.int32)
    index = np.where(used, taps[None, :] + xmin[:, None], 0)
    return torch.from_numpy(index), torch.from_numpy(np.where(used, fixed, 0).astype(np.int32))


def _pass(image: torch.Tensor, dim: int, out_size: int) -> torch.Tensor:
    """One pass over ``dim`` (0 rows, 1 columns) of an [H, W, C] uint8 tensor."""
    index, weight = coefficients(image.shape[dim], out_size)
    index, weight = index.to(image.device), weight.to(image.device)
    source = image.to(torch.int32)
    acc = torch.full((), 1 << (PRECISION_BITS - 1), dtype=torch.int32, device=image.device)
    for k in range(index.shape[1]):
        taps = source.index_select(dim, index[:, k])
        w = weight[:, k].view(-1, 1, 1) if dim == 0 else weight[:, k].view(1, -1, 1)
        acc = acc + taps * w
    return (acc >> PRECISION_BITS).clamp_(0, 255).to(torch.uint8)


def resize_bicubic(image: torch.Tensor, height: int, width: int, vertical_first_rule: bool = True) -> torch.Tensor:
    """``PIL.Image.fromarray(image).resize((width, height))`` for an [H, W, C] uint8 tensor, on its device.

    vertical_first_rule: recent Pillow (13 does) runs the vertical pass first when the height shrinks by more than
    twice what the width does (older Pillow always runs the horizontal pass first); ``pillow_rule()``
    tells which one the installed Pillow follows."""
    in_h, in_w = image.shape[0], image.shape[1]
    vertical_first = vertical_first_rule and (in_h - height) > 0 and (in_h - height) > (in_w - width) * 2
    if vertical_first and in_h != height:
        image = _pass(image, 0, height)
    if image.shape[1] != width:
        image = _pass(image, 1, width)
    if image.shape[0] != height:
        image = _pass(image, 0, height)
    return image


@functools.lru_cache(maxsize=1)
def pillow_rule() -> bool | None:
    """Which pass order the installed Pillow follows (see ``resize_bicubic``), or None when this module
    does not reproduce it (then images are resized by Pillow on the host)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    probes = [((96, 120), (100, 60)), ((120, 96), (60, 100)), ((90, 70), (112, 84)), ((70, 90), (28, 56))]
    found = None
    for rule in (True, False):
        ok = True
        for (w, h), (ow, oh) in probes:
            array = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            ref = np.asarray(Image.fromarray(array).resize((ow, oh)))
            got = resize_bicubic(torch.from_numpy(array.copy()), oh, ow, rule).numpy()
            ok = ok and np.array_equal(ref, got)
        if ok:
            found = rule
            break
    return found
