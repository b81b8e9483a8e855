"""A pool a trainer can stake a step on: a deadline on every request, no step lost to a hung replica,
handles and reports safe under threads, no HTTP proxy for a pool used from Python.

A real local Ray cluster (its own, ``address="local"``), real Serve replicas of the tiny checkpoint; a
hung device or host is a replica process stopped with SIGSTOP. Reference scores: ``RewardModel.score``
in this process (fp32).
"""

from __future__ import annotations

import inspect
import io
import os
import pickle
import signal
import textwrap
import threading
import time
from pathlib import Path

import numpy as np

import pytest
from conftest import random_image, text_of_length
from PIL import Image

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from rewardplug import PoolTimeoutError, RewardPool  # noqa: E402
from rewardplug.errors import ScoringError  # noqa: E402

TOL = 1e-5
OPTS = dict(dtype="float32", image_roots=None)
WAIT = 120
from rewardplug.serving.pool import _connect  # noqa: E402

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module", autouse=True)
def cluster():
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=6, namespace="rewardplug", log_to_driver=False, include_dashboard=False)
    _connect(None)  # Serve keeps a client of an earlier module's cluster in this process: drop it
    yield ray.get_runtime_context().gcs_address
    serve.shutdown()
    ray.shutdown()


def groups(prompts: int, size: int, seed: int, chars: int = 60) -> list[dict]:
    out = []
    for p in range(prompts):
        image = random_image(56, 48, seed=seed * 100 + p)
        out += [{"prompt": f"Q{seed}-{p}: what is it?", "images": [image],
                 "completion": f"{k}: " + text_of_length(chars, seed * 1000 + 10 * p + k)} for k in range(size)]  # fmt: skip
    return out


def assert_scores(got, expected, what=""):
    assert len(got) == len(expected), what
    for k, (g, e) in enumerate(zip(got, expected)):
        assert g is not None and abs(g - e) <= TOL, f"{what} sample {k}: pool {g} vs local model {e}"


def reports(pool, n: int, timeout: float = 30) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        got = pool.stats()["replicas"]
        if len(got) >= n:
            return sorted(got, key=lambda r: r["replica"])
        assert time.monotonic() < deadline, f"not {n} replicas answered: {got}"
        time.sleep(0.2)


COUNT_DIGESTS = textwrap.dedent('''
    # Loaded at interpreter start in the pool's replicas (PYTHONPATH): every image digest the encoder
    # computes adds a line to the file REWARDPLUG_TEST_DIGEST_LOG names.
    import os
    import rewardplug.encoding.request_images as _ri

    def _counted(image, data=None, _real=_ri.image_digest):
        with open(os.environ["REWARDPLUG_TEST_DIGEST_LOG"], "a") as log:
            log.write(f"{image.size}\\n")
        return _real(image, data)

    _ri.image_digest = _counted
''')


