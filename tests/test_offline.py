"""Offline uses: preference evaluation (VL-RewardBench protocol) and preference pairs for DPO/MPO.

Reference scores are computed independently with ``RewardModel.score`` (one sample at a time) on the
rows as written by the testing helpers; the offline code scores through a RewardEngine.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rewardplug import RewardEngine
from rewardplug.offline.cli import main as offline_main
from rewardplug.offline.data import PreferenceColumns, vlrewardbench_category
from rewardplug.offline.evaluation import evaluate
from rewardplug.offline.pairs import PairRule, make_pairs, meta_path, select_pairs
from rewardplug.testing import make_completion_set, make_preference_set

TOL = 1e-4


@pytest.fixture
def engine(model):
    with RewardEngine(model) as e:
        yield e


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def absolute(image, folder: Path):
    return str(folder / image) if isinstance(image, str) and not image.startswith("data:") else image


def reference_pairs(model, path: Path) -> list[dict]:
    """Each VL-RewardBench-layout row scored on its own: chosen = the answer ranked 0."""
    out = []
    for row in rows_of(path):
        chosen = row["response"][row["human_ranking"].index(0)]
        rejected = row["response"][row["human_ranking"].index(1)]
        image = absolute(row["image"], path.parent)
        c, r = (model.score([{"prompt": row["query"], "completion": a, "images": [image]}])[0] for a in (chosen, rejected))
        out.append({"id": row["id"], "chosen": c, "rejected": r, "tie": chosen == rejected,
                    "category": vlrewardbench_category(row)})  # fmt: skip
    return out


def expected_summary(ref: list[dict]) -> tuple[float, float, int]:
    right = [not p["tie"] and p["chosen"] > p["rejected"] for p in ref]
    cats: dict[str, list[bool]] = {}
    for p, ok in zip(ref, right):
        cats.setdefault(p["category"], []).append(ok)
    macro = sum(sum(v) / len(v) for v in cats.values()) / len(cats)
    return sum(right) / len(right), macro, sum(p["tie"] for p in ref)


# ---- eval ---------------------------------------------------------------------------------------


def test_eval_accuracy_and_macro_average_match_independent_scores(tmp_path, model, engine):
    data = make_preference_set(tmp_path / "data" / "bench.jsonl", n_pairs=14, ties=2, seed=3)
    ref = reference_pairs(model, data)
    # the data must not sit on a knife edge: every non-tie pair is decided by more than the tolerance
    assert all(p["tie"] or abs(p["chosen"] - p["rejected"]) > 10 * TOL for p in ref)
    accuracy, macro, ties = expected_summary(ref)
    assert 0 < accuracy < 1  # both right and wrong pairs occur, so a flipped comparison would show

    summary = evaluate(data, tmp_path / "out", scorer=engine, progress=False)
    assert summary.pairs == 14 and summary.ties == ties == 2 and summary.unscored == 0
    assert summary.accuracy == pytest.approx(accuracy)
    assert summary.macro_average == pytest.approx(macro)
    assert set(summary.categories) == {"General", "Hallucination", "Reasoning"}
    pairs = json.loads((tmp_path / "out" / "scores.json").read_text())["pairs"]
    for got, want in zip(pairs, ref):
        assert got["key"] == want["id"]
        assert got["chosen_score"] == pytest.approx(want["chosen"], abs=TOL)
        assert got["rejected_score"] == pytest.approx(want["rejected"], abs=TOL)
        assert got["correct"] == (not want["tie"] and want["chosen"] > want["rejected"])


def test_eval_counts_ties_as_wrong(tmp_path, engine):
    data = make_preference_set(tmp_path / "bench.jsonl", n_pairs=3, ties=3)  # every pair: the same answer twice
    summary = evaluate(data, tmp_path / "out", scorer=engine, progress=False, report=False)
    assert (summary.ties, summary.correct, summary.accuracy) == (3, 0, 0.0)


@pytest.mark.parametrize("fmt,images", [("parquet", "bytes"), ("dataset", "pil"), ("jsonl", "bytes")])
def test_eval_reads_every_storage_form_with_the_same_scores(tmp_path, engine, fmt, images):
    suffix = {"jsonl": ".jsonl", "parquet": ".parquet", "dataset": ""}[fmt]
    base = evaluate(make_preference_set(tmp_path / "a" / "d.jsonl", n_pairs=6), tmp_path / "oa", scorer=engine,
                    progress=False, report=False)  # fmt: skip
    other = evaluate(make_preference_set(tmp_path / "b" / f"d{suffix}", n_pairs=6, fmt=fmt, images=images),
                     tmp_path / "ob", scorer=engine, progress=False, report=False)  # fmt: skip
    a = rows_of(tmp_path / "oa" / "pairs.jsonl")
    b = rows_of(tmp_path / "ob" / "pairs.jsonl")
    assert [r["key"] for r in a] == [r["key"] for r in b]
    for x, y in zip(a, b):
        assert y["chosen_score"] == pytest.approx(x["chosen_score"], abs=TOL)
        assert y["rejected_score"] == pytest.approx(x["rejected_score"], abs=TOL)
    assert other.accuracy == base.accuracy


def test_eval_plain_pairs_layout_uses_the_category_column(tmp_path, model, engine):
    data = make_preference_set(tmp_path / "pairs.jsonl", n_pairs=9, layout="pairs", ties=0, seed=5)
    rows = rows_of(data)
    right: dict[str, list[bool]] = {}
    for row in rows:
        images = [absolute(im, tmp_path) for im in row["images"]]
        c, r = (model.score([{"prompt": row["prompt"], "completion": a, "images": images}])[0]
                for a in (row["chosen"], row["rejected"]))  # fmt: skip
        right.setdefault(row["category"], []).append(c > r)
    summary = evaluate(data, tmp_path / "out", scorer=engine, progress=False, report=False)
    assert set(summary.categories) == {"alpha", "beta", "gamma"}
    for name, oks in right.items():
        assert summary.categories[name].correct == sum(oks)
    assert summary.macro_average == pytest.approx(sum(sum(v) / len(v) for v in right.values()) / 3)


def test_eval_writes_report_charts_and_scores_json(tmp_path, engine):
    data = make_preference_set(tmp_path / "bench.jsonl", n_pairs=7)
    summary = evaluate(data, tmp_path / "out", scorer=engine, progress=False)
    out = tmp_path / "out"
    for name in ("accuracy_by_category.png", "score_margins.png", "score_vs_length.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    report = (out / "report.md").read_text()
    assert f"overall accuracy: {100 * summary.accuracy:.1f}%" in report
    assert f"macro average: {100 * summary.macro_average:.1f}%" in report
    assert "| Hallucination |" in report and "(accuracy_by_category.png)" in report
    saved = json.loads((out / "scores.json").read_text())
    assert len(saved["pairs"]) == 7 and saved["summary"]["correct"] == summary.correct


def test_eval_resumes_without_rescoring_finished_pairs(tmp_path, model):
    data = make_preference_set(tmp_path / "bench.jsonl", n_pairs=10, ties=0)
    written = []

    def stop_after_four(result):
        written.append(result.key)
        if len(written) == 4:
            raise KeyboardInterrupt("stopped after 4 pairs")

    with RewardEngine(model) as first, pytest.raises(KeyboardInterrupt):
        evaluate(data, tmp_path / "out", scorer=first, pairs_per_request=2, progress=False, on_pair=stop_after_four)
    assert len(rows_of(tmp_path / "out" / "pairs.jsonl")) == 4

    with RewardEngine(model) as second:
        resumed = evaluate(data, tmp_path / "out", scorer=second, pairs_per_request=2, progress=False, report=False)
        assert second.stats()["samples"] == 2 * 6  # only the 6 pairs not yet written were scored
    with RewardEngine(model) as third:
        whole = evaluate(data, tmp_path / "fresh", scorer=third, progress=False, report=False)
    assert resumed.pairs == 10 and resumed.correct == whole.correct
    keys = [r["key"] for r in rows_of(tmp_path / "out" / "pairs.jsonl")]
    assert sorted(keys) == sorted(set(keys)) and len(keys) == 10


def test_eval_unscorable_pair_counts_wrong_and_names_the_reason(tmp_path, engine):
    data = make_preference_set(tmp_path / "bench.jsonl", n_pairs=4, ties=0)
    rows = rows_of(data)
    rows[1]["image"] = "images/missing.png"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = evaluate(data, tmp_path / "out", scorer=engine, progress=False, report=False)
    assert summary.unscored == 1 and summary.pairs == 4
    bad = rows_of(tmp_path / "out" / "pairs.jsonl")[1]
    assert "missing.png" in bad["error"] and bad["chosen_score"] is None


def test_eval_refuses_to_resume_another_models_results(tmp_path, engine):
    data = make_preference_set(tmp_path / "bench.jsonl", n_pairs=2)
    evaluate(data, tmp_path / "out", scorer=engine, progress=False, report=False)
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    (tmp_path / "out" / "run.json").write_text(json.dumps({**run, "model": "someone-else"}))
    with pytest.raises(ValueError, match="another run"):
        evaluate(data, tmp_path / "out", scorer=engine, progress=False, report=False)


def test_vlrewardbench_layout_picks_chosen_by_human_ranking():
    cols = PreferenceColumns().resolve(["id", "query", "image", "response", "human_ranking", "query_source"])
    assert (cols.prompt, cols.responses, cols.ranking, cols.category) == ("query", "response", "human_ranking", "vlrewardbench")
    assert cols.answers({"response": ["a", "b"], "human_ranking": [1, 0]}) == ("b", "a")
    assert cols.answers({"response": ["a", "b"], "human_ranking": [0, 1]}) == ("a", "b")
    assert vlrewardbench_category({"query_source": "RLAIF-V"}) == "Hallucination"
    assert vlrewardbench_category({"id": "mathverse_12"}) == "Reasoning"
    assert vlrewardbench_category({"query_source": "WildVision"}) == "General"


def test_eval_command_prints_accuracy_and_writes_report(tmp_path, tiny_path, capsys):
    data = make_preference_set(tmp_path / "bench.jsonl", n_pairs=4)
    rc = offline_main(["eval", str(data), "--model", str(tiny_path), "--dtype", "float32", "--device", "cpu",
                       "--out", str(tmp_path / "out"), "--no-progress"])  # fmt: skip
    assert rc == 0
    summary = json.loads((tmp_path / "out" / "scores.json").read_text())["summary"]
    assert f"accuracy {100 * summary['accuracy']:.1f}%" in capsys.readouterr().out
    assert (tmp_path / "out" / "report.md").exists()


# ---- pairs --------------------------------------------------------------------------------------


def test_select_pairs_rules():
    scores = [0.5, 2.0, -1.0, 2.0, 0.4]
    assert select_pairs(scores, PairRule("best-worst")) == [(1, 2)]  # tie for best: the earlier one
    assert select_pairs(scores, PairRule("best-worst", min_margin=3.0)) == []
    all_pairs = select_pairs(scores, PairRule("all"))
    assert (1, 3) not in all_pairs and (3, 1) not in all_pairs  # equal scores never make a pair
    assert len(all_pairs) == 9 and all_pairs[0] in [(1, 2), (3, 2)]
    margins = [scores[a] - scores[b] for a, b in all_pairs]
    assert margins == sorted(margins, reverse=True) and min(margins) > 0
    capped = select_pairs(scores, PairRule("all", min_margin=0.2, max_pairs_per_prompt=3))
    assert len(capped) == 3 and all(scores[a] - scores[b] > 0.2 for a, b in capped)
    assert select_pairs([1.0], PairRule()) == []


def test_pairs_from_scored_file_best_vs_worst(tmp_path):
    src = make_completion_set(tmp_path / "in" / "c.jsonl", n_prompts=3, per_prompt=4, scores=True)
    meta = make_pairs(src, tmp_path / "pairs.jsonl", progress=False)
    rows = rows_of(src)
    out = rows_of(tmp_path / "pairs.jsonl")
    assert meta["pairs"] == len(out) == 3 and meta["rule"]["mode"] == "best-worst"
    for p, pair in enumerate(out):
        group = [r for r in rows if r["prompt"] == f"Question {p}: what is shown?"]
        best = max(group, key=lambda r: r["score"])
        worst = min(group, key=lambda r: r["score"])
        assert pair["chosen"] == [{"role": "assistant", "content": best["completion"]}]
        assert pair["rejected"] == [{"role": "assistant", "content": worst["completion"]}]
        assert pair["margin"] == pytest.approx(best["score"] - worst["score"])
        assert (tmp_path / pair["images"][0]).resolve() == (src.parent / best["images"][0]).resolve()
    assert json.loads(meta_path(tmp_path / "pairs.jsonl").read_text())["rewardplug_pairs"]["rule"] == meta["rule"]


def test_pairs_scored_on_the_fly_match_model_scores(tmp_path, model, engine):
    src = make_completion_set(tmp_path / "in" / "c.jsonl", n_prompts=2, per_prompt=4)
    meta = make_pairs(src, tmp_path / "pairs.jsonl", rule=PairRule("all", max_pairs_per_prompt=4), scorer=engine,
                      progress=False)  # fmt: skip
    ref = {}
    for row in rows_of(src):
        images = [absolute(im, src.parent) for im in row["images"]]
        ref[(row["prompt"], row["completion"])] = model.score([{**row, "images": images}])[0]
    out = rows_of(tmp_path / "pairs.jsonl")
    assert meta["scored_here"] == 8 and len(out) == meta["pairs"] > 0
    # prompt 0's last completion repeats its first: that equal-score pair is never made
    assert all(p["chosen"] != p["rejected"] for p in out)
    for pair in out:
        prompt = pair["prompt"][0]["content"]
        assert pair["chosen_score"] == pytest.approx(ref[(prompt, pair["chosen"][0]["content"])], abs=TOL)
        assert pair["rejected_score"] == pytest.approx(ref[(prompt, pair["rejected"][0]["content"])], abs=TOL)
        assert pair["chosen_score"] > pair["rejected_score"]
    assert sum(p["prompt"][0]["content"].startswith("Question 0") for p in out) <= 4


def test_pairs_round_trip_into_trl_dpo_format(tmp_path, model):
    import datasets
    from trl.data_utils import is_conversational
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    src = make_completion_set(tmp_path / "in" / "c.jsonl", n_prompts=3, per_prompt=3, scores=True)
    meta = make_pairs(src, tmp_path / "dpo", rule=PairRule("all", max_pairs_per_prompt=2), progress=False)
    ds = datasets.load_from_disk(str(tmp_path / "dpo"))
    assert {"prompt", "chosen", "rejected", "images"} <= set(ds.column_names) and len(ds) == meta["pairs"]
    assert json.loads(ds.info.description)["rewardplug_pairs"]["rule"]["max_pairs_per_prompt"] == 2
    example = ds[0]
    assert is_conversational(example) and example["images"][0].size == (64, 48)
    batch = DataCollatorForVisionPreference(model.processor)([dict(ds[0]), dict(ds[1])])
    assert batch["input_ids"].shape[0] == 4  # chosen and rejected of 2 examples
    assert batch["pixel_values"].shape[0] > 0 and batch["completion_mask"].sum() > 0
    image_pad = model.processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert (batch["input_ids"] == image_pad).any()


def test_pairs_command_writes_parquet_with_rule_metadata(tmp_path):
    import datasets

    src = make_completion_set(tmp_path / "in" / "c.jsonl", n_prompts=2, per_prompt=3, scores=True)
    out = tmp_path / "pairs.parquet"
    assert offline_main(["pairs", str(src), str(out), "--mode", "all", "--min-margin", "0.1", "--no-progress"]) == 0
    ds = datasets.load_dataset("parquet", data_files=str(out), split="train")
    meta = json.loads(meta_path(out).read_text())["rewardplug_pairs"]
    assert meta["rule"] == {"mode": "all", "min_margin": 0.1, "max_pairs_per_prompt": None}
    assert len(ds) == meta["pairs"] and all(m > 0.1 for m in ds["margin"])


def test_pairs_without_scores_or_model_is_refused(tmp_path):
    src = make_completion_set(tmp_path / "in" / "c.jsonl", n_prompts=1, per_prompt=2)
    with pytest.raises(ValueError, match="no 'score'"):
        make_pairs(src, tmp_path / "pairs.jsonl", progress=False)


def test_pairs_command_without_model_names_the_flags_not_python_arguments(tmp_path, capsys):
    src = make_completion_set(tmp_path / "in" / "c.jsonl", n_prompts=1, per_prompt=2)
    assert offline_main(["pairs", str(src), str(tmp_path / "pairs.jsonl"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "rewardplug pairs: error: 2 rows of" in err and "give --model" in err and "--pool NAME" in err, err
    assert "model=" not in err and "Traceback" not in err, err
    assert not (tmp_path / "pairs.jsonl").exists()


@pytest.mark.parametrize("where", ["beside the input", "another folder"])
def test_pairs_jsonl_keeps_relative_image_paths_relative_to_the_output_file(tmp_path, monkeypatch, where):
    """docs/offline.md: a relative image path stays relative in a .jsonl output, rewritten against the
    output's folder (rewardplug reads relative paths against the data file), whatever the current folder."""
    src = make_completion_set(tmp_path / "data" / "c.jsonl", n_prompts=2, per_prompt=2, scores=True)
    images = {row["completion"]: row["images"][0] for row in rows_of(src)}
    assert not any(Path(im).is_absolute() for im in images.values()), "the helper writes relative paths"
    out = (tmp_path / "data" if where == "beside the input" else tmp_path / "pairs" / "dpo") / "pairs.jsonl"
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert offline_main(["pairs", str(src), str(out), "--no-progress"]) == 0
    for pair in rows_of(out):
        written = pair["images"][0]
        assert not Path(written).is_absolute(), written
        assert (out.parent / written).resolve() == (src.parent / images[pair["chosen"][0]["content"]]).resolve()
        if where == "beside the input":
            assert written == images[pair["chosen"][0]["content"]]


