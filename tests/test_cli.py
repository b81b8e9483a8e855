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
    assert BANNER_LINE in out
    assert "rewardplug demo --model Skywork/Skywork-VL-Reward-7B" in out
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

    assert run_score(tiny_path, src, dst) == 2
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
    assert run_score(tiny_path, src, dst) == 2
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