@pytest.fixture(scope="module")
def digest_log(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("replica-env")
    (folder / "sitecustomize.py").write_text(COUNT_DIGESTS)
    return folder / "digests.log"


@pytest.fixture(scope="module")
def pair(tiny_path, digest_log):
    """Two replicas on CPUs; hedge after 3 s, fail after 60 s; they count the image digests they compute."""
    env = {"env_vars": {"PYTHONPATH": str(digest_log.parent), "REWARDPLUG_TEST_DIGEST_LOG": str(digest_log)}}
    pool = RewardPool(tiny_path, name="pair", num_replicas=2, gpus_per_replica=0, hedge_after_s=3.0,
                      request_timeout_s=60, ready_timeout_s=300, runtime_env=env, **OPTS)  # fmt: skip
    yield pool
    pool.shutdown()


def digests_computed(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


def test_python_only_pool_starts_no_http_proxy(pair):
    assert serve.status().proxies == {}, "a pool used only from Python started Serve's HTTP proxy"


def test_scores_equal_local_model_on_every_route(pair, model):
    samples = groups(3, 4, seed=1) + [{"prompt": "Text only", "completion": f"alone {k}"} for k in range(3)]
    expected = model.score(samples)
    assert_scores(pair.score(samples), expected, "score")
    assert_scores(pair.submit(samples, request_timeout_s=30).result(WAIT), expected, "submit")
    for k, s in enumerate(samples[:3]):  # one sample per call (verl, OpenRLHF): routed by its own key
        assert_scores(pair.score([s]), [expected[k]], "singleton")


def test_a_send_that_raises_fails_the_request_at_once(pair, monkeypatch):
    """Regression: the Serve call used to sit outside the try that resolves the request: a failure
    there left the future unresolved forever."""

    class Broken:
        def options(self, **kw):
            raise RuntimeError("router gone")

    monkeypatch.setattr(pair, "_handle", Broken())
    t0 = time.monotonic()
    with pytest.raises(ScoringError, match="router gone"):
        pair.score(groups(1, 2, seed=2), request_timeout_s=30)
    assert time.monotonic() - t0 < 10


def test_unpickled_handle_used_by_8_threads_at_once_attaches_once(pair, model):
    """Another process unpickles the handle and 8 threads at a barrier make its first call, 5 times over
    (a handle half attached by one thread used to raise AttributeError in another)."""
    samples = [{"prompt": "Hi", "completion": f"there {k}"} for k in range(2)]

    @ray.remote(num_cpus=0)
    def first_use(blob, rounds: int, threads: int):
        out = []
        for _ in range(rounds):
            pool = pickle.loads(blob)
            barrier, results = threading.Barrier(threads), [None] * threads

            def call(t):
                barrier.wait()
                try:
                    results[t] = pool.score(samples)
                except BaseException as e:  # noqa: BLE001 - reported to the test
                    results[t] = f"{type(e).__name__}: {e}"

            workers = [threading.Thread(target=call, args=(t,)) for t in range(threads)]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            pool.close()  # the next round unpickles a fresh, unattached handle
            out.append(results)
        return out

    expected = model.score(samples)
    for r, results in enumerate(ray.get(first_use.remote(pickle.dumps(pair), 5, 8), timeout=600)):
        for t, got in enumerate(results):
            assert not isinstance(got, str), f"round {r} thread {t}: {got}"
            assert_scores(got, expected, f"round {r} thread {t}")


def test_replica_figures_are_read_on_the_replica_event_loop():
    """Serve runs a sync routing-stats or health method in a thread beside requests (a report read a
    dict that requests changed: "dictionary changed size during iteration"); async ones run on the
    replica's event loop, between requests' steps."""
    from rewardplug.serving.replica import RewardReplica

    for name in ("info", "identity", "check_health", "score_samples", "sleep", "wake"):
        assert inspect.iscoroutinefunction(getattr(RewardReplica, name)), name


def test_stopped_replica_costs_no_step_when_another_is_healthy(pair, model):
    """One of two replicas is stopped (a hung device) while it holds parts: they are sent again after
    the hedge delay (3 s), to the healthy replica, and every request is answered once with its
    fault-free scores, well before the deadline (60 s); new requests are answered too."""
    requests = [groups(4, 3, seed=10 + r, chars=1500) for r in range(3)]  # 12 groups, seconds of work each side
    expected = [model.score(r) for r in requests]
    resolved = [0] * len(requests)
    futures = [pair.submit(r) for r in requests]
    for k, f in enumerate(futures):
        f.add_done_callback(lambda _, k=k: resolved.__setitem__(k, resolved[k] + 1))
    deadline = time.monotonic() + 30
    while not (busy := [r for r in reports(pair, 2) if r["inflight_samples"]]):
        assert time.monotonic() < deadline and not all(f.done() for f in futures), "no replica ever held samples"
    victim = busy[0]
    os.kill(victim["pid"], signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        for k, f in enumerate(futures):
            assert_scores(f.result(timeout=WAIT), expected[k], f"request {k}")
        took = time.monotonic() - t0
        assert took < 30, f"requests took {took:.0f}s after a replica stopped (deadline 60 s, hedge 3 s)"
        assert pair.stats()["hedges"] >= 1
        later = groups(4, 2, seed=20)
        assert_scores(pair.score(later), model.score(later), "new requests after the stop")
    finally:
        os.kill(victim["pid"], signal.SIGCONT)
    time.sleep(1.0)
    assert resolved == [1] * len(requests), f"times each future resolved: {resolved}"


@pytest.fixture(scope="module")
def single(tiny_path):
    """One replica on a CPU; hedge after 2 s, fail after 8 s."""
    pool = RewardPool(tiny_path, num_replicas=1, gpus_per_replica=0, hedge_after_s=2.0, request_timeout_s=8,
                      ready_timeout_s=300, **OPTS)  # fmt: skip
    yield pool
    pool.shutdown()


def test_a_request_of_two_parts_after_many_single_parts_is_answered(single, model):
    """Regression: a router that left out replicas its cached queue lengths called full returned no
    choice, and Serve spun on it (or waited for its cache to expire): after 12 one-part requests, one
    part of a two-part request never reached the only replica."""
    for r in range(12):
        samples = [{"prompt": f"Q{r}", "completion": f"A{k}"} for k in range(2)]
        assert_scores(single.score(samples), model.score(samples), f"one-part request {r}")
    samples = groups(2, 2, seed=50)  # two prompt groups: two parts; a hang fails at the deadline (8 s)
    assert_scores(single.score(samples), model.score(samples), "two-part request")


def test_stopped_only_replica_fails_by_the_deadline_naming_it(single, model):
    (victim,) = reports(single, 1)
    os.kill(victim["pid"], signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        with pytest.raises(PoolTimeoutError) as info:
            single.score(groups(2, 2, seed=30))
        took = time.monotonic() - t0
        message = str(info.value)
        assert "request_timeout_s=8" in message and victim["replica"] in message and str(victim["pid"]) in message, message
        assert 8 <= took < 20, f"failed after {took:.1f}s, deadline 8 s"
    finally:
        os.kill(victim["pid"], signal.SIGCONT)
    samples = groups(1, 2, seed=31)  # the replica runs again: the pool serves on
    assert_scores(single.score(samples), model.score(samples), "after SIGCONT")


def test_offload_broadcasts_to_every_replica_and_onload_brings_them_back(pair, model):
    samples = groups(1, 3, seed=40)
    slept = pair.offload()
    assert sorted(r["replica"] for r in slept) == sorted(r["replica"] for r in reports(pair, 2))
    assert all(r["offloaded"] for r in reports(pair, 2))
    future = pair.submit(samples)
    time.sleep(1.0)
    assert not future.done(), "a request was scored while the replicas slept"
    woke = pair.onload()
    assert len(woke) == 2 and all(r["onload_s"] >= 0 for r in woke)
    assert_scores(future.result(timeout=WAIT), model.score(samples), "after onload")


def test_control_calls_answer_while_every_replica_is_full(pair, model):
    """Control calls never wait behind parts: both replicas asleep, each holding its bound of parts
    (max_ongoing_requests=8, which cannot finish while asleep) with more queued behind; stats() still
    answers within seconds, and onload() reaches the replicas (then every request is answered)."""
    requests = [groups(1, 2, seed=60 + r) for r in range(24)]  # one part each: 24 parts for 2 x 8 places
    pair.offload()
    futures = [pair.submit(r) for r in requests]
    try:
        time.sleep(3.0)  # the parts reach the replicas (and wait there)
        for _ in range(3):
            t0 = time.monotonic()
            replicas = pair.stats()["replicas"]
            took = time.monotonic() - t0
            assert len(replicas) == 2 and took < 5, f"stats took {took:.1f}s with the replicas full: {replicas}"
        assert not any(f.done() for f in futures), "a part was scored while the replicas slept"
    finally:
        pair.onload()
    for r, f in zip(requests, futures):
        assert_scores(f.result(timeout=WAIT), model.score(r), "after onload")


def last_row_twins(seed: int, side: int = 448) -> tuple[Image.Image, Image.Image]:
    """Two images equal but for the last pixel of the last row (448 px: no resize reaches it)."""
    a = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    b = a.copy()
    b[-1, -1] = 255 - b[-1, -1]
    return Image.fromarray(a), Image.fromarray(b)


def test_pil_images_are_digested_by_the_sender_only(pair, model, digest_log):
    """The pool's client digests each PIL image once (the key it sends with the image) and the replica's
    encoder takes that digest instead of hashing the pixels again. Images equal but for one pixel of
    the last row get their own scores; an image sent as PNG bytes is decoded and digested on the
    replica (the count works)."""
    a, b = last_row_twins(seed=31)
    twins = [{"prompt": "What is in the picture?", "completion": "Noise.", "images": [image]} for image in (a, b)]
    samples = twins + groups(2, 3, seed=70)
    expected = model.score(samples)
    assert abs(expected[0] - expected[1]) > 1e-4, "the twins' true scores are too close to tell sharing apart"
    before = digests_computed(digest_log)
    assert_scores(pair.score(samples), expected, "PIL images")
    assert digests_computed(digest_log) == before, "the replica hashed PIL images the client had digested"
    png = io.BytesIO()
    b.save(png, format="PNG")
    assert_scores(pair.score([{**twins[1], "images": [png.getvalue()]}]), [expected[1]], "PNG bytes")
    assert digests_computed(digest_log) == before + 1