def test_eval_command_exits_3_when_pairs_are_left_unscored(tmp_path, tiny_path, capsys):
    data = make_preference_set(tmp_path / "bench.jsonl", n_pairs=3, ties=0)
    rows = rows_of(data)
    rows[1]["image"] = "images/missing.png"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc = offline_main(["eval", str(data), "--model", str(tiny_path), "--dtype", "float32", "--device", "cpu",
                       "--out", str(tmp_path / "out"), "--no-progress"])  # fmt: skip
    assert rc == 3
    captured = capsys.readouterr()
    assert "unscored 1" in captured.out and "1 of 3 pairs could not be scored" in captured.err


def test_eval_command_into_another_models_folder_names_the_cli_flags(tmp_path, tiny_path, capsys):
    data = make_preference_set(tmp_path / "bench.jsonl", n_pairs=2)
    common = ["eval", str(data), "--dtype", "float32", "--device", "cpu", "--out", str(tmp_path / "out"), "--no-progress"]
    assert offline_main([*common, "--model", str(tiny_path)]) == 0
    capsys.readouterr()
    other = tmp_path / "other-model"
    other.symlink_to(tiny_path, target_is_directory=True)
    assert offline_main([*common, "--model", str(other)]) == 1
    err = capsys.readouterr().err
    assert f"rewardplug eval: error: --out {tmp_path / 'out'} holds results of another run" in err, err
    assert f"model was {str(tiny_path)!r}, now {str(other)!r}" in err and "give another --out" in err, err
    assert "--no-resume" in err and "resume=False" not in err and "Traceback" not in err, err
    assert offline_main([*common, "--model", str(other), "--no-resume"]) == 0


