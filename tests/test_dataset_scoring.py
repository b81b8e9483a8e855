"""Scoring datasets over Ray Data: blocks fixed by the input, scores equal to in-process scoring,
resume without rescoring finished blocks. Ray tests start a local cluster: run them under
``flock /tmp/team/ray.lock``."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rewardplug.offline.cli import main as offline_main
from rewardplug.offline.dataset import plan_blocks, read_block, read_scores, score_dataset
from rewardplug.testing import make_completion_set, make_preference_set

TOL = 1e-4


def jsonl_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def with_absolute_images(rows, folder):
    return [{**r, "images": [str(folder / im) for im in r["images"]]} for r in rows]


def test_blocks_cover_every_row_once_for_jsonl_and_parquet(tmp_path):
    src = make_completion_set(tmp_path / "c.jsonl", n_prompts=3, per_prompt=3)
    with src.open("a") as f:
        f.write("\n")  # blank lines are not rows
    rows = jsonl_rows(src)
    blocks = plan_blocks([src], rows_per_block=4)
    assert [(b.start, b.stop) for b in blocks] == [(0, 4), (4, 8), (8, 9)]
    assert [r for b in blocks for r in read_block(b)[0]] == rows

    table = pa.Table.from_pylist(rows)
    pq.write_table(table, tmp_path / "c.parquet", row_group_size=2)  # blocks straddle row groups
    blocks = plan_blocks([tmp_path / "c.parquet"], rows_per_block=3)
    assert [r for b in blocks for r in read_block(b)[0]] == rows


def test_bad_jsonl_line_is_a_row_error_not_a_crash(tmp_path):
    src = tmp_path / "c.jsonl"
    src.write_text('{"prompt": "a", "completion": "b"}\n{not json\n')
    rows, errors = read_block(plan_blocks([src], 10)[0])
    assert rows[1] is None and "row 1 is not valid JSON" in errors[1]


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    # address="local": a cluster of this test's own, never another job's cluster on the machine
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_scores_equal_in_process_scores_and_resume_skips_finished_blocks(tmp_path, model, tiny_path, ray_cluster):
    src = make_completion_set(tmp_path / "in" / "c.jsonl", n_prompts=4, per_prompt=3)
    rows = with_absolute_images(jsonl_rows(src), src.parent)
    reference = [model.score([r])[0] for r in rows]
    out = tmp_path / "out"
    options = {"dtype": "float32", "device": "cpu"}

    first = score_dataset(src, out, model=str(tiny_path), rows_per_block=5, progress=False, model_options=options)
    assert (first.blocks, first.blocks_skipped, first.rows_scored, first.errors) == (3, 0, 12, 0)
    got = read_scores(out)
    assert [g["row"] for g in got] == list(range(12))
    for g, want in zip(got, reference):
        assert g["error"] is None and g["score"] == pytest.approx(want, abs=TOL)

    # a crash before the middle block finished: its part file never appeared (parts are renamed in whole)
    parts = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*")}
    assert sorted(parts) == ["part-00000-000000000000.parquet", "part-00000-000000000005.parquet",
                             "part-00000-000000000010.parquet"]  # fmt: skip
    (out / "part-00000-000000000005.parquet").unlink()
    again = score_dataset(src, out, model=str(tiny_path), rows_per_block=5, progress=False, model_options=options)
    assert (again.blocks_skipped, again.rows_scored) == (2, 5)  # only the lost block was scored
    for name in ("part-00000-000000000000.parquet", "part-00000-000000000010.parquet"):
        assert (out / name).stat().st_mtime_ns == parts[name]  # finished blocks untouched
    assert [g["score"] for g in read_scores(out)] == pytest.approx(reference, abs=TOL)

    with pytest.raises(ValueError, match="another run"):  # a different cut would overlap the parts
        score_dataset(src, out, model=str(tiny_path), rows_per_block=4, progress=False, model_options=options)


def documented_exit_code_for_unscorable_rows() -> int:
    """What docs/offline.md says ``score --ray`` exits with when a row cannot be scored."""
    page = (Path(__file__).resolve().parents[1] / "docs" / "offline.md").read_text()
    section = page[page.index("(`rewardplug score --ray`)") :]
    found = re.search(r"A row that cannot be scored.*?\(exit (?:code|status) (\d+)", section, re.S)
    assert found, "docs/offline.md no longer says what score --ray exits with for unscorable rows"
    return int(found.group(1))


def test_ray_score_command_on_parquet_writes_jsonl_parts_with_row_errors(tmp_path, model, tiny_path, ray_cluster):
    src = make_completion_set(tmp_path / "in" / "c.jsonl", n_prompts=2, per_prompt=3)
    rows = with_absolute_images(jsonl_rows(src), src.parent)
    for i, row in enumerate(rows):
        row["id"] = f"s{i}"
    rows[4]["images"] = [str(tmp_path / "in" / "images" / "missing.png")]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in" / "rows.parquet")
    reference = model.score(rows, on_invalid="none")

    rc = offline_main(["score", str(tmp_path / "in" / "rows.parquet"), str(tmp_path / "out"), "--ray",
                       "--model", str(tiny_path), "--dtype", "float32", "--device", "cpu", "--rows-per-block", "4",
                       "--format", "jsonl", "--keep-column", "completion", "--no-progress"])  # fmt: skip
    assert rc == 3 == documented_exit_code_for_unscorable_rows()  # as `rewardplug score` (docs/cli.md)
    got = read_scores(tmp_path / "out")
    assert sorted(os.listdir(tmp_path / "out"))[:2] == ["_SUCCESS.json", "_plan.json"]
    assert [g["id"] for g in got] == [r["id"] for r in rows]
    assert [g["completion"] for g in got] == [r["completion"] for r in rows]
    assert got[4]["score"] is None and "missing.png" in got[4]["error"]
    for g, want in zip(got, reference):
        if want is not None:
            assert g["score"] == pytest.approx(want, abs=TOL)


def test_eval_and_pairs_through_a_named_pool_equal_engine_scores(tmp_path, model, tiny_path, ray_cluster):
    from rewardplug import RewardEngine, RewardPool
    from rewardplug.offline import evaluate, make_pairs

    data = make_preference_set(tmp_path / "bench.jsonl", n_pairs=8, seed=3)
    src = make_completion_set(tmp_path / "in" / "c.jsonl", n_prompts=2, per_prompt=3)
    with RewardEngine(model) as engine:
        local = evaluate(data, tmp_path / "local", scorer=engine, progress=False, report=False)
        make_pairs(src, tmp_path / "local.jsonl", scorer=engine, progress=False)
    pool = RewardPool(str(tiny_path), name="offline-test", num_replicas=1, gpus_per_replica=0, cpus_per_replica=1,
                      dtype="float32", image_roots=None, ready_timeout_s=240)  # fmt: skip
    try:
        remote = evaluate(data, tmp_path / "pool", pool="offline-test", progress=False, report=False)
        make_pairs(src, tmp_path / "pool.jsonl", pool="offline-test", progress=False)
    finally:
        pool.shutdown()
    assert (remote.correct, remote.ties, remote.pairs) == (local.correct, local.ties, local.pairs)
    for a, b in zip(jsonl_rows(tmp_path / "local" / "pairs.jsonl"), jsonl_rows(tmp_path / "pool" / "pairs.jsonl")):
        assert b["chosen_score"] == pytest.approx(a["chosen_score"], abs=TOL)
        assert b["rejected_score"] == pytest.approx(a["rejected_score"], abs=TOL)
    local_pairs, pool_pairs = jsonl_rows(tmp_path / "local.jsonl"), jsonl_rows(tmp_path / "pool.jsonl")
    assert [p["chosen"] for p in pool_pairs] == [p["chosen"] for p in local_pairs]
    assert [p["margin"] for p in pool_pairs] == pytest.approx([p["margin"] for p in local_pairs], abs=TOL)


def test_ray_scoring_killed_midway_resumes_without_rescoring_finished_blocks(tmp_path, model, tiny_path, ray_cluster):
    import subprocess
    import sys
    import time

    import ray

    src = make_completion_set(tmp_path / "in" / "c.jsonl", n_prompts=10, per_prompt=4)
    out = tmp_path / "out"
    args = dict(model=str(tiny_path), rows_per_block=1, progress=False, model_options={"dtype": "float32", "device": "cpu"})
    driver = (f"import ray; ray.init(address={ray.get_runtime_context().gcs_address!r}, log_to_driver=False)\n"
              "from rewardplug.offline.dataset import score_dataset\n"
              f"score_dataset({str(src)!r}, {str(out)!r}, **{args!r})\n")  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", driver], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while not list(out.glob("part-*")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        proc.kill()  # the crash: the driver dies while its actor is scoring
        proc.wait()
    time.sleep(3)  # let Ray reap the dead job's actor
    finished = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*")}
    assert 0 < len(finished) < 40, f"{len(finished)} of 40 blocks finished before the kill"

    result = score_dataset(src, out, **args)
    assert result.blocks_skipped == len(finished) and result.rows_scored == 40 - len(finished)
    assert {name: (out / name).stat().st_mtime_ns for name in finished} == finished  # not rewritten
    rows = with_absolute_images(jsonl_rows(src), src.parent)
    got = read_scores(out)
    assert [g["row"] for g in got] == list(range(40))
    assert [g["score"] for g in got] == pytest.approx([model.score([r])[0] for r in rows], abs=TOL)
