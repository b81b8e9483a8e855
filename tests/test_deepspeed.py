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


def launch(checkpoint: Path, out: Path, mode: str, env: dict | None = None) -> list[dict]:
    launcher = shutil.which("deepspeed", path=os.path.dirname(sys.executable)) or shutil.which("deepspeed")
    cmd = [launcher, "--num_gpus", "2", "--no_local_rank", str(WORKER), str(checkpoint), str(out), mode]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.fixture(scope="module")
def score_run(tiny_path, tmp_path_factory):
    """One 2-rank launch; the tests below check different parts of what each rank reported."""
    return launch(tiny_path, tmp_path_factory.mktemp("zero3-score"), "score")


def test_zero3_scores_equal_unsharded_and_each_rank_holds_half(score_run, model):
    for r, result in enumerate(score_run):
        expected = model.score(samples_for(r))
        assert result["scores"] == pytest.approx(expected, abs=1e-5), f"rank {r}"
        assert abs(result["local"] / result["total"] - 0.5) < 0.01, f"rank {r} holds {result['local']}/{result['total']}"
    assert score_run[0]["again"] == pytest.approx(model.score(samples_for(0)[:1]), abs=1e-5)
    assert score_run[1]["again"] == []  # took part with nothing to score


def test_zero3_language_model_runs_the_same_attention_as_unsharded(score_run, model):
    assert [r["attention"] for r in score_run] == [model.backbone.language_model.config._attn_implementation] * 2
    assert score_run[0]["attention"] == "sdpa_grouped_kv"


def test_zero3_bad_sample_gets_on_invalid_fallback_none_or_error_and_the_rest_is_scored(score_run, model):
    for r, result in enumerate(score_run):
        good = model.score(samples_for(r)[:1])[0]
        assert result["fallback"] == pytest.approx([-7.5, good], abs=1e-5)
        assert result["none"] == [None]
        raised = result["raised"]
        assert raised["type"] == "InvalidSampleError" and "image 0" in raised["errors"]["0"]
        assert raised["scores"][0] is None and raised["scores"][1] == pytest.approx(good, abs=1e-5)


def test_zero3_broken_device_raises_scoring_error_never_none_also_through_trl(score_run):
    for r, result in enumerate(score_run):
        for call in ("broken_score", "broken_trl"):  # rm.score(on_invalid="none") and TRL's RewardFunction
            outcome = result[call]
            assert outcome.get("type") == "ScoringError", f"rank {r} {call}: {outcome}"
            assert "illegal memory access" in outcome["cause"] and f"rank {r}" in outcome["message"]


def test_zero3_on_an_accelerator_without_fp16_keeps_fp32_and_scores(tiny_path, model, tmp_path):
    """DeepSpeed's zero.Init drops an explicit dtype=float32 for bf16 when the accelerator reports no fp16
    support (AMD EPYC CPUs: avx512_bf16, no avx512_fp16); the head then failed every forward with
    "mat1 and mat2 must have the same dtype". The worker makes the accelerator report no fp16 support."""
    ranks = launch(tiny_path, tmp_path, "no-fp16")
    for r, result in enumerate(ranks):
        assert result["dtypes"] == ["torch.float32"] and result["head_dtypes"] == ["torch.float32"], f"rank {r}"
        assert result["scores"] == pytest.approx(model.score(samples_for(r)), abs=1e-5), f"rank {r}"


def test_a_rank_that_does_not_call_gives_a_clear_error_not_a_hang(tiny_path, tmp_path):
    ranks = launch(tiny_path, tmp_path, "misuse")
    error = ranks[0]["error"]
    assert error is not None and "not every rank called score()" in error and "Rank 1" in error
    assert ranks[0]["is_scoring_error"]  # a system failure, not a bad sample


def test_trl_reward_function_on_zero3_reuses_the_trainers_config(tiny_path, model, tmp_path):
    """Each rank calls the TRL RewardFunction with its own rows, as GRPOTrainer does; the sharded model
    took its ZeRO-3 settings from the trainer's accelerate DeepSpeed plugin."""
    ranks = launch(tiny_path, tmp_path, "trl")
    for r, result in enumerate(ranks):
        assert result["scores"] == pytest.approx(model.score(samples_for(r)), abs=1e-5), f"rank {r}"
        assert abs(result["local"] / result["total"] - 0.5) < 0.01  # persistence threshold 0 came from the plugin


def test_no_rank_holds_the_whole_model_while_loading(tmp_path):
    """A checkpoint whose weights dominate memory (about 250 MB fp32): on each rank the peak resident
    memory of building and loading the sharded model, over the RSS before it, stays well under one full
    copy of the parameters (a full load on each rank, then partitioning, needs at least one copy).
    glibc's mmap threshold is fixed so freed temporaries are not counted as held (see
    benchmarks/zero3_memory.py)."""
    from rewardplug.testing import make_tiny_checkpoint, tiny_config

    config = tiny_config(
        hidden_size=768, intermediate_size=2112, num_hidden_layers=8, max_window_layers=8, num_attention_heads=12,
        num_key_value_heads=4, rope_scaling={"mrope_section": [8, 12, 12], "rope_type": "default", "type": "default"},
        vision_config=dict(depth=4, hidden_size=512, intermediate_size=1408, num_heads=8, out_hidden_size=768,
                           fullatt_block_indexes=[3]),
    )  # fmt: skip
    checkpoint = make_tiny_checkpoint(tmp_path / "checkpoint", config=config, seed=0)
    out = tmp_path / "out"
    out.mkdir()
    ranks = launch(checkpoint, out, "memory", env={"MALLOC_MMAP_THRESHOLD_": "131072"})
    for r, result in enumerate(ranks):
        full_bytes = 4 * result["total"]
        assert full_bytes > 200 * 2**20
        assert result["local_bytes"] == pytest.approx(full_bytes / 2, rel=0.01)
        growth = result["peak_rss_after_load"] - result["rss_before"]
        assert growth < 0.8 * full_bytes, f"rank {r}: loading grew RSS by {growth / 2**20:.0f} MiB, model {full_bytes / 2**20:.0f} MiB"
