"""The exit-code table of docs/cli.md, read from the page, and each code it lists driven through the real
command: a row added to the table without a way to produce it here fails, and so does a code the
command no longer returns. ``rewardplug --help`` prints the same table (``rewardplug.cli.EXIT_CODES``).

Codes only ``pool`` and ``serve`` produce (5, 6) run the command against a Ray cluster this test starts
(``address="local"``: never another job's cluster); 130 and 143 send SIGINT / SIGTERM to a running
``rewardplug score`` process.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from rewardplug.cli import EXIT_CODES, main

ROOT = Path(__file__).resolve().parents[1]


def table_codes() -> dict[int, str]:
    """code -> meaning, from the table under "## Exit codes" in docs/cli.md."""
    page = (ROOT / "docs" / "cli.md").read_text()
    section = page[page.index("## Exit codes") :]
    rows = re.findall(r"^\|\s*(\d+)\s*\|\s*(.+?)\s*\|\s*$", section, re.M)
    assert rows, "no exit-code table found in docs/cli.md"
    return {int(code): meaning for code, meaning in rows}


def rewardplug(*args: str, **kwargs) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "rewardplug"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "rewardplug.cli"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([*cmd, *args], env=env, capture_output=True, text=True, **kwargs)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def model_flags(tiny_path) -> list[str]:
    return ["--model", str(tiny_path), "--device", "cpu", "--dtype", "float32"]


# ---- one driver per code -----------------------------------------------------------------------------


def code_0(tmp_path, tiny_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "Hi", "completion": "Hello."}])
    return main(["score", str(src), str(tmp_path / "out.jsonl"), *model_flags(tiny_path), "-q"])


def code_1(tmp_path, tiny_path, capsys):
    code = main(["score", str(tmp_path / "missing.jsonl"), str(tmp_path / "out.jsonl"), *model_flags(tiny_path)])
    assert "INPUT" in capsys.readouterr().err
    return code


def code_2(tmp_path, tiny_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "Hi", "completion": "Hello."}])
    done = rewardplug("score", str(src), str(tmp_path / "out.jsonl"), timeout=120)  # no --model
    assert "--model" in done.stderr, done.stderr
    return done.returncode


def code_3(tmp_path, tiny_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "Hi", "completion": "Hello."}, {"prompt": "No answer"}])
    return main(["score", str(src), str(tmp_path / "out.jsonl"), *model_flags(tiny_path), "-q"])


def code_4(tmp_path, tiny_path, capsys, device_error):
    """A forward pass that fails as a lost device would (conftest's broken_device): a system failure."""
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "Hi", "completion": "Hello."}])
    code = main(["score", str(src), str(tmp_path / "out.jsonl"), *model_flags(tiny_path), "-q"])
    assert device_error in capsys.readouterr().err
    return code


@pytest.fixture(scope="module")
def cluster_address():
    """A Ray cluster of this test's own (no GPUs), for the pool commands' codes."""
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, namespace="rewardplug-exit-codes")
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def code_5(tmp_path, tiny_path, capsys, cluster_address):
    done = rewardplug("pool", "status", "no-such-pool", "--address", cluster_address, timeout=300)
    assert "no-such-pool" in done.stdout + done.stderr, done.stderr[-2000:]
    return done.returncode


def code_6(tmp_path, tiny_path, capsys, cluster_address):
    """Two GPUs per replica on a cluster without GPUs cannot be placed: exit 6 with a hint, not a hang."""
    try:
        done = rewardplug("pool", "start", "--name", "unplaceable", "--model", str(tiny_path), "--replicas", "1",
                          "--gpus-per-replica", "2", "--address", cluster_address, timeout=240)  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail("pool start waited 240 s for GPUs the cluster does not have")
    assert "--gpus-per-replica" in done.stderr, done.stderr[-2000:]
    assert "gpus_per_replica=" not in done.stderr, done.stderr[-2000:]
    return done.returncode


def running_score(tmp_path, tiny_path) -> tuple[subprocess.Popen, Path]:
    """``rewardplug score - OUT`` that has written its first rows and waits for more input on stdin."""
    exe = Path(sys.executable).parent / "rewardplug"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "rewardplug.cli"]
    out = tmp_path / "out.jsonl"
    proc = subprocess.Popen(
        [*cmd, "score", "-", str(out), *model_flags(tiny_path), "--chunk", "1", "--inflight", "1", "-q"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as in a terminal, even under a runner that ignores it
    )  # fmt: skip
    for k in range(3):
        proc.stdin.write(json.dumps({"prompt": "Hi", "completion": f"Hello {k}."}) + "\n")
    proc.stdin.flush()
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.read_text().count("\n") >= 1:
            return proc, out
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"score never wrote a row: {proc.communicate()[1][-2000:]}")


def stopped_by(sig, tmp_path, tiny_path) -> int:
    proc, out = running_score(tmp_path, tiny_path)
    proc.send_signal(sig)
    timer = threading.Timer(120, proc.kill)
    timer.start()
    try:
        _, err = proc.communicate()
    finally:
        timer.cancel()
    rows = [json.loads(line) for line in out.read_text().splitlines()]  # whole rows: the file was closed
    assert rows and all(r["error"] is None for r in rows), rows
    assert ("interrupted" if sig == signal.SIGINT else "terminated") in err, err[-2000:]
    return proc.returncode


def code_130(tmp_path, tiny_path, capsys):
    return stopped_by(signal.SIGINT, tmp_path, tiny_path)


def code_143(tmp_path, tiny_path, capsys):
    return stopped_by(signal.SIGTERM, tmp_path, tiny_path)


DRIVERS = {0: code_0, 1: code_1, 2: code_2, 3: code_3, 4: code_4, 5: code_5, 6: code_6, 130: code_130, 143: code_143}
POOL_CODES = {5, 6}


def test_the_page_and_the_help_list_the_same_codes_and_each_has_a_driver():
    page = table_codes()
    helped = {int(c) for c in re.findall(r"^  (\d+)\s", EXIT_CODES, re.M)}
    assert set(page) == helped, (sorted(page), sorted(helped))
    assert set(page) == set(DRIVERS), "a code in docs/cli.md without a driver here, or a driver for a code not listed"
    assert "SIGTERM" in page[143] and "placed" in page[6]


@pytest.mark.parametrize("code", sorted(table_codes()))
def test_each_listed_exit_code_is_what_the_command_returns(code, request, tmp_path, tiny_path, capsys):
    driver = DRIVERS[code]
    kwargs = {"device_error": request.getfixturevalue("broken_device")} if code == 4 else {}
    if code in POOL_CODES:
        kwargs["cluster_address"] = request.getfixturevalue("cluster_address")
    assert driver(tmp_path, tiny_path, capsys, **kwargs) == code
