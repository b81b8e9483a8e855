"""benchmarks/gpu_check.py --smoke: the GPU check's whole code path on the CPU with tiny sizes, and what
it reports (exact scores, the JSON's fields, memory figures, batches and their gaps)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=1200, cwd=ROOT)  # fmt: skip
    return done, json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text()


def test_smoke_exits_0_with_no_section_failed(smoke):
    done, report, _ = smoke
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert report["errors"] == {}
    assert done.stdout.count("RANDOM WEIGHTS, the scores mean nothing") == 2


def test_smoke_json_has_every_section(smoke):
    _, report, _ = smoke
    assert report["schema"] == gpu_check.SCHEMA and report["mode"] == "smoke" and report["device"] == "cpu"
    for key in ("exactness", "memory", "throughput", "device_wait", "attention", "peak_flops", "seconds", "ray",
                "random_weights", "torch", "transformers"):  # fmt: skip
        assert key in report, key
    assert "mean nothing" in report["random_weights"]


def test_engine_scores_equal_the_model_alone_on_the_cpu_in_fp32(smoke):
    _, report, _ = smoke
    rows = {(r["model"], r["dtype"]): r for r in report["exactness"]}
    assert set(rows) == {("tiny", "float32"), ("tiny", "bfloat16")}
    fp32 = rows["tiny", "float32"]
    assert fp32["finite"] and fp32["ok"] and fp32["samples"] == 6
    assert fp32["engine_vs_cpu_fp32"] <= 1e-5 and fp32["engine_vs_alone"] <= 1e-5
    assert fp32["score_range"] > 1e-3  # the samples score differently, so equal scores mean something
    bf16 = rows["tiny", "bfloat16"]
    assert bf16["finite"] and 0 < bf16["engine_vs_cpu_fp32"] < 0.1  # bf16 rounding shows, within reason


def test_memory_figures_are_present(smoke):
    _, report, _ = smoke
    m = report["memory"]
    assert m["kind"] == "process_rss" and m["parameters_bytes"] > 0
    assert m["load_peak"] >= m["steady"] > 0
    assert [s["max_batch_tokens"] for s in m["scoring"]] == [256, 1024, 4096]
    assert all(s["peak"] >= m["steady"] * 0.9 and s["samples"] > 0 for s in m["scoring"])
    assert m["offload"]["freed"] == 0 and "CPU" in m["offload"]["note"]


def test_throughput_has_each_size_group_and_method_with_exact_scores(smoke):
    _, report, _ = smoke
    rows = report["throughput"]
    assert [(r["image_size"], r["group_size"]) for r in rows] == [(56, 2), (56, 3), (84, 2), (84, 3)]
    for r in rows:
        assert set(r["methods"]) == {"card", "naive", "engine"}
        for name, m in r["methods"].items():
            assert m["samples_per_s"] > 0 and m["mfu"] > 0, name
            assert m["max_abs_diff"] <= 1e-5, (r["image_size"], r["group_size"], name)
        assert r["engine_vs_card"] > 0 and r["engine_vs_naive"] > 0


def test_device_wait_reports_batches_busy_fraction_and_gaps(smoke):
    _, report, _ = smoke
    rows = report["device_wait"]
    assert [r["image_size"] for r in rows] == [56, 84]
    for r in rows:
        assert r["batches"] >= 2  # max_batch_tokens=256 splits the workload: there are gaps to measure
        assert 0 < r["busy_fraction"] <= 1
        assert r["gaps_between_batches"]["count"] == r["batches"] - 1
        assert r["gaps_between_batches"]["total_ms"] > 0  # on the CPU the host work between launches is a gap
        assert r["busy_fraction"] < 1
        assert r["device_ms_per_sample"] > 0 and r["host_encode_ms_per_sample"] > 0


def test_attention_comparison_says_why_it_was_skipped(smoke):
    _, report, _ = smoke
    if importlib.util.find_spec("flash_attn") is None:
        assert "flash_attn" in report["attention"]["skipped"]


def test_markdown_has_the_tables(smoke):
    _, _, md = smoke
    for header in ("| model | dtype |", "| max_batch_tokens |", "| image px | G | card s/s |", "| image px | G | batches |"):
        assert header in md


def test_gaps_before_batches_are_the_idle_time_before_their_first_activity():
    busy = gpu_check._union([(0, 4), (3, 10), (15, 20), (30, 40)])
    assert busy == [(0, 10), (15, 20), (30, 40)]
    # A batch launched at 12 starts at 15 (idle since 10); at 25 starts at 30 (idle since 20); one launched at 5
    # while the device is busy waits for nothing; one whose activity begins at its launch (the CPU) at 15.
    assert gpu_check._gaps_before(busy, [12, 25, 5, 15]) == [5, 10, 0.0, 5]
    stats = gpu_check._gap_stats([5000.0, 10000.0])
    assert stats == {"count": 2, "total_ms": 15.0, "max_ms": 10.0, "median_ms": 7.5}
