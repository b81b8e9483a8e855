"""Idle OpenMP workers freed (``rewardplug.engine.openmp``) and the engine's ``cpu_cores`` setting.

OpenMP worker threads are counted as the process's OS threads (/proc/self/task): a thread that runs a
parallel torch kernel gets a pool of ``torch.get_num_threads() - 1`` workers, kept until freed.
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
WORKERS = torch.get_num_threads() - 1
BIG = torch.randn(2000, 2000)  # far over ATen's grain size: its kernels run on the OpenMP pool


def os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def in_thread(function):
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("result", function()))
    thread.start()
    thread.join()
    return out["result"]


def test_free_idle_workers_ends_the_calling_threads_openmp_workers():
    def body():
        before = os_threads()
        (BIG * BIG).sum()
        with_pool = os_threads()
        freed = free_idle_workers()
        return before, with_pool, freed, os_threads()

    before, with_pool, freed, after = in_thread(body)
    assert with_pool == before + WORKERS  # the premise: this thread now holds a pool
    assert freed is True
    assert after == before


def test_free_idle_workers_leaves_other_threads_pools_alone():
    (BIG * BIG).sum()  # this thread's pool
    with_pool = os_threads()
    assert in_thread(free_idle_workers) is True  # another thread, with no pool of its own
    assert os_threads() == with_pool


def test_encoder_pool_calls_after_request_on_its_worker_after_each_request():
    calls = []
    done = threading.Event()

    def encode(samples):
        (BIG * BIG).sum()  # the encoder thread now holds a pool
        calls.append(("encode", threading.get_ident(), os_threads()))
        return [], {}

    def after_request():
        freed = free_idle_workers()
        calls.append(("after", threading.get_ident(), os_threads(), freed))
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
    kinds = [c[0] for c in calls]
    assert kinds == ["encode", "after", "encode", "after"]
    assert len({c[1] for c in calls}) == 1  # all on the one worker thread
    for encoded, after in ((calls[0], calls[1]), (calls[2], calls[3])):
        assert after[3] is True and after[2] == encoded[2] - WORKERS


def wait_until(condition, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


@pytest.mark.parametrize("cpu_cores", ["shared", "dedicated"])
def test_a_caller_waiting_in_score_keeps_its_workers_only_when_cores_are_shared(model, cpu_cores):
    samples = [{"prompt": "What is this?", "completion": f"An answer, take {k}."} for k in range(4)]
    expected = model.score(samples, batch_size=1)
    with RewardEngine(model, cpu_cores=cpu_cores, metrics=None) as engine:
        in_thread(lambda: engine.score(samples))  # the engine's own threads have run once

        def caller():
            (BIG * BIG).sum()
            with_pool = os_threads()
            scores = engine.score(samples)
            # An encoder thread may still be freeing a pool of its own: wait a little for that one.
            freed = wait_until(lambda: os_threads() <= with_pool - WORKERS, seconds=2)
            return with_pool, scores, os_threads(), freed

        with_pool, scores, after, freed = in_thread(caller)
    assert scores == pytest.approx(expected, abs=1e-5)
    if cpu_cores == "shared":
        assert not freed and after >= with_pool
    else:
        assert freed


def test_a_dedicated_engines_encoder_threads_free_the_workers_their_encoding_made(model, monkeypatch):
    original = model.encode_many

    def encode_many(samples, *args, **kwargs):  # the tiny model's encoding is too small for a pool
        (BIG * BIG).sum()
        return original(samples, *args, **kwargs)

    monkeypatch.setattr(model, "encode_many", encode_many)
    samples = [{"prompt": "What is this?", "completion": f"An answer, take {k}."} for k in range(4)]
    with RewardEngine(model, cpu_cores="shared", encode_workers=1, metrics=None) as engine:
        start = os_threads()
        in_thread(lambda: engine.score(samples))  # a caller with no pool of its own
        shared = os_threads() - start  # the model thread's pool and the encoder thread's
    assert shared >= WORKERS
    with RewardEngine(model, cpu_cores="dedicated", encode_workers=1, metrics=None) as engine:
        start = os_threads()
        in_thread(lambda: engine.score(samples))
        # The encoder thread frees its workers after delivering the request: maybe after the scores.
        assert wait_until(lambda: os_threads() - start == shared - WORKERS)


def test_cpu_cores_takes_shared_or_dedicated_only(model):
    with pytest.raises(ValueError, match="cpu_cores must be 'shared' or 'dedicated'"):
        RewardEngine(model, cpu_cores="all", metrics=None)
