"""Encoding: samples -> token ids, pixel codes and M-RoPE positions, exactly as the model card's recipe,
and encoded samples -> padded batches. Imports only the inputs layer (samples, images, errors).

One job per module:
  encoder.py         the Encoder: chat template, tokens, positions; a request's work shared per group
  request_images.py  a request's images: each source decoded once, resized and digested once
  prompt_groups.py   prompt-cut sharing: a group's prompt rendered and tokenized once
  token_samples.py   samples given as token ids
  tokens.py          token rules every path shares (placeholders, mm_token_type_ids, image runs)
  digests.py         content keys (images, resized images, prompt groups, sources), each over all its content
  pixels.py          the image processor's exact arithmetic as a table (ExactPixels)
  pixel_codes.py     uint8 pixel codes expanded to float pixels where used
  resize.py          Pillow's bicubic resize as integer tensor operations
  pixel_cache.py     byte-bounded cache of prepared pixels by content digest
  encoded.py         EncodedSample and the encoder's counters
  collate.py         encoded samples -> one padded Batch
  workers.py         encoding in worker processes (EncoderProcesses), bitwise the same results
  handoff.py         encoded samples through one shared-memory segment per request
"""

from .collate import Batch, collate
from .encoded import EncodedSample, EncoderCounters
from .encoder import Encoder, RopeIndex
from .pixel_cache import DEFAULT_PIXEL_CACHE_BYTES, PixelCache
from .pixel_codes import PixelCodes, cat_pixels, pixel_values
from .pixels import ExactPixels
from .tokens import IMAGE_TOKEN, VIDEO_TOKEN, token_type_ids
from .workers import EncoderProcesses

__all__ = [
    "DEFAULT_PIXEL_CACHE_BYTES",
    "IMAGE_TOKEN",
    "VIDEO_TOKEN",
    "Batch",
    "EncodedSample",
    "Encoder",
    "EncoderCounters",
    "EncoderProcesses",
    "ExactPixels",
    "PixelCache",
    "PixelCodes",
    "RopeIndex",
    "cat_pixels",
    "collate",
    "pixel_values",
    "token_type_ids",
]
