"""``rewardplug bench`` through its run() with tiny sizes: the JSON's fields, the chart, exact scores; and the
7B-shaped random model (``--model random-7b --layers 2``) through the same command."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

import rewardplug.bench as bench
from rewardplug.workload import make_workload


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="rewardplug")
    bench.add_command(parser.add_subparsers())
    return parser.parse_args(["bench", *argv])


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    args = parse("--groups", "2", "--group-size", "3", "--image-size", "84", "--answer-tokens", "4-12",
                 "--card-samples", "2", "--device", "cpu", "--out", str(out))  # fmt: skip
    assert args.func is bench.run
    return bench.run(args), out


def test_bench_writes_the_json_it_returns_and_a_png(report):
    result, out = report
    assert json.loads((out / "bench.json").read_text()) == json.loads(json.dumps(result))
    png = (out / "bench.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_bench_json_has_every_method_and_figure(report):
    result, _ = report
    assert result["workload"] == {"groups": 2, "group_size": 3, "image_size": 84, "answer_tokens": [4, 12],
                                  "samples": 6, "card_samples": 2}  # fmt: skip
    assert result["device"] == "cpu" and result["dtype"] == "float32"
    assert result["peak_flops"] > 0 and "measured" in result["peak_source"]
    assert set(result["methods"]) == {"card", "naive", "engine"}  # no pool column without --replicas
    for name, m in result["methods"].items():
        assert m["samples"] == (2 if name == "card" else 6)
        for key in ("seconds", "samples_per_s", "tokens_per_s", "encode_ms_per_sample", "model_flops_per_s", "mfu"):
            assert m[key] > 0, (name, key)
        assert m["tokens_per_s"] > m["samples_per_s"] * 20  # a prompt with an image is tens of tokens
    assert set(result["ratios"]) == {"engine_vs_card", "engine_vs_naive", "naive_vs_card"}
    assert set(result["encode_ms_per_sample"]) == {"rewardplug_1_thread", "card_processor_1_by_1", "processor_per_group"}


def test_every_method_scores_within_1e5_of_the_model_alone(report):
    result, _ = report
    for name, m in result["methods"].items():
        assert m["max_abs_diff"] <= 1e-5, name


def test_useful_flops_count_shared_work_once(model):
    """Vision once per distinct image and the prompt once per group: G copies of a sample cost one image,
    one prompt and G answers, so each extra copy adds the same answer cost."""
    tok = model.processor.tokenizer
    one = make_workload(tok, 1, 1, 56, 5, 5, seed=1)
    im_start = tok.convert_tokens_to_ids("<|im_start|>")

    def flops(copies: int) -> float:
        return bench.useful_flops(model, model.encode_many(one * copies)[0], im_start)

    answer = flops(2) - flops(1)
    assert answer > 0
    assert flops(4) - flops(1) == pytest.approx(3 * answer)
    assert flops(1) > 2 * answer  # the shared image and prompt cost more than a 5-token answer


def test_workloads_with_different_seeds_have_different_images():
    from rewardplug.testing import cached_tiny_checkpoint
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cached_tiny_checkpoint())
    a = make_workload(tok, 2, 2, 56, 3, 6, seed=1)
    b = make_workload(tok, 2, 2, 56, 3, 6, seed=2)
    assert a[0]["images"][0].tobytes() != b[0]["images"][0].tobytes()
    assert a[0]["images"][0] is a[1]["images"][0]  # one picture per group
    assert all(3 <= len(tok.encode(s["completion"], add_special_tokens=False)) <= 6 for s in a + b)


def test_bench_module_imports_only_argparse():
    path = Path(bench.__file__)
    code = (f"import runpy, sys; runpy.run_path({str(path)!r}); "
            "heavy = [m for m in ('torch', 'transformers', 'ray', 'numpy', 'PIL') if m in sys.modules]; "
            "print(heavy); sys.exit(1 if heavy else 0)")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("text", ["5-3", "0-4", "x"])
def test_bad_answer_token_range_is_a_clear_error(text):
    with pytest.raises(SystemExit, match="answer-tokens"):
        bench._token_range(text)


def test_layers_need_random_7b():
    with pytest.raises(SystemExit, match="random-7b"):
        bench.run(parse("--layers", "2", "--device", "cpu"))


def test_bench_runs_random_7b_with_2_layers_exactly_and_says_its_scores_mean_nothing(tmp_path, capsys):
    """The 7B's widths (3584 hidden, 18944 MLP, 152,064-row embeddings, 1280-wide vision) with 2 of its 28
    layers, fp32 on the CPU: about 1.1B parameters, 4.4 GB (the card's way adds a 2.2 GB vocabulary head;
    peak RSS about 7.4 GB). Kept to 2 + 1 + 2 scored samples of 56 px images: about 2 CPU-minutes."""
    import psutil

    if psutil.virtual_memory().available < 9 * 2**30:
        pytest.skip("needs about 7.5 GB of free memory (a 2-layer 7B-wide model in fp32 with the card's head)")
    args = parse("--model", "random-7b", "--layers", "2", "--groups", "1", "--group-size", "2", "--image-size", "56",
                 "--answer-tokens", "4-8", "--card-samples", "1", "--device", "cpu", "--dtype", "float32",
                 "--out", str(tmp_path))  # fmt: skip
    result = bench.run(args)
    printed = capsys.readouterr().out
    assert printed.count("RANDOM WEIGHTS, the scores mean nothing") == 2  # before and after the table
    assert result["random_weights"] is True and result["model"] == "random-7b" and result["layers"] == 2
    assert 1.09e9 < result["parameters"] < 1.11e9  # 2 of the 7B's layers, 2 vision blocks, full embeddings
    assert set(result["methods"]) == {"card", "naive", "engine"}
    for name, m in result["methods"].items():
        assert m["samples_per_s"] > 0 and m["mfu"] > 0, name
        assert m["max_abs_diff"] <= 1e-5, name  # the same scores as the model alone, batch of one
    assert json.loads((tmp_path / "bench.json").read_text())["random_weights"] is True
