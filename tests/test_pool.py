"""RewardPool: Ray actor replicas of the reward model, on a real local Ray cluster with fake GPUs.

One Ray cluster for the whole module (``ray.init(num_cpus=8, num_gpus=4)``: actors asking for GPUs get
distinct ``CUDA_VISIBLE_DEVICES`` while torch runs on the CPU). Each replica costs a process that imports
torch and transformers (5-10 s, about 1 GB), so pools are few, one per test class (class-scoped
fixtures), and each is shut down before the next class makes its own.

Reference for every score: ``RewardModel.score`` in this process on the same tiny checkpoint (fp32, CPU),
the same as tests/test_engine.py uses.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import multiprocessing
import os
import pickle
import random
import threading
import time

import numpy as np
import pytest
from conftest import png_bytes, random_image, text_of_length

ray = pytest.importorskip("ray")

from rewardplug import (  # noqa: E402
    InvalidSampleError, PoolBusyError, PoolTimeoutError, ReplicaError, RewardPlugError, RewardPool,
)  # fmt: skip

TOL = 1e-4
OPTS = dict(dtype="float32", image_roots=None)  # what the reference model uses (tests/conftest.py)
WAIT = 120  # seconds any single future may take before the test calls it a hang


# ---- cluster and samples -------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def cluster():
    if ray.is_initialized():  # another module's cluster: start ours with 4 fake GPUs
        ray.shutdown()
    ray.init(num_cpus=8, num_gpus=4, namespace="rewardplug", log_to_driver=False)
    yield
    ray.shutdown()




def grpo_groups(prompts: int, group: int, *, seed: int, side: int = 112, lo: int = 5, hi: int = 120) -> list[dict]:
    """``prompts`` prompt groups of ``group`` distinct completions; one distinct image per prompt, the same
    PIL object in every sample of its group (as a GRPO trainer passes it)."""
    rng = random.Random(seed)
    out = []
    for p in range(prompts):
        image = random_image(side, side - 8 * (p % 3), seed=seed * 1000 + p)
        question = f"Question {seed}-{p}: what is in the picture?"
        out += [{"prompt": question, "completion": f"{k}: " + text_of_length(rng.randint(lo, hi), seed * 7919 + 31 * p + k),
                 "images": [image]} for k in range(group)]  # fmt: skip
    return out


def mixed_samples(seed: int = 0) -> list[dict]:
    """GRPO groups with images, text-only samples, whole conversations, bytes images, conversational form."""
    img_a, img_b = random_image(100, 150, seed=seed + 1), random_image(150, 100, seed=seed + 2)
    samples = grpo_groups(3, 4, seed=seed + 3)
    samples += [{"prompt": "Write a haiku about autumn.", "completion": text_of_length(n, n)} for n in (12, 150, 1)]
    samples += [{"prompt": "Hi", "completion": "Hello there!"}]
    samples += [{"messages": [
        {"role": "system", "content": "You are a strict visual judge."},
        {"role": "user", "content": [{"type": "image", "image": img_a}, {"type": "text", "text": "Rate it."}]},
        {"role": "assistant", "content": answer}]} for answer in ("Seven out of ten.", "Two.")]  # fmt: skip
    two_images = [png_bytes(img_a), {"bytes": png_bytes(img_b)}]  # PNG bytes, as raw bytes and as HF datasets give them
    samples += [{"prompt": "Which is wider?", "completion": "The first.", "images": two_images}]
    samples += [{"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}],
                 "completion": [{"role": "assistant", "content": text_of_length(n, n + 3)}], "images": [img_b]}
                for n in (20, 90)]  # fmt: skip
    random.Random(seed).shuffle(samples)
    return samples


def assert_scores(got, expected, what=""):
    assert len(got) == len(expected), f"{what}: {len(got)} scores for {len(expected)} samples"
    for k, (g, e) in enumerate(zip(got, expected)):
        if e is None:
            assert g is None, f"{what} sample {k}: {g}, expected None"
        else:
            assert g is not None and abs(g - e) <= TOL, f"{what} sample {k}: pool {g} vs local model {e}"


def replica_stats(pool) -> list[dict]:
    stats = pool.stats()["replicas"]
    assert all("error" not in r for r in stats), stats
    return stats


def delta(after: list[dict], before: list[dict], key: str) -> list[int]:
    return [a[key] - b[key] for a, b in zip(after, before)]


def wait_idle(pool) -> None:
    """Block until every replica has finished what it was given, timed-out work included (cancelling a
    request does not stop its replica's engine). A replica's engine takes work in windows and scores a
    window shortest first: a probe longer than anything sent before comes back after all of it."""
    probe = [{"prompt": "idle?", "completion": text_of_length(4000, 0)}]
    refs = [actor.score.remote(probe) for actor in pool._actors]
    ray.get(refs, timeout=WAIT)
    for actor in pool._actors:
        assert ray.get(actor.stats.remote(), timeout=30)["queue_depth"] == 0


def make_pool(path, **kwargs) -> RewardPool:
    t0 = time.perf_counter()
    pool = RewardPool(path, ready_timeout_s=240, **OPTS, **kwargs)
    print(f"\npool {kwargs} with {pool.num_replicas} replicas ready in {time.perf_counter() - t0:.1f}s")
    return pool


# ---- 1. four replicas, one fake GPU each: placement, scores, errors, pickling, latency -------------


class TestOneGPUPerReplica:
    @pytest.fixture(scope="class")
    def pool(self, tiny_path):
        # large capacity: the latency test keeps 50,000 samples in flight
        pool = make_pool(tiny_path, num_replicas=None, gpus_per_replica=1, max_inflight_per_replica=20_000)
        yield pool
        pool.shutdown()

    def test_one_replica_per_gpu(self, pool):
        assert pool.num_replicas == 4
        health = pool.health()
        assert all(h["alive"] for h in health), health
        gpu_ids = [h["gpu_ids"] for h in health]
        assert all(len(ids) == 1 for ids in gpu_ids), gpu_ids
        assert sorted(ids[0] for ids in gpu_ids) == ["0", "1", "2", "3"], gpu_ids
        for h in health:
            assert h["cuda_visible_devices"] == h["gpu_ids"][0], h
            assert h["device"] == "cpu", h  # no CUDA here: the replica warns and runs on the CPU
        assert len({h["pid"] for h in health}) == 4, health

    def test_scores_equal_local_model(self, pool, model):
        samples = mixed_samples()
        expected = model.score(samples)
        assert len({round(e, 3) for e in expected}) > len(expected) - 3  # order is observable

        assert_scores(pool.score(samples), expected, "score")
        future = pool.submit(samples[::-1])
        assert isinstance(future, concurrent.futures.Future)
        assert_scores(future.result(timeout=WAIT), expected[::-1], "submit")
        assert_scores(asyncio.run(asyncio.wait_for(pool.ascore(samples), WAIT)), expected, "ascore")

        async def gather():  # concurrent callers, each a slice
            return await asyncio.gather(*(pool.ascore(samples[k::3]) for k in range(3)))

        for k, got in enumerate(asyncio.run(asyncio.wait_for(gather(), WAIT))):
            assert_scores(got, expected[k::3], f"ascore gather slice {k}")
        assert pool.score([]) == []
        with pytest.raises(TypeError):
            pool.submit(samples[0])
        # a request of several prompt groups was spread over several replicas
        assert sum(r["samples"] > 0 for r in replica_stats(pool)) >= 2
        assert pool.stats()["inflight_samples"] == 0

    def test_invalid_samples(self, pool, model):
        samples = grpo_groups(4, 3, seed=50)
        samples[1] = {k: v for k, v in samples[1].items() if k != "completion"}  # no answer, group 0
        samples[10] = {**samples[10], "images": [b"not an image"]}  # unreadable image, its own group
        expected = model.score(samples, on_invalid="none")
        assert [i for i, e in enumerate(expected) if e is None] == [1, 10]

        with pytest.raises(InvalidSampleError) as info:
            pool.score(samples)
        error = info.value
        assert sorted(error.errors) == [1, 10], error.errors
        assert error.index == 1
        assert "sample 1:" in str(error) and "completion" in str(error), str(error)
        assert "sample 10:" in str(error) and "image" in str(error), str(error)
        assert_scores(error.scores, expected, "InvalidSampleError.scores")

        assert_scores(pool.score(samples, on_invalid="none"), expected, "on_invalid=none")
        future = pool.submit(samples)
        with pytest.raises(InvalidSampleError):
            future.result(timeout=WAIT)
        assert pool.stats()["inflight_samples"] == 0

    def test_pickled_pool_in_spawned_process(self, pool, model):
        samples = mixed_samples(seed=20)
        mine = pool.score(samples)
        assert_scores(mine, model.score(samples), "driver")
        blob = pickle.dumps(pool)
        ctx = multiprocessing.get_context("spawn")
        out = ctx.Queue()
        # Other Ray clusters may run on this machine (``address="auto"`` would pick any of them): the
        # handle itself must lead the child to ours.
        address = ray.get_runtime_context().gcs_address
        child = ctx.Process(target=_score_in_child, args=(blob, samples, out, address))
        child.start()
        try:
            status, payload = out.get(timeout=180)
        finally:
            child.join(60)
            if child.is_alive():
                child.kill()
        assert status == "ok", payload
        assert_scores(payload, mine, "spawned process")

    def test_pickled_handle_names_its_cluster(self, pool):
        """A handle unpickled in a process without Ray (a spawned reward process) must find *this* cluster;
        ``ray.init(address="auto")`` connects to an arbitrary one when several run on the machine."""
        address = ray.get_runtime_context().gcs_address
        assert address.encode() in pickle.dumps(pool), f"the pickled handle does not carry the address {address}"

    def test_pickled_pool_in_ray_task(self, pool):
        samples = mixed_samples(seed=30)
        mine = pool.score(samples)

        @ray.remote(num_cpus=0)
        def score_in_task(pool, samples):
            return pool.score(samples)

        assert_scores(ray.get(score_in_task.remote(pool, samples), timeout=180), mine, "ray task")

    def test_handle_passed_to_an_actor_repeatedly_does_not_leak_threads(self, pool):
        """A trainer actor that gets the pool handle with each call (as Ray passes arguments) unpickles a
        new handle every time; each one starts a dispatcher and a watchdog thread that never stop."""

        @ray.remote(num_cpus=0)
        class Trainer:
            def step(self, pool, samples):
                scores = pool.score(samples)
                return threading.active_count(), scores

        trainer = Trainer.remote()
        samples = [{"prompt": "Hi", "completion": f"Hello {k}"} for k in range(4)]
        counts = [ray.get(trainer.step.remote(pool, samples), timeout=180)[0] for _ in range(6)]
        ray.kill(trainer)
        assert counts[-1] <= counts[1], f"threads in the actor after each call: {counts}"

    def test_submit_latency_1000_samples(self, pool):
        samples = grpo_groups(20, 50, seed=60, side=224)  # 1,000 samples, 20 images
        assert len(samples) == 1000
        futures = [pool.submit(samples) for _ in range(5)]  # warm up
        times = []
        for _ in range(50):
            t0 = time.perf_counter()
            futures.append(pool.submit(samples))
            times.append(time.perf_counter() - t0)
        p50, p99 = (float(np.percentile(times, q)) * 1e3 for q in (50, 99))
        print(f"\nsubmit latency, 1,000 samples with images, 50 submits: p50 {p50:.3f} ms, p99 {p99:.3f} ms")
        assert all(isinstance(f, concurrent.futures.Future) for f in futures)
        assert not all(f.done() for f in futures)  # queued, not computed inside submit
        assert p99 < 5.0, f"submit latency p50 {p50:.3f} ms, p99 {p99:.3f} ms (limit 5 ms)"

    def test_shutdown_fails_pending_requests(self, pool):
        """Shutdown with requests queued and in flight: every future resolves (fails), none hangs."""
        samples = grpo_groups(10, 20, seed=70, side=56)
        futures = [pool.submit(samples) for _ in range(20)]
        pool.shutdown()
        done, pending = concurrent.futures.wait(futures, timeout=30)
        assert not pending, f"{len(pending)} of {len(futures)} futures never resolved after shutdown()"
        for f in done:
            assert f.exception() is None or isinstance(f.exception(), RewardPlugError), f.exception()
        with pytest.raises(RuntimeError):
            pool.submit(samples)


def _score_in_child(blob, samples, out, address):
    """Spawned process: unpickle the pool handle (it connects to the running cluster) and score."""
    try:
        os.environ.pop("RAY_ADDRESS", None)
        pool = pickle.loads(blob)  # no ray.init here: the handle connects (RewardPool._reattach)
        if ray.get_runtime_context().gcs_address != address:
            raise RuntimeError(f"connected to {ray.get_runtime_context().gcs_address}, not {address}")
        out.put(("ok", pool.submit(samples).result(timeout=120)))
    except BaseException as e:  # noqa: BLE001 - reported to the test
        out.put(("error", f"{type(e).__name__}: {e}"))


# ---- 2. two fake GPUs per replica: placement, routing of prompt groups ----------------------------


class TestTwoGPUsPerReplica:
    @pytest.fixture(scope="class")
    def pool(self, tiny_path):
        pool = make_pool(tiny_path, num_replicas=None, gpus_per_replica=2)
        yield pool
        pool.shutdown()

    def test_two_gpus_each(self, pool):
        assert pool.num_replicas == 2
        health = pool.health()
        assert all(h["alive"] for h in health), health
        for h in health:
            assert len(h["gpu_ids"]) == 2, h
            assert sorted(h["cuda_visible_devices"].split(",")) == sorted(h["gpu_ids"]), h
        assert sorted(g for h in health for g in h["gpu_ids"]) == ["0", "1", "2", "3"], health

    def test_prompt_group_goes_to_one_replica(self, pool, model):
        samples = grpo_groups(4, 8, seed=100)
        random.Random(0).shuffle(samples)  # groups interleaved in the request
        expected = model.score(samples)
        before = replica_stats(pool)
        assert_scores(pool.score(samples), expected, "routing")
        after = replica_stats(pool)
        served = delta(after, before, "samples")
        misses = delta(after, before, "vision_misses")
        hits = delta(after, before, "prefix_hits")
        figures = f"samples per replica {served}, vision misses {misses}, prefix hits {hits}"
        # one vision pass per image and 7 shared prefixes per group of 8: no group was split
        assert sum(misses) == 4, figures
        assert sum(hits) == 4 * 7, figures
        assert all(s % 8 == 0 for s in served), figures
        # both replicas got work (groups spread by least outstanding tokens)
        assert all(s > 0 for s in served), figures

    def test_prompt_group_sticks_to_its_replica_across_requests(self, pool, model):
        """A prompt seen in an earlier request goes back to the replica that has its image cached."""
        samples = grpo_groups(4, 4, seed=200)
        pool.score(samples)
        wait_idle(pool)
        again = grpo_groups(4, 4, seed=200, lo=130, hi=200)  # same prompts and images, new completions
        for p in range(4):  # the same PIL objects as in the first request
            for s in again[4 * p : 4 * p + 4]:
                s["images"] = samples[4 * p]["images"]
        before = replica_stats(pool)
        for p in range(4):  # each prompt alone, the pool idle in between
            group = again[4 * p : 4 * p + 4]
            assert_scores(pool.score(group), model.score(group), f"group {p}")
        after = replica_stats(pool)
        misses, served = delta(after, before, "vision_misses"), delta(after, before, "samples")
        assert sum(misses) == 0, f"vision misses per replica {misses} (samples {served}): groups changed replica"


# ---- 3. half a fake GPU per replica: packing, replica death ---------------------------------------


class TestHalfGPUPerReplica:
    @pytest.fixture(scope="class")
    def pool(self, tiny_path):
        pool = make_pool(tiny_path, num_replicas=2, gpus_per_replica=0.5)
        yield pool
        pool.shutdown()

    def test_two_replicas_share_a_gpu(self, pool):
        health = pool.health()
        assert all(h["alive"] for h in health), health
        assert [len(h["gpu_ids"]) for h in health] == [1, 1], health
        assert health[0]["gpu_ids"] == health[1]["gpu_ids"], health
        assert health[0]["cuda_visible_devices"] == health[1]["cuda_visible_devices"] == health[0]["gpu_ids"][0]
        assert health[0]["pid"] != health[1]["pid"]

    def test_replica_killed_mid_flight(self, pool, model, caplog):
        requests = [grpo_groups(2, 8, seed=300 + r, side=224) for r in range(10)]
        expected = [model.score(r) for r in requests]  # fault-free scores
        counts = pool.stats()
        old_pid = pool.health()[0]["pid"]
        resolved = [0] * len(requests)

        def count(k):
            def done(_):
                resolved[k] += 1

            return done

        caplog.set_level(logging.WARNING)
        futures = [pool.submit(r) for r in requests]
        for k, f in enumerate(futures):
            f.add_done_callback(count(k))
        deadline = time.monotonic() + 30
        while ray.get(pool._actors[0].stats.remote(), timeout=30)["requests"] == 0:  # replica 0 has work
            assert time.monotonic() < deadline, "replica 0 never got a request"
            time.sleep(0.01)
        ray.kill(pool._actors[0], no_restart=False)

        for k, f in enumerate(futures):
            assert_scores(f.result(timeout=WAIT), expected[k], f"request {k} after the kill")
        time.sleep(1.0)  # a second resolution would show up here
        assert resolved == [1] * len(requests), f"times each future resolved: {resolved}"
        stats = pool.stats()
        assert stats["inflight_samples"] == 0, stats  # each request left the count exactly once
        assert stats["requests"] - counts["requests"] == len(requests)
        assert stats["replica_failures"] >= 1 and stats["retries"] >= 1, stats
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]

        # Ray restarts the replica; it comes back and serves again
        deadline = time.monotonic() + 90
        while True:
            h = pool.health(timeout=10)[0]
            if h["alive"] and h["pid"] != old_pid:
                break
            assert time.monotonic() < deadline, f"replica 0 not back after 90 s: {h}"
            time.sleep(1.0)
        deadline = time.monotonic() + 60
        k = 0
        while replica_stats(pool)[0]["samples"] == 0:  # a fresh process: its counters start at 0
            assert time.monotonic() < deadline, f"replica 0 is alive but gets no work: {pool.stats()}"
            k += 1
            later = grpo_groups(4, 2, seed=400 + k)
            assert_scores(pool.score(later), model.score(later), "after the restart")
            time.sleep(0.5)


# ---- 4. CPU replicas: backpressure ---------------------------------------------------------------


def heavy_samples(n: int, seed: int, chars: int = 3000) -> list[dict]:
    """Long text-only answers (about 0.3 s each for the tiny model on one core), one prompt group."""
    return [{"prompt": f"Essay {seed}", "completion": f"{k} " + text_of_length(chars, seed * 100 + k)} for k in range(n)]


class TestCPUWait:
    @pytest.fixture(scope="class")
    def pool(self, tiny_path):
        pool = make_pool(tiny_path, num_replicas=None, gpus_per_replica=0, max_inflight_per_replica=8, busy="wait")
        yield pool
        pool.shutdown()

    def test_runs_on_cpu(self, pool):
        assert pool.num_replicas == 1
        (h,) = pool.health()
        assert h["alive"] and h["gpu_ids"] == [] and h["device"] == "cpu", h
        assert not h["cuda_visible_devices"], h

    def test_wait_blocks_until_room(self, pool, model):
        first = pool.submit(heavy_samples(8, seed=1))  # fills the pool (8 samples)
        with pytest.raises(PoolBusyError):
            pool.submit([{"prompt": "Hi", "completion": "x"}], timeout=0.05)
        assert not first.done()
        small = [{"prompt": "Hi", "completion": f"Hello {k}"} for k in range(4)]
        second = pool.submit(small, timeout=WAIT)  # blocks until the first request is answered
        assert first.done(), "submit returned while the pool was full"
        assert len(first.result()) == 8
        assert_scores(second.result(timeout=WAIT), model.score(small), "after waiting")

    def test_inflight_bounded(self, pool, model):
        requests = [grpo_groups(1, 3, seed=500 + k) if k % 2 else heavy_samples(3, seed=500 + k, chars=500)
                    for k in range(12)]  # fmt: skip
        results: dict[int, list] = {}
        peak, stop = [0], threading.Event()

        def monitor():
            while not stop.is_set():
                peak[0] = max(peak[0], pool.stats()["inflight_samples"])
                time.sleep(0.02)

        def client(k):
            results[k] = pool.submit(requests[k], timeout=WAIT).result(timeout=WAIT)

        watcher = threading.Thread(target=monitor)
        watcher.start()
        clients = [threading.Thread(target=client, args=(k,)) for k in range(len(requests))]
        for c in clients:
            c.start()
        for c in clients:
            c.join(2 * WAIT)
        stop.set()
        watcher.join()
        assert sorted(results) == list(range(len(requests))), f"clients finished: {sorted(results)}"
        for k, r in enumerate(requests):
            assert_scores(results[k], model.score(r), f"client {k}")
        assert 0 < peak[0] <= 8, f"peak in-flight samples {peak[0]}, capacity 8"
        assert pool.stats()["inflight_samples"] == 0


class TestCPURaiseAndTimeouts:
    @pytest.fixture(scope="class")
    def pool(self, tiny_path):
        pool = make_pool(tiny_path, num_replicas=2, gpus_per_replica=0, max_inflight_per_replica=4, busy="raise",
                         request_timeout_s=1.0)  # fmt: skip
        yield pool
        pool.shutdown()

    def test_busy_raises(self, pool):
        first = pool.submit(heavy_samples(8, seed=2))  # capacity 2 x 4 = 8
        t0 = time.perf_counter()
        with pytest.raises(PoolBusyError, match="8 samples in flight"):
            pool.submit([{"prompt": "Hi", "completion": "x"}])
        assert time.perf_counter() - t0 < 1.0  # raised, did not wait
        try:  # about 2.4 s of compute: it times out (1 s) or, on a fast machine, completes
            assert len(first.result(timeout=WAIT)) == 8
        except PoolTimeoutError:
            pass
        assert pool.stats()["inflight_samples"] == 0

    def test_request_timeout(self, pool):
        future = pool.submit(heavy_samples(24, seed=3))  # about 7 s of compute
        with pytest.raises(PoolTimeoutError, match="within 1.0s"):
            future.result(timeout=60)  # a hang fails here
        stats = pool.stats()
        assert stats["timeouts"] >= 1 and stats["inflight_samples"] == 0, stats

    def test_replicas_get_work_after_timeouts(self, pool, model):
        """Timed-out requests must not count as outstanding work forever: once the replicas are idle,
        prompt groups spread over both again."""
        wait_idle(pool)
        samples = [s for p in range(4) for s in grpo_groups(1, 2, seed=600 + p, hi=20)]
        before = replica_stats(pool)
        assert_scores(pool.score(samples), model.score(samples), "after timeouts")
        served = delta(replica_stats(pool), before, "samples")
        assert all(s > 0 for s in served), f"samples per replica {served}: a replica gets no work"


# ---- 5. replicas that cannot start ----------------------------------------------------------------


def test_unplaceable_pool_raises_quickly(tiny_path):
    t0 = time.perf_counter()
    with pytest.raises(ReplicaError, match=r"cannot place 1 replicas of .*'GPU': 8"):
        RewardPool(tiny_path, gpus_per_replica=8, num_replicas=1, ready_timeout_s=3, **OPTS)
    assert time.perf_counter() - t0 < 60
    # nothing left reserved: the whole cluster is free again
    deadline = time.monotonic() + 30
    while ray.available_resources().get("GPU", 0) < 4 or ray.available_resources().get("CPU", 0) < 8:
        assert time.monotonic() < deadline, ray.available_resources()
        time.sleep(0.2)


def test_replica_that_cannot_load_reports_why(tiny_path, tmp_path):
    import shutil

    import torch
    from safetensors.torch import save_file

    missing = tmp_path / "no-such-checkpoint"
    with pytest.raises(ReplicaError, match=r"replica 0: CheckpointError: .*no-such-checkpoint"):
        RewardPool(missing, num_replicas=1, gpus_per_replica=0, ready_timeout_s=240, **OPTS)

    bad = tmp_path / "bad-head"
    shutil.copytree(tiny_path, bad)
    save_file({"wrong.weight": torch.zeros(1, 64)}, str(bad / "value_head.safetensors"))
    with pytest.raises(ReplicaError) as info:
        RewardPool(bad, num_replicas=1, gpus_per_replica=0, ready_timeout_s=240, **OPTS)
    message = str(info.value)
    assert "replica 0: CheckpointError" in message, message
    assert "value_head.safetensors" in message and "wrong.weight" in message, message
    # the failed pools released their reservations
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0) < 8:
        assert time.monotonic() < deadline, ray.available_resources()
        time.sleep(0.2)