@pytest.mark.parametrize("command", ["eval", "pairs"])
def test_eval_and_pairs_with_the_tiny_model_print_the_random_weights_banner(tmp_path, command, capsys):
    data = (make_preference_set(tmp_path / "bench.jsonl", n_pairs=1) if command == "eval"
            else make_completion_set(tmp_path / "c.jsonl", n_prompts=1, per_prompt=2))  # fmt: skip
    out = ["--out", str(tmp_path / "out")] if command == "eval" else [str(tmp_path / "pairs.jsonl")]
    assert offline_main([command, str(data), *out, "--model", "tiny", "--device", "cpu", "--no-progress"]) == 0
    assert "model 'tiny': RANDOM WEIGHTS, the scores mean nothing" in capsys.readouterr().err


def test_package_exports_the_functions_not_their_modules():
    import rewardplug.offline as offline
    import rewardplug.offline.evaluation  # noqa: F401  (a loaded submodule must not shadow a function)

    assert callable(offline.evaluate) and callable(offline.make_pairs) and callable(offline.score_dataset)
    assert offline.evaluate is evaluate


def test_eval_reads_a_saved_dataset_dict_split(tmp_path, engine):
    import datasets

    make_preference_set(tmp_path / "flat", n_pairs=4, fmt="dataset", images="pil")
    datasets.DatasetDict({"test": datasets.load_from_disk(str(tmp_path / "flat"))}).save_to_disk(str(tmp_path / "dict"))
    flat = evaluate(tmp_path / "flat", tmp_path / "o1", scorer=engine, progress=False, report=False)
    split = evaluate(tmp_path / "dict", tmp_path / "o2", scorer=engine, progress=False, report=False)
    assert (split.pairs, split.correct, split.ties) == (flat.pairs, flat.correct, flat.ties)


