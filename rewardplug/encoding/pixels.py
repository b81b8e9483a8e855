"""Exact pixels: the PIL Qwen2-VL image processor's arithmetic as a table lookup on uint8 codes, bitwise
the processor's pixels (checked against the processor when made), or None where that cannot be shown."""

from __future__ import annotations

import logging
from typing import Any

import torch
from PIL import Image

from .pixel_codes import PixelCodes
from .resize import pillow_rule

logger = logging.getLogger(__name__)


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

    def __call__(self, image: Image.Image, data: bytes | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Codes and grid of an image the processor would not resize; data: its ``tobytes()`` if known."""
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
        values = np.asarray(image) if data is None else np.frombuffer(data, dtype=np.uint8)
        codes = values.reshape(gh // m, m, p, gw // m, m, p, 3).transpose(0, 3, 1, 4, 6, 2, 5)
        codes = torch.from_numpy(np.ascontiguousarray(codes).reshape(gh * gw, 3, p, p))
        return PixelCodes([(codes, None)], self.table, t, p, m), torch.tensor([[1, gh, gw]], dtype=torch.long)

    def deferred(self, image: Image.Image, height: int, width: int, data: bytes | None = None
                 ) -> tuple[PixelCodes, torch.Tensor] | None:  # fmt: skip
        """Codes of an RGB image not resized yet: the resize to (height, width) happens where the pixels
        are used (``PixelCodes.values``); None where that would not give the processor's bits."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        ip = self.image_processor
        if not self.enabled or image.mode != "RGB" or pillow_rule() is None:
            return None
        if smart_resize(height, width, factor=self.factor, min_pixels=ip.size.shortest_edge,
                        max_pixels=ip.size.longest_edge) != (height, width):  # fmt: skip
            return None
        import numpy as np

        p, m, t = int(ip.patch_size), int(ip.merge_size), int(ip.temporal_patch_size)
        w, h = image.size
        values = np.array(image) if data is None else np.frombuffer(data, dtype=np.uint8).reshape(h, w, 3).copy()
        whole = torch.from_numpy(values)  # [H, W, 3] uint8, a copy of its own
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
