"""ZeRO-3 sharded scoring: 2 ranks on the CPU with the deepspeed launcher and gloo (real DeepSpeed)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")

WORKER = Path(__file__).parent / "workers" / "zero3_score.py"
sys.path.insert(0, str(WORKER.parent))

from zero3_score import samples_for  # noqa: E402


def launch(checkpoint: Path, out: Path, mode: str) -> list[dict]:
    launcher = shutil.which("deepspeed", path=os.path.dirname(sys.executable)) or shutil.which("deepspeed")
    cmd = [launcher, "--num_gpus", "2", "--no_local_rank", str(WORKER), str(checkpoint), str(out), mode]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_zero3_scores_equal_unsharded_and_each_rank_holds_half(tiny_path, model, tmp_path):
    ranks = launch(tiny_path, tmp_path, "score")
    for r, result in enumerate(ranks):
        expected = model.score(samples_for(r))
        assert result["scores"] == pytest.approx(expected, abs=1e-5), f"rank {r}"
        assert abs(result["local"] / result["total"] - 0.5) < 0.01, f"rank {r} holds {result['local']}/{result['total']}"
    assert ranks[0]["again"] == pytest.approx(model.score(samples_for(0)[:1]), abs=1e-5)
    assert ranks[1]["again"] == []  # took part with nothing to score


def test_a_rank_that_does_not_call_gives_a_clear_error_not_a_hang(tiny_path, tmp_path):
    ranks = launch(tiny_path, tmp_path, "misuse")
    error = ranks[0]["error"]
    assert error is not None and "not every rank called score()" in error and "Rank 1" in error


def test_trl_reward_function_on_zero3_reuses_the_trainers_config(tiny_path, model, tmp_path):
    """Each rank calls the TRL RewardFunction with its own rows, as GRPOTrainer does; the sharded model
    took its ZeRO-3 settings from the trainer's accelerate DeepSpeed plugin."""
    ranks = launch(tiny_path, tmp_path, "trl")
    for r, result in enumerate(ranks):
        assert result["scores"] == pytest.approx(model.score(samples_for(r)), abs=1e-5), f"rank {r}"
        assert abs(result["local"] / result["total"] - 0.5) < 0.01  # persistence threshold 0 came from the plugin
