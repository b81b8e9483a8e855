"""``rewardplug serve`` and ``rewardplug pool``: addresses, ports, placement, signals, as a user runs them.

Real processes (``python -m rewardplug.cli``), a real Ray cluster of this test's own (never the default
address, never port 8000), real HTTP on loopback.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")
from rewardplug.serving.pool import _connect  # noqa: E402

pytestmark = pytest.mark.timeout(900)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dead_address() -> str:
    return f"127.0.0.1:{free_port()}"  # nothing listens there


def cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # only the address a test gives
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "rewardplug.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=full)  # fmt: skip


def test_serve_and_pool_start_require_a_model_and_show_no_empty_defaults():
    for command in (["serve"], ["pool", "start", "--name", "x"]):
        done = cli(*command, timeout=120)
        assert done.returncode == 2 and "--model" in done.stderr, done.stderr
        help_text = cli(*command[:2] if command[0] == "pool" else command, "--help", timeout=120).stdout
        assert "--model MODEL" in help_text and "(default: None)" not in help_text, help_text


@pytest.mark.parametrize("how", ["flag", "RAY_ADDRESS"])
def test_an_address_with_no_cluster_is_refused_and_no_cluster_is_started(how, tiny_path):
    address = dead_address()
    args, env = (["--address", address], {}) if how == "flag" else ([], {"RAY_ADDRESS": address})
    for command in (["pool", "start", "--name", "nowhere"], ["serve", "--port", str(free_port())]):
        t0 = time.monotonic()
        done = cli(*command, "--model", str(tiny_path), *args, env=env)
        assert done.returncode == 1, (done.returncode, done.stderr[-2000:])
        assert f"no Ray cluster answers at {address!r}" in done.stderr and "ray start --head" in done.stderr, done.stderr
        assert "starting one" not in done.stderr
        assert time.monotonic() - t0 < 120


@pytest.fixture(scope="module")
def cluster():
    """A cluster of this test's own, without GPUs, whose Serve proxy listens on a port of its own."""
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=4, namespace="rewardplug", log_to_driver=False, include_dashboard=False)
    _connect(None)  # Serve keeps a client of an earlier module's cluster in this process: drop it
    port = free_port()
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    yield ray.get_runtime_context().gcs_address, port
    serve.shutdown()
    ray.shutdown()


def test_serve_refuses_a_port_the_clusters_proxy_does_not_have(cluster, tiny_path):
    address, proxy_port = cluster
    asked = free_port()
    done = cli("serve", "--model", str(tiny_path), "--address", address, "--port", str(asked), "--gpus-per-replica", "0")
    assert done.returncode == 1, done.stderr[-2000:]
    assert f"asked for the HTTP door on 127.0.0.1:{asked}" in done.stderr, done.stderr
    assert f"http://127.0.0.1:{proxy_port}" in done.stderr, done.stderr
    assert "rewardplug is serving" not in done.stdout


def test_pool_that_cannot_be_placed_exits_6_with_the_flag_to_use(cluster, tiny_path):
    address, _ = cluster
    done = cli("pool", "start", "--name", "needs-gpus", "--model", str(tiny_path), "--address", address,
               "--gpus-per-replica", "1")  # fmt: skip
    assert done.returncode == 6, (done.returncode, done.stderr[-2000:])
    assert "--gpus-per-replica 0" in done.stderr and "gpus_per_replica=0" not in done.stderr, done.stderr


def test_pool_status_shows_the_last_minutes_rate(cluster, tiny_path, model):
    from rewardplug import RewardPool

    address, _ = cluster
    pool = RewardPool(tiny_path, name="status-rate", num_replicas=1, gpus_per_replica=0, dtype="float32", image_roots=None)
    try:
        samples = [{"prompt": "Hi", "completion": f"there {k}"} for k in range(12)]
        pool.score(samples)
        time.sleep(2.5)  # a report after the work
        done = cli("pool", "status", "status-rate", "--address", address, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "samples (last min)" in done.stdout and "samples/s (last min)" in done.stdout, done.stdout
        row = next(line for line in done.stdout.splitlines() if pool.stats()["replicas"][0]["replica"] in line)
        assert " 12 " in f" {row} ", row  # the 12 samples of this minute, not a lifetime average
    finally:
        pool.shutdown()


def test_serve_on_its_own_cluster_honours_the_port_and_stops_on_sigterm(tiny_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, "-m", "rewardplug.cli", "serve", "--model", "tiny", "--port", str(port),
                             "--dtype", "float32"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    try:
        line = proc.stdout.readline()  # the "serving on" line, once the pool is ready
        assert f"serving on http://127.0.0.1:{port}" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
        health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=30)
        assert health.status_code == 200 and health.json()["status"] == "ok", health.text
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
        stderr = proc.stderr.read()
        assert code == 143, (code, stderr[-3000:])
        assert "RANDOM WEIGHTS" in stderr  # 'tiny' is announced as random
        assert "terminated (SIGTERM)" in stderr and "Aborted" not in stderr and "*** " not in stderr, stderr[-3000:]
        with pytest.raises(httpx.TransportError):  # the door is gone with the pool
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
