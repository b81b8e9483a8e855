"""The engine's device path reads nothing back from the device that the host already knows.

- The vision tower gets its index tensors precomputed on the host (positions, window permutation,
  sequence boundaries) where transformers takes them (5.25), with the image grid left on the host: no
  ``grid_thw.tolist()`` on a device tensor. transformers 5.10 (verl's pin) cannot take them: there the
  grid goes to the device as before, chosen by what the installed transformers accepts.
- An unpadded batch passes ``attention_mask=None``, so the model does not check ``padding_mask.all()``
  on the device. A padded batch keeps its mask.
Scores stay those of the model alone.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import random_image

from rewardplug import RewardEngine
from rewardplug.encoding import cat_pixels, collate, pixel_values
from rewardplug.model import precomputed_vision_supported

ROOT = Path(__file__).resolve().parent.parent
PICTURES = [random_image(56, 84, seed=1), random_image(112, 56, seed=2)]
SAMPLES = [
    {"prompt": "What is here?", "completion": "Noise.", "images": [PICTURES[0]]},
    {"prompt": "What is here?", "completion": "Coloured noise, wide.", "images": [PICTURES[0]]},
    {"prompt": "And this one?", "completion": "Tall noise.", "images": [PICTURES[1]]},
    {"prompt": "No picture", "completion": "Fine."},
]


def _capture(module, calls: list):
    def hook(_module, args, kwargs):
        calls.append((args, dict(kwargs)))

    return module.register_forward_pre_hook(hook, with_kwargs=True)


def test_installed_transformers_takes_precomputed_vision_indices():
    import transformers

    assert precomputed_vision_supported(), f"transformers {transformers.__version__}"


def test_vision_tower_gets_host_indices_and_gives_the_same_features(model):
    encoded = [e for e in model.encode_many(SAMPLES)[0] if e.image_digests][::2]
    pixels = cat_pixels([e.pixels for e in encoded])
    grid = torch.cat([e.image_grid_thw for e in encoded])
    calls: list = []
    handle = _capture(model.backbone.visual, calls)
    try:
        precomputed = model.image_features(pixels, grid)
    finally:
        handle.remove()
    (args, kwargs), = calls
    grid_seen = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
    assert grid_seen.device.type == "cpu"
    assert {"position_ids", "cu_seqlens", "window_index", "cu_window_seqlens", "max_seqlen"} <= set(kwargs)
    # transformers' own path: the tower computes its indices from the grid itself
    own = model.backbone.get_image_features(pixel_values(pixels), grid).pooler_output
    assert len(precomputed) == len(own) == 2
    for a, b in zip(precomputed, own):
        assert torch.equal(a, b)


def test_unpadded_batches_pass_no_attention_mask_and_padded_ones_keep_it(model):
    encoded = [e for e in model.encode_many(SAMPLES)[0]]
    calls: list = []
    handle = _capture(model.backbone.language_model, calls)
    try:
        alone = model.forward(collate([encoded[3]], model.pad_token_id))
        padded = model.forward(collate([encoded[3], encoded[2]], model.pad_token_id))
    finally:
        handle.remove()
    assert calls[0][1]["attention_mask"] is None
    assert calls[1][1]["attention_mask"] is not None
    assert abs(float(alone[0]) - float(padded[0])) < 1e-5


def test_engine_scores_equal_the_model_alone(model):
    reference = model.score(SAMPLES, batch_size=1)
    with RewardEngine(model, metrics=None) as engine:
        got = engine.score(SAMPLES)
    assert max(abs(a - b) for a, b in zip(got, reference)) < 1e-5


VERL_PYTHON = ROOT / ".venv-verl" / "bin" / "python"

OLD_PATH = """
import sys, tempfile
from pathlib import Path
import numpy as np
from PIL import Image
import transformers
from rewardplug import RewardEngine, RewardModel
from rewardplug.model import precomputed_vision_supported
from rewardplug.testing import make_tiny_checkpoint
assert not precomputed_vision_supported(), transformers.__version__
path = make_tiny_checkpoint(Path(tempfile.mkdtemp()) / "tiny", seed=0)
rm = RewardModel.from_pretrained(path, dtype="float32", device="cpu", image_roots=None)
calls = []
rm.backbone.visual.register_forward_pre_hook(lambda m, a, k: calls.append(k), with_kwargs=True)
picture = Image.fromarray(np.random.default_rng(1).integers(0, 255, (56, 84, 3), dtype=np.uint8))
samples = [{"prompt": "What is here?", "completion": c, "images": [picture]} for c in ("Noise.", "Coloured noise.")]
reference = rm.score(samples, batch_size=1)
with RewardEngine(rm, metrics=None) as engine:
    got = engine.score(samples)
assert calls and all("window_index" not in k for k in calls), calls
print(transformers.__version__, max(abs(a - b) for a, b in zip(got, reference)))
"""


@pytest.mark.skipif(not VERL_PYTHON.exists(), reason="transformers 5.10 lives in .venv-verl (built by .ci/run)")
def test_transformers_5_10_takes_the_old_vision_path_with_the_same_scores():
    out = subprocess.run([str(VERL_PYTHON), "-c", OLD_PATH], capture_output=True, text=True, timeout=600,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    version, diff = out.stdout.split()[-2:]
    assert version.startswith("5.10") and float(diff) < 1e-5
