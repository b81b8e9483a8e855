"""The command line: ``rewardplug demo`` and ``rewardplug score IN.jsonl OUT.jsonl``."""

from __future__ import annotations

import base64
import io
import json
import re

import pytest
from conftest import random_image

from rewardplug.cli import demo_images, main

BANNER_LINE = "RANDOM WEIGHTS, the scores mean nothing"


def table_rows(stdout: str) -> list[tuple[str, str, float]]:
    """(image, completion, score) rows of the demo's table."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:3] == ["image", "completion", "score"]) + 1
    rows = []
    for line in lines[start:]:
        if not line.strip():
            break
        rows.append((line[:16].strip(), line[17:63].strip(), float(line[64:])))
    return rows


def test_demo_with_a_model_folder(tiny_path, model, capsys):
    assert main(["demo", "--model", str(tiny_path), "--dtype", "float32", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert BANNER_LINE not in out, "the banner is only for the embedded tiny checkpoint"
    assert f"loaded {tiny_path}" in out and "M parameters" in out
    rows = table_rows(out)
    assert len(rows) == 12
    assert {r[0] for r in rows} == {"red circle", "blue square", "green triangle"}
    assert "scored 12 samples (3 prompts x 4 completions)" in out
    images = dict(demo_images())
    question = "What is in the picture?"
    samples = [{"prompt": question, "completion": text, "images": [images[name]]} for name, text, _ in rows]
    expected = model.score(samples)
    assert [r[2] for r in rows] == pytest.approx(expected, abs=1e-4)  # the table prints 4 decimals
    assert len({r[2] for r in rows}) > 1


def test_demo_group_size(tiny_path, capsys):
    assert main(["demo", "--model", str(tiny_path), "--group-size", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert len(table_rows(out)) == 6
    assert "scored 6 samples (3 prompts x 2 completions)" in out


def test_default_demo_builds_the_tiny_checkpoint_and_shows_the_banner(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("REWARDPLUG_CACHE", str(tmp_path / "cache"))
    assert main(["demo", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("=" * 78)
    assert "model 'tiny': " + BANNER_LINE in out
    assert "--model Skywork/Skywork-VL-Reward-7B" in out
    assert len(table_rows(out)) == 12
    built = list((tmp_path / "cache").iterdir())
    assert [p.name for p in built] == ["tiny-qwen2.5-vl-rm-seed0-v1"], built
    assert (built[0] / "value_head.safetensors").is_file()


# ---- score --------------------------------------------------------------------------------------


def data_uri(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def write_jsonl(path, lines: list) -> None:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def run_score(tiny_path, src, dst, *extra) -> int:
    options = ["--model", str(tiny_path), "--device", "cpu", "--dtype", "float32"]
    return main(["score", str(src), str(dst), *options, *extra])


def test_score_jsonl_with_bad_lines(tiny_path, model, tmp_path, capsys):
    image = random_image(100, 80, seed=21)
    image.save(tmp_path / "picture.png")
    good = [
        {"id": "text", "prompt": "Hi", "completion": "Hello."},
        {"id": "path", "prompt": "Describe.", "completion": "Noise.", "images": [str(tmp_path / "picture.png")]},
        {"prompt": "Describe.", "completion": "Noise.", "images": [data_uri(image)]},
        {"messages": [{"role": "user", "content": "Why?"}, {"role": "assistant", "content": "Because."}]},
    ]
    lines = [good[0], good[1], "{this is not json", good[2], "", {"id": 7, "prompt": "No answer"}, good[3]]
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(src, lines)

    assert run_score(tiny_path, src, dst) == 3
    rows = read_jsonl(dst)
    assert len(rows) == 6, "one row per sample line; the blank line is skipped"
    assert [r["index"] for r in rows] == list(range(6))
    assert [r.get("id") for r in rows] == ["text", "path", None, None, 7, None]

    bad = {2: r"line 3 is not valid JSON", 4: r"sample has no 'completion'"}
    for i, pattern in bad.items():
        assert rows[i]["score"] is None
        assert re.search(pattern, rows[i]["error"] or ""), rows[i]["error"]

    scored = [rows[i] for i in (0, 1, 3, 5)]
    assert all(r["error"] is None for r in scored)
    expected = model.score([good[0], {**good[1], "images": [image]}, good[2], good[3]])
    assert [r["score"] for r in scored] == pytest.approx(expected, abs=1e-5)
    assert "wrote 6 scores" in capsys.readouterr().err


def test_score_jsonl_all_good_returns_0(tiny_path, model, tmp_path):
    samples = [{"prompt": "Hi", "completion": c} for c in ("Hello.", "Go away.", "Hi there, how can I help?")]
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(src, samples)
    assert run_score(tiny_path, src, dst, "--chunk", "2", "--batch-size", "2") == 0
    rows = read_jsonl(dst)
    assert [r["error"] for r in rows] == [None] * 3
    assert [r["score"] for r in rows] == pytest.approx(model.score(samples), abs=1e-5)


def test_score_refuses_images_outside_the_allowed_roots(tiny_path, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "private").mkdir()
    random_image(60, 60).save(tmp_path / "private" / "x.png")
    src, dst = tmp_path / "data" / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(src, [{"prompt": "Describe.", "completion": "Noise.", "images": [str(tmp_path / "private" / "x.png")]}])
    assert run_score(tiny_path, src, dst) == 3
    assert "outside the allowed image roots" in read_jsonl(dst)[0]["error"]
    assert run_score(tiny_path, src, dst, "--image-root", str(tmp_path / "private")) == 0
    assert read_jsonl(dst)[0]["error"] is None


def test_score_relative_image_paths_resolve_against_the_input_file(tiny_path, model, tmp_path, monkeypatch):
    """A JSONL file with image paths relative to itself scores the same from any working directory.

    cmd_score allows the input file's folder as an image root, but relative paths are resolved against
    the current directory, so the same file scores differently (or fails) depending on where you run it.
    """
    (tmp_path / "data" / "img").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    image = random_image(100, 80, seed=21)
    image.save(tmp_path / "data" / "img" / "picture.png")
    src, dst = tmp_path / "data" / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(src, [{"prompt": "Describe.", "completion": "Noise.", "images": ["img/picture.png"]}])
    monkeypatch.chdir(tmp_path / "elsewhere")
    code = run_score(tiny_path, src, dst)
    row = read_jsonl(dst)[0]
    assert code == 0 and row["error"] is None, row
    expected = model.score([{"prompt": "Describe.", "completion": "Noise.", "images": [image]}])[0]
    assert row["score"] == pytest.approx(expected, abs=1e-5)


# ---- score: paths checked first, exit codes, summary, streaming -------------------------------------


@pytest.fixture
def no_model_load(monkeypatch):
    """Any attempt to load a model fails the test: the command must stop before loading."""
    from rewardplug.model import RewardModel

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded although the command should have stopped first")

    monkeypatch.setattr(RewardModel, "from_pretrained", refuse)


@pytest.mark.parametrize(
    "output, message",
    [
        ("missing-folder/out.jsonl", r"OUTPUT '.*missing-folder/out.jsonl': folder '.*missing-folder' does not exist"),
        ("", r"OUTPUT '.*' is a folder; give a file name"),
        ("in.jsonl", r"OUTPUT '.*in.jsonl' is the INPUT file"),
    ],
)
def test_score_checks_the_output_path_before_loading_the_model(tmp_path, capsys, no_model_load, output, message):
    src = tmp_path / "in.jsonl"
    write_jsonl(src, [{"prompt": "Hi", "completion": "Hello."}])
    assert main(["score", str(src), str(tmp_path / output), "--model", "tiny", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert re.search(r"rewardplug score: error: " + message, err), err
    assert "Traceback" not in err


def test_score_refuses_an_unwritable_output_folder_before_loading(tmp_path, capsys, no_model_load):
    import os

    if os.geteuid() == 0:
        pytest.skip("root can write to a read-only folder")
    src = tmp_path / "in.jsonl"
    write_jsonl(src, [{"prompt": "Hi", "completion": "Hello."}])
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert main(["score", str(src), str(locked / "out.jsonl"), "--model", "tiny"]) == 1
    finally:
        locked.chmod(0o700)
    assert "is not writable" in capsys.readouterr().err


def test_score_missing_input_is_an_io_error_before_loading(tmp_path, capsys, no_model_load):
    assert main(["score", str(tmp_path / "nope.jsonl"), str(tmp_path / "out.jsonl"), "--model", "tiny"]) == 1
    assert "INPUT" in capsys.readouterr().err and not (tmp_path / "out.jsonl").exists()


def test_score_unknown_model_is_an_io_error_without_traceback(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    write_jsonl(src, [{"prompt": "Hi", "completion": "Hello."}])
    assert main(["score", str(src), str(tmp_path / "out.jsonl"), "--model", str(tmp_path / "no-such-checkpoint")]) == 1
    err = capsys.readouterr().err
    assert "rewardplug score: error: --model " in err and "Traceback" not in err


def test_score_usage_error_exits_2(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["score", "only-one-path.jsonl"])
    assert stop.value.code == 2


def test_score_summary_table_counts_scores_and_errors_by_reason(tiny_path, model, tmp_path, capsys):
    samples = [{"prompt": "Hi", "completion": c} for c in ("Hello.", "Go away.", "Hi there, how can I help?")]
    lines = [samples[0], "{not json", samples[1], {"prompt": "no answer"}, "[1, 2", samples[2]]
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(src, lines)
    assert run_score(tiny_path, src, dst, "-q") == 3
    err = capsys.readouterr().err
    expected = model.score(samples)
    table = dict(re.findall(r"^(samples|scored|not scored|mean score|min score|max score)\s+(\S+)$", err, re.M))
    assert table["samples"] == "6" and table["scored"] == "3" and table["not scored"] == "3"
    assert float(table["mean score"]) == pytest.approx(sum(expected) / 3, rel=1e-3)
    assert float(table["min score"]) == pytest.approx(min(expected), rel=1e-3)
    assert float(table["max score"]) == pytest.approx(max(expected), rel=1e-3)
    assert re.search(r"^line N is not valid JSON\s+2$", err, re.M), err
    assert re.search(r"^sample has no 'completion'\s+1$", err, re.M), err


def test_score_goes_through_the_engine_and_shares_a_groups_image_and_prompt(tiny_path, model, tmp_path, capsys):
    image = random_image(112, 84, seed=5)
    image.save(tmp_path / "pic.png")
    group = [{"prompt": "What is it?", "completion": c, "images": ["pic.png"]} for c in ("Noise.", "A cat.", "Static.", "Dots.")]
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(src, group)
    assert run_score(tiny_path, src, dst, "-q") == 0
    err = capsys.readouterr().err
    assert re.search(r"^vision tower runs\s+1$", err, re.M), err
    assert re.search(r"^completions on a shared prompt\s+[1-9]", err, re.M), err
    expected = model.score([{**s, "images": [image]} for s in group])
    assert [r["score"] for r in read_jsonl(dst)] == pytest.approx(expected, abs=1e-4)


class CountingLines:
    """stdin stand-in that counts the lines the command has read so far."""

    def __init__(self, lines):
        self.lines, self.read = lines, 0

    def __iter__(self):
        for line in self.lines:
            self.read += 1
            yield line


class RecordingOut(io.StringIO):
    """stdout stand-in that records, for each row written, how many input lines had been read."""

    def __init__(self, source: CountingLines):
        super().__init__()
        self.source, self.read_at_row = source, []

    def write(self, text):
        self.read_at_row += [self.source.read] * text.count("\n")
        return super().write(text)


def test_score_streams_stdin_to_stdout_with_bounded_lookahead(tiny_path, model, monkeypatch, capsys):
    samples = [{"id": i, "prompt": "Count.", "completion": "x" * (1 + i % 7)} for i in range(40)]
    source = CountingLines([json.dumps(s) + "\n" for s in samples])
    out = RecordingOut(source)
    monkeypatch.setattr("sys.stdin", source)
    monkeypatch.setattr("sys.stdout", out)
    code = main(["score", "-", "-", "--model", str(tiny_path), "--device", "cpu", "--dtype", "float32",
                 "--chunk", "4", "--inflight", "2", "-q"])  # fmt: skip
    assert code == 0
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["id"] for r in rows] == list(range(40))
    assert [r["score"] for r in rows] == pytest.approx(model.score(samples), abs=1e-4)
    # Row k is written before line k + chunk x (inflight + 1) is read: the file is never read whole.
    lookahead = [read - k for k, read in enumerate(out.read_at_row)]
    assert max(lookahead) <= 4 * 3, lookahead
    assert out.read_at_row[0] < 40


def test_score_system_failure_exits_4_and_names_the_cause(tiny_path, tmp_path, broken_device, capsys):
    """A forward pass that fails (as a lost device would) is not a bad sample: exit 4, with the cause."""
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(src, [{"prompt": "Hi", "completion": "Hello."}, {"prompt": "Hi", "completion": "Bye."}])
    assert run_score(tiny_path, src, dst, "-q") == 4
    err = capsys.readouterr().err
    assert "scoring failed" in err and broken_device in err, err


def test_help_shows_defaults_formats_and_exit_codes(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["score", "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert "(default: 16384)" in out and "(default: 256)" in out
    assert '{"prompt": ..., "completion": ..., "images": [...]}' in out
    assert "exit codes:" in out and "  3    score, eval, pairs: some samples could not be scored" in out
    assert "  4    system failure" in out and "  143  terminated (SIGTERM)" in out


def test_building_the_parser_imports_no_heavy_library():
    """--help must stay fast: the CLI and every command module it wires import no torch/transformers/Ray.

    The package's __init__ (not the CLI's) imports torch today, so it is left out: the package is an
    empty namespace here, and only what building the parser imports is measured."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys, types\n"
        f"pkg = types.ModuleType('rewardplug'); pkg.__path__ = [{str(Path(__file__).parents[1] / 'rewardplug')!r}]\n"
        "sys.modules['rewardplug'] = pkg\n"
        "import rewardplug.cli as cli\n"
        "cli.build_parser().format_help()\n"
        "heavy = {m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'ray', 'accelerate', 'trl', "
        "'deepspeed', 'datasets', 'PIL', 'numpy'}\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_score_on_ray_refuses_a_file_as_output_folder_before_starting_anything(tmp_path, capsys, no_model_load):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(src, [{"prompt": "Hi", "completion": "Hello."}])
    dst.write_text("")
    assert main(["score", str(src), str(dst), "--ray", "--model", "tiny"]) == 1
    assert "with --ray OUTPUT is a folder of part files" in capsys.readouterr().err