def test_missing_preference_columns_are_named():
    with pytest.raises(ValueError, match="chosen\\+rejected or response\\+human_ranking"):
        PreferenceColumns().resolve(["prompt", "image", "answer"])
    with pytest.raises(ValueError, match="'good' is not in the data"):
        PreferenceColumns(chosen="good", rejected="rejected").resolve(["prompt", "rejected"])


def test_eval_example_script_runs_its_smoke_run_and_asks_for_a_model(tmp_path):
    """examples/eval_vl_rewardbench.py: --tiny runs on generated data with the banner; without a model
    or data it stops with a usage message instead of scoring a random model."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "examples" / "eval_vl_rewardbench.py"
    bare = subprocess.run([sys.executable, str(script), "--out", str(tmp_path / "o")], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert bare.returncode == 2 and "--model" in bare.stderr and not (tmp_path / "o").exists(), bare.stderr
    smoke = subprocess.run([sys.executable, str(script), "--tiny", "--out", str(tmp_path / "o")], capture_output=True,
                           text=True, timeout=600)  # fmt: skip
    assert smoke.returncode == 0, smoke.stderr[-2000:]
    assert "RANDOM WEIGHTS" in smoke.stdout and "(20 pairs," in smoke.stdout, smoke.stdout
    assert (tmp_path / "o" / "report.md").is_file()
