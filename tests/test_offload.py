"""rewardplug.offload: the weights-to-host and back helpers, usable without Ray or Serve."""

from __future__ import annotations

import subprocess
import sys

from rewardplug.offload import move_home, move_to_host

SAMPLES = [{"prompt": "Hi there", "completion": "Hello!"}, {"prompt": "Count", "completion": "one two three"}]


def test_offload_imports_neither_ray_nor_serve():
    code = "import sys, rewardplug.offload; print(sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'fastapi')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_move_to_host_records_every_tensor_with_its_device(model):
    tensors = [t for m in (model.backbone, model.value_head) for t in (*m.parameters(), *m.buffers())]
    homes = move_to_host(model)
    try:
        assert [id(t) for t, _ in homes] == [id(t) for t in tensors]
        assert all(device == t.device for (t, device) in homes)
        assert all(t.device.type == "cpu" for t in tensors)
    finally:
        move_home(homes)


def test_scores_are_unchanged_after_a_round_trip(model):
    before = model.score(SAMPLES)
    move_home(move_to_host(model))
    assert model.score(SAMPLES) == before