def test_other_packages_commands_are_wired(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("demo", "score", "pool", "serve", "eval", "pairs", "bench"):
        assert re.search(rf"^\s+{command}\s", out, re.M), command
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    assert "--group-size" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["pool", "start", "--help"])
    assert "--gpus-per-replica" in capsys.readouterr().out


def test_a_rewardplug_error_in_any_command_is_a_message_and_exit_1(tmp_path, capsys):
    """Commands from other packages (here bench) get the same treatment: no traceback, exit 1."""
    assert main(["bench", "--model", str(tmp_path / "no-such-checkpoint"), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "rewardplug bench: error: " in err and "no-such-checkpoint" in err and "Traceback" not in err


def test_stats_table_shows_every_engine_counter(model):
    """``rewardplug.tables.stats_table`` (used by ``pool status``) hides nothing an engine reports."""
    from rewardplug import RewardEngine
    from rewardplug.tables import stats_table

    with RewardEngine(model) as engine:
        engine.score([{"prompt": "Hi", "completion": "Hello."}, {"prompt": "Hi", "completion": "Hey."}])
        stats = engine.stats()
    table = stats_table(stats)
    assert re.search(r"^traffic\s+samples\s+2$", table, re.M), table
    assert re.search(r"^batches\s+padding efficiency\s+\d+\.\d%$", table, re.M), table
    assert len(table.splitlines()) - 2 == len(stats), "one row per counter, under the header"
    extra = stats_table({**stats, "replica_restarts": 3})
    assert re.search(r"^other\s+replica_restarts\s+3$", extra, re.M), "unknown keys are shown, not dropped"


# ---- the command line says what it means (issue 22) ------------------------------------------------


@pytest.mark.parametrize("command", [["score", "in.jsonl", "out.jsonl"], ["eval", "data.jsonl"]])
def test_scoring_commands_require_a_model(command, capsys):
    """Only the demo defaults to the random-weight tiny checkpoint; score and eval must be told which model."""
    with pytest.raises(SystemExit) as stop:
        main(command)
    assert stop.value.code == 2
    assert "--model" in capsys.readouterr().err


def test_demo_alone_keeps_the_tiny_default():
    from rewardplug.cli import build_parser

    assert build_parser().parse_args(["demo"]).model == "tiny"


def test_score_with_a_random_weight_model_prints_the_banner_on_stderr(tmp_path, monkeypatch, capsys):
    """The banner goes to stderr, so ``score - -`` still writes nothing but JSON rows to stdout."""
    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps({"prompt": "Hi", "completion": "Hello."}) + "\n"))
    assert main(["score", "-", "-", "--model", "tiny", "--device", "cpu", "-q"]) == 0
    captured = capsys.readouterr()
    assert "model 'tiny': " + BANNER_LINE in captured.err
    assert [json.loads(line)["error"] for line in captured.out.splitlines()] == [None]


