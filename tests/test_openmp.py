"""Idle OpenMP workers freed (``rewardplug.engine.openmp``) and the engine's ``cpu_cores`` setting.

A thread that runs a parallel torch kernel gets a pool of ``torch.get_num_threads() - 1`` OpenMP worker
threads, kept until freed. The tests find a pool's workers as the OS threads (/proc/self/task) that
appear while its thread runs its first big kernel, and check whether those threads are still there:
threads other tests may start or stop meanwhile do not enter the count.
"""

from __future__ import annotations

import os
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from rewardplug import RewardEngine
from rewardplug.engine.encoders import EncoderPool, Job
from rewardplug.engine.openmp import free_idle_workers
from rewardplug.engine.pending import PendingRequest
from rewardplug.engine.stats import Stats

pytestmark = pytest.mark.skipif(
    not os.path.isdir("/proc/self/task") or torch.get_num_threads() < 2,
    reason="needs Linux and at least 2 torch threads (an OpenMP pool with workers)",
)
BIG = torch.randn(2000, 2000)  # far over ATen's grain size: its kernels run on the OpenMP pool


def os_threads() -> set[str]:
    return set(os.listdir("/proc/self/task"))


def big_kernel() -> set[str]:
    """Run a parallel kernel on this thread; the OS threads that appeared meanwhile (its new pool's
    workers; none if the thread holds a pool already)."""
    before = os_threads()
    (BIG * BIG).sum()
    return os_threads() - before


def in_thread(function):
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("result", function()))
    thread.start()
    thread.join()
    return out["result"]


def wait_until(condition, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def alive(workers: set[str]) -> set[str]:
    return workers & os_threads()


def test_free_idle_workers_ends_the_calling_threads_openmp_workers():
    def body():
        workers = big_kernel()
        freed = free_idle_workers()
        return workers, freed, alive(workers)

    workers, freed, left = in_thread(body)
    assert len(workers) >= 1  # the premise: this thread held a pool
    assert freed is True
    assert left == set()


def test_free_idle_workers_leaves_other_threads_pools_alone():
    holder_ready, release = threading.Event(), threading.Event()
    found = {}

    def holder():  # holds its pool until told to stop
        found["workers"] = big_kernel()
        holder_ready.set()
        release.wait(30)

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        assert holder_ready.wait(30)
        assert in_thread(free_idle_workers) is True  # another thread, with no pool of its own
        assert found["workers"] and alive(found["workers"]) == found["workers"]
    finally:
        release.set()
        thread.join()


def test_encoder_pool_calls_after_request_on_its_worker_after_each_request():
    calls = []
    done = threading.Event()

    def encode(samples):
        calls.append(("encode", threading.get_ident(), big_kernel()))
        return [], {}

    def after_request():
        calls.append(("after", threading.get_ident(), free_idle_workers()))
        if sum(c[0] == "after" for c in calls) == 2:
            done.set()

    model = SimpleNamespace(turn_start_token_id=None)
    pool = EncoderPool(model, 1, Stats(), lambda items: None, lambda: None, encode, after_request=after_request)
    try:
        for _ in range(2):
            pool.put(Job([{"prompt": "p", "completion": "c"}], PendingRequest(1, "raise")))
        assert done.wait(30)
    finally:
        pool.close()
    assert [c[0] for c in calls] == ["encode", "after", "encode", "after"]
    assert len({c[1] for c in calls}) == 1  # all on the one worker thread
    # Each request's encoding made a new pool: the one before it had been freed.
    assert calls[0][2] and calls[2][2] and not (calls[0][2] & calls[2][2])
    assert calls[1][2] is True and calls[3][2] is True


@pytest.mark.parametrize("cpu_cores", ["shared", "dedicated"])
def test_a_caller_waiting_in_score_keeps_its_workers_only_when_cores_are_shared(model, cpu_cores):
    samples = [{"prompt": "What is this?", "completion": f"An answer, take {k}."} for k in range(4)]
    expected = model.score(samples, batch_size=1)
    with RewardEngine(model, cpu_cores=cpu_cores, metrics=None) as engine:

        def caller():
            workers = big_kernel()
            scores = engine.score(samples)
            return workers, scores, alive(workers)

        workers, scores, left = in_thread(caller)
    assert scores == pytest.approx(expected, abs=1e-5)
    assert workers
    assert left == (workers if cpu_cores == "shared" else set())


@pytest.mark.parametrize("cpu_cores", ["shared", "dedicated"])
def test_encoder_threads_free_the_workers_their_encoding_made_only_when_cores_are_dedicated(
    model, monkeypatch, cpu_cores
):
    original = model.encode_many
    made: list[set[str]] = []

    def encode_many(samples, *args, **kwargs):  # the tiny model's encoding is too small for a pool
        made.append(big_kernel())
        return original(samples, *args, **kwargs)

    monkeypatch.setattr(model, "encode_many", encode_many)
    samples = [{"prompt": "What is this?", "completion": f"An answer, take {k}."} for k in range(4)]
    with RewardEngine(model, cpu_cores=cpu_cores, encode_workers=1, metrics=None) as engine:
        in_thread(lambda: engine.score(samples))
        workers = made[0]
        assert workers  # the premise: the encoder thread made a pool
        if cpu_cores == "dedicated":  # freed after delivering the request: maybe after the scores
            assert wait_until(lambda: not alive(workers))
        else:
            time.sleep(0.2)
            assert alive(workers) == workers


def test_cpu_cores_takes_shared_or_dedicated_only(model):
    with pytest.raises(ValueError, match="cpu_cores must be 'shared' or 'dedicated'"):
        RewardEngine(model, cpu_cores="all", metrics=None)
