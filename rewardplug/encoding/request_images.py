"""A request's images: each distinct source decoded once, each decoded image resized (qwen-vl-utils' step,
on the host or left to the device) and digested once, and its pixels taken from the pixel cache."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image
from qwen_vl_utils import fetch_image

from ..errors import SampleError
from ..images import load_image
from ..samples import Sample
from .digests import digest, image_digest, source_key
from .pixel_codes import PixelCodes

if TYPE_CHECKING:
    from .encoder import Encoder


_DIGEST = "_rewardplug_digest"


def with_digest(image: Image.Image, digest: str) -> Image.Image:
    """The image, carrying its content digest (``rewardplug.images.image_digest``) as computed by a trusted
    sender (the pool's client), so that ``prepare`` does not hash its pixels again. An attribute of this
    object only: a copy, a conversion or a pickled image does not carry it, and no decoder sets it."""
    setattr(image, _DIGEST, digest)
    return image


@dataclass
class PreparedImage:
    """One image of a request, resized and digested once."""

    image: Image.Image | None  # None when the pixels came from the cache
    digest: str
    pixels: "torch.Tensor | PixelCodes | None" = None
    grid: torch.Tensor | None = None
    data: bytes | None = None  # image.tobytes() when already read (the source's, where the resize kept them)


class RequestImages:
    """Per-request memo: each distinct source decoded once, each decoded image resized and digested once."""

    def __init__(self, encoder: "Encoder"):
        self.encoder = encoder
        self._decoded: dict[Any, tuple[Any, Any]] = {}  # source key -> (source, decoded image or source)
        self._resized: dict[tuple, PreparedImage] = {}  # (content digest, size options) -> PreparedImage
        self._by_object: dict[tuple, PreparedImage] = {}  # (id(decoded), size options) -> PreparedImage
        self._keep: list = []  # objects whose id() is a key stay alive for the request

    def decode(self, source: Any) -> Any:
        """The decoded PIL image, or the source itself when it is not decodable (the sample's own
        normalization then reports the failure with its usual message)."""
        if source is None or isinstance(source, Image.Image):
            return source
        try:
            key = source_key(source)
            hash(key)
        except Exception:  # noqa: BLE001 - an odd source: no sharing; the sample's normalization judges it
            return source
        if key is None:
            return source
        if key not in self._decoded:
            try:
                decoded = load_image(source, self.encoder.policy)
                self.encoder.count(images_decoded=1)
            except Exception:  # noqa: BLE001 - left as it was: to_conversation reports it as usual
                decoded = source
            self._decoded[key] = (source, decoded)
        return self._decoded[key][1]

    def prepare(self, image: Image.Image, index: int, size: dict | None) -> PreparedImage:
        """The image resized and digested: once per object, and once per content (copies of one picture,
        as a dataset hands out a new object per row, hash their pixels but are resized once)."""
        encoder = self.encoder
        options = tuple(sorted((k, repr(v)) for k, v in (size or {}).items()))
        by_object = (id(image), options)
        found = self._by_object.get(by_object)
        if found is None:
            content = getattr(image, _DIGEST, None)
            data = image.tobytes() if image.mode == "RGB" and content is None else None  # read once: digest, codes
            content = content or image_digest(image, data)
            found = self._resized.get((content, options))
            if found is None:
                # Resizing is deterministic: the picture's content and the resize settings identify the result,
                # so pixels an earlier request made are found before resizing again.
                key = digest(content, options, _resize_settings(encoder))
                cached = encoder.pixel_cache.peek(key)
                deferred = None if cached is not None else _deferred(encoder, image, index, size, data)
                if cached is not None:
                    found = PreparedImage(None, key, *cached)
                elif deferred is not None:
                    encoder.pixel_cache.put(key, deferred)
                    found = PreparedImage(None, key, *deferred)
                    encoder.count(images_resized=1)
                else:
                    resized = _resize(encoder, image, index, size)
                    # Pillow's resize to the same size is a copy, and RGB stays RGB: the bytes already read.
                    same = data is not None and resized.mode == "RGB" and resized.size == image.size
                    found = PreparedImage(resized, key, data=data if same else None)
                    encoder.count(images_resized=1)
                self._resized[(content, options)] = found
            self._by_object[by_object] = found
            self._keep.append(image)
        if found.pixels is None:
            found.pixels, found.grid = encoder.pixel_cache.get(found.image, found.digest, found.data)
            found.image = found.data = None  # the pixels are made: the request no longer needs the image
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


def _resize_settings(encoder: "Encoder") -> tuple:
    return ("qwen-vl-utils", encoder.min_pixels, encoder.max_pixels, encoder.patch_size)


def _deferred(encoder: "Encoder", image: Image.Image, index: int, size: dict | None, data: bytes | None = None):
    """(PixelCodes, grid) of an image whose resize is left to the device, or None (resize here)."""
    fast = encoder.pixel_cache.fast
    if not encoder.resize_on_device or fast is None or not fast.enabled or image.mode != "RGB":
        return None
    from qwen_vl_utils.vision_process import IMAGE_MAX_TOKEN_NUM, IMAGE_MIN_TOKEN_NUM, SPATIAL_MERGE_SIZE
    from qwen_vl_utils.vision_process import smart_resize as qwen_smart_resize

    item = {k: v for k, v in (("min_pixels", encoder.min_pixels), ("max_pixels", encoder.max_pixels)) if v}
    item.update(size or {})
    factor = encoder.patch_size * SPATIAL_MERGE_SIZE
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
    return fast.deferred(image, height, width, data)


def _resize(encoder: "Encoder", image: Image.Image, index: int, size: dict | None = None) -> Image.Image:
    """qwen-vl-utils' own step: RGB (RGBA on white) and smart resize to multiples of 28, with the
    bounds the caller gave (from_pretrained, or the image item), else qwen-vl-utils' defaults. The
    image processor then applies the checkpoint's own bounds, as in the model card's code."""
    item = {"image": image}
    item.update({k: v for k, v in (("min_pixels", encoder.min_pixels), ("max_pixels", encoder.max_pixels)) if v})
    item.update(size or {})
    try:
        return fetch_image(item, image_patch_size=encoder.patch_size)
    except ValueError as e:  # e.g. aspect ratio over 200
        raise SampleError(f"image {index}: {e}") from None