def test_score_with_a_real_checkpoint_folder_prints_no_banner(tiny_path, tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    write_jsonl(src, [{"prompt": "Hi", "completion": "Hello."}])
    assert run_score(tiny_path, src, tmp_path / "out.jsonl", "-q") == 0
    assert BANNER_LINE not in capsys.readouterr().err


def every_command() -> list[list[str]]:
    from rewardplug.cli import build_parser

    def walk(parser, prefix):
        subs = [a for a in parser._actions if isinstance(a, __import__("argparse")._SubParsersAction)]
        if not subs:
            return [prefix]
        return [c for name, sub in subs[0].choices.items() for c in walk(sub, [*prefix, name])]

    return walk(build_parser(), [])


@pytest.mark.parametrize("command", every_command(), ids=" ".join)
def test_help_prints_no_default_none(command, capsys):
    """A required option or one without a default shows no "(default: None)"."""
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    out = capsys.readouterr().out
    assert "default: None" not in out, out


def test_bench_help_shows_usage_not_the_module_docstring(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: rewardplug bench")
    assert "This module" not in out and "``" not in out, out


def test_demo_runs_random_7b_with_layers_and_layers_is_refused_for_other_models(capsys):
    """--layers cuts random-7b to a CPU-sized variant (1 layer here); any other model refuses it (exit 2)."""
    assert main(["demo", "--model", "random-7b", "--layers", "1", "--device", "cpu", "--dtype", "bfloat16"]) == 0
    out, err = capsys.readouterr()
    assert "RANDOM WEIGHTS" in out + err
    assert main(["demo", "--model", "tiny", "--layers", "2"]) == 2
    assert "--layers" in capsys.readouterr().err
