"""RewardPool on Ray Serve: a real local Ray cluster with fake GPUs, real Serve replicas, real processes.

One Ray cluster for the module (``num_cpus=8, num_gpus=4``: replicas asking for GPUs get distinct
``CUDA_VISIBLE_DEVICES`` while torch runs on the CPU). Each replica is a process that imports torch and
transformers (5-10 s, about 1 GB), so pools are few: most tests share the class-scoped ones.

Reference for every score: ``RewardModel.score`` in this process on the same tiny checkpoint (fp32, CPU).
Faults are real: replica processes are SIGKILLed, and a broken device is a replica whose forward passes
raise a CUDA error (a ``sitecustomize`` on the replicas' PYTHONPATH patches them while a flag file exists).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import multiprocessing
import os
import pickle
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from conftest import png_bytes, random_image, text_of_length

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from rewardplug import (  # noqa: E402
    InvalidSampleError, PoolBusyError, PoolTimeoutError, ReplicaError, RewardPool,
)  # fmt: skip
from rewardplug.errors import PoolConfigError, PoolNotFoundError, ScoringError  # noqa: E402

TOL = 1e-4
OPTS = dict(dtype="float32", image_roots=None)  # what the reference model uses (tests/conftest.py)
WAIT = 120  # seconds any single future may take before the test calls it a hang
WORKER = Path(__file__).parent / "workers" / "pool_client.py"
from rewardplug.serving.pool import _connect  # noqa: E402

pytestmark = pytest.mark.timeout(900)


# ---- cluster and samples -------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def cluster():
    if ray.is_initialized():  # another module's cluster: start ours with 4 fake GPUs
        ray.shutdown()
    ray.init(num_cpus=8, num_gpus=4, namespace="rewardplug", log_to_driver=False, include_dashboard=False)
    _connect(None)  # Serve keeps a client of an earlier module's cluster in this process: drop it
    yield ray.get_runtime_context().gcs_address
    serve.shutdown()
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
    samples += [{"messages": [
        {"role": "system", "content": "You are a strict visual judge."},
        {"role": "user", "content": [{"type": "image", "image": img_a}, {"type": "text", "text": "Rate it."}]},
        {"role": "assistant", "content": answer}]} for answer in ("Seven out of ten.", "Two.")]  # fmt: skip
    samples += [{"prompt": "Which is wider?", "completion": "The first.", "images": [png_bytes(img_a), {"bytes": png_bytes(img_b)}]}]
    samples += [{"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}],
                 "completion": [{"role": "assistant", "content": text_of_length(n, n + 3)}], "images": [img_b]}
                for n in (20, 90)]  # fmt: skip
    random.Random(seed).shuffle(samples)
    return samples


def heavy_samples(n: int, seed: int, chars: int = 3000) -> list[dict]:
    """Long text-only answers (about 0.3 s each for the tiny model on one core), one prompt group."""
    return [{"prompt": f"Essay {seed}", "completion": f"{k} " + text_of_length(chars, seed * 100 + k)} for k in range(n)]


def assert_scores(got, expected, what=""):
    assert len(got) == len(expected), f"{what}: {len(got)} scores for {len(expected)} samples"
    for k, (g, e) in enumerate(zip(got, expected)):
        if e is None:
            assert g is None, f"{what} sample {k}: {g}, expected None"
        else:
            assert g is not None and abs(g - e) <= TOL, f"{what} sample {k}: pool {g} vs local model {e}"


def fresh_replicas(pool, timeout: float = 30) -> list[dict]:
    """Every running replica's figures, asked of it now (once Serve runs as many as the pool has)."""
    deadline = time.monotonic() + timeout
    while True:
        reports = pool.stats()["replicas"]
        if len(reports) >= pool.num_replicas > 0:
            return sorted(reports, key=lambda r: r["replica"])
        assert time.monotonic() < deadline, f"not every replica answered: {reports}"
        time.sleep(0.2)


def live_pids(pool) -> set[int]:
    """Pids of the replicas that answer now."""
    return {r["pid"] for r in pool.health() if r["alive"]}


def engine_delta(after: list[dict], before: list[dict], key: str) -> list[int]:
    old = {r["replica"]: r["engine"][key] for r in before}
    return [r["engine"][key] - old.get(r["replica"], 0) for r in after]


def make_pool(path, **kwargs) -> RewardPool:
    t0 = time.perf_counter()
    pool = RewardPool(path, ready_timeout_s=300, **OPTS, **kwargs)
    print(f"\npool {kwargs} with {pool.num_replicas} replicas ready in {time.perf_counter() - t0:.1f}s")
    return pool


def run_clients(specs: list[dict], address: str, timeout: float = 300) -> list[dict]:
    """Start one process per spec at once (tests/workers/pool_client.py); their JSON results."""
    env = {**os.environ, "RAY_ADDRESS": address}
    procs = [subprocess.Popen([sys.executable, str(WORKER), json.dumps(s)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for s in specs]  # fmt: skip
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=timeout)
        assert p.returncode == 0, f"client failed ({p.returncode}):\n{stderr[-3000:]}"
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


# ---- 1. a shared pool of 2 replicas on 1 fake GPU each ---------------------------------------------


class TestSharedPool:
    @pytest.fixture(scope="class")
    def pool(self, tiny_path):
        pool = make_pool(tiny_path, name="shared", num_replicas=2, gpus_per_replica=1)
        yield pool
        pool.shutdown()

    def test_replicas_on_distinct_gpus(self, pool):
        assert pool.num_replicas == 2
        reports = fresh_replicas(pool)
        assert all(h["alive"] for h in pool.health())
        gpu_ids = sorted(r["gpu_ids"][0] for r in reports)
        assert len(set(gpu_ids)) == 2 and all(len(r["gpu_ids"]) == 1 for r in reports), reports
        for r in reports:
            assert r["cuda_visible_devices"] == r["gpu_ids"][0], r
            assert r["device"] == "cpu", r  # no CUDA here: the replica warns and runs on the CPU
        assert len({r["pid"] for r in reports}) == 2

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
        with pytest.raises(ValueError, match="on_invalid"):
            pool.submit(samples, on_invalid="skip")

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
        assert "sample 1:" in str(error) and "completion" in str(error), str(error)
        assert "sample 10:" in str(error) and "image" in str(error), str(error)
        assert_scores(error.scores, expected, "InvalidSampleError.scores")
        assert_scores(pool.score(samples, on_invalid="none"), expected, "on_invalid=none")

    def test_prompt_group_goes_to_one_replica(self, pool, model):
        samples = grpo_groups(6, 8, seed=100)
        random.Random(0).shuffle(samples)  # groups interleaved in the request
        expected = model.score(samples)
        before = fresh_replicas(pool)
        assert_scores(pool.score(samples), expected, "routing")
        after = fresh_replicas(pool)
        served = engine_delta(after, before, "samples")
        misses = engine_delta(after, before, "vision_misses")
        hits = engine_delta(after, before, "prefix_hits")
        figures = f"samples per replica {served}, vision misses {misses}, prefix hits {hits}"
        # one vision pass per image and 7 shared prefixes per group of 8: no group was split
        assert sum(misses) == 6, figures
        assert sum(hits) == 6 * 7, figures
        assert all(s % 8 == 0 for s in served), figures

    def test_groups_spread_over_replicas(self, pool, model):
        """Many groups in one request are cut into parts that go to both replicas."""
        samples = grpo_groups(24, 8, seed=150, side=56, hi=30)
        before = fresh_replicas(pool)
        assert_scores(pool.score(samples), model.score(samples), "spread")
        served = engine_delta(fresh_replicas(pool), before, "samples")
        assert sum(served) == len(samples) and all(s > 0 for s in served), f"samples per replica {served}"

    def test_a_burst_of_one_prompts_groups_spreads_once_its_replica_is_ahead(self, pool, model):
        """16 requests at once, all groups of one prompt and image (so all prefer one replica): Serve's
        queue length counts what the router sends from the moment it is sent, so once the preferred
        replica's queue is more than ``imbalance`` requests longer the rest go by power of two choices.
        A second burst right after the first splits too."""
        image = random_image(56, 48, seed=77)
        for burst in range(2):
            requests = [[{"prompt": "What is in the picture?", "images": [image],
                          "completion": f"{burst}-{r}-{k}: " + text_of_length(280, 1000 * burst + 10 * r + k)}
                         for k in range(8)] for r in range(16)]  # ~2,300 tokens per request  # fmt: skip
            before = fresh_replicas(pool)
            futures = [pool.submit(r) for r in requests]
            for request, future in zip(requests, futures):
                assert_scores(future.result(timeout=WAIT), model.score(request), f"burst {burst}")
            served = engine_delta(fresh_replicas(pool), before, "samples")
            assert min(served) >= 0.375 * 128, f"burst {burst}: samples per replica {served}"

    def test_group_returns_to_its_replica_from_another_process(self, pool, model):
        """The same prompt group sent later, by another process, goes to the replica with its image cached."""
        samples = grpo_groups(4, 2, seed=200)  # groups of 2 (~1,200 tokens): a stale report of one stays under imbalance_tokens
        time.sleep(2.5)  # replicas report their load every second: earlier tests' bursts are no longer reported
        for p in range(4):  # each group alone: it lands on its preferred replica (nothing else is queued)
            pool.score(samples[2 * p : 2 * p + 2])
        again = grpo_groups(4, 2, seed=200, lo=130, hi=200)  # same prompts and images, new completions

        @ray.remote(num_cpus=0)
        def score_group(pool, group):
            return pool.score(group)

        time.sleep(2.5)  # the other process counts this one's load from reports: let the last group's expire
        before = fresh_replicas(pool)
        for p in range(4):  # each prompt alone, from a Ray task (another process with its own handle)
            group = again[2 * p : 2 * p + 2]
            assert_scores(ray.get(score_group.remote(pool, group), timeout=WAIT), model.score(group), f"group {p}")
        after = fresh_replicas(pool)
        misses, served = engine_delta(after, before, "vision_misses"), engine_delta(after, before, "samples")
        assert sum(misses) == 0, f"vision misses per replica {misses} (samples {served}): a group changed replica"

    def test_token_samples_get_real_keys_and_spread(self, pool, model):
        """Token-level samples are routed by their own prompt tokens (not one key for all)."""
        tok = model.processor.tokenizer
        samples = []
        for p in range(16):
            prompt = f"<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nPrompt {p}?<|im_end|>\n<|im_start|>assistant\n"
            samples += [{"input_ids": tok.encode(prompt + f"Answer {k} to {p}.<|im_end|>\n"), "images": []} for k in range(4)]
        expected = model.score(samples)
        before = fresh_replicas(pool)
        assert_scores(pool.score_tokens([s["input_ids"] for s in samples]), expected, "score_tokens")
        after = fresh_replicas(pool)
        served, hits = engine_delta(after, before, "samples"), engine_delta(after, before, "prefix_hits")
        assert all(s > 0 for s in served), f"token samples per replica {served}: all went to one replica"
        assert sum(hits) == 16 * 3, f"prefix hits {hits}: a prompt group of token samples was split"

    def test_a_token_sample_with_junk_ids_is_that_samples_error_not_the_requests(self, pool, model):
        """Cutting a request into parts must not fail on a bad token sample: the engine names it."""
        good = [{"prompt": "Hi", "completion": "there"}]
        for junk in (5, None):
            scores = pool.score([{"input_ids": junk}] + good, on_invalid="none")
            assert scores[0] is None, f"input_ids={junk!r} was scored: {scores}"
            assert_scores(scores[1:], model.score(good), f"the good sample beside input_ids={junk!r}")
        with pytest.raises(InvalidSampleError, match="sample 0"):
            pool.score([{"input_ids": 5}] + good)

    def test_get_or_create_returns_the_same_replicas_and_checks_options(self, pool, tiny_path):
        same = RewardPool(tiny_path, name="shared", num_replicas=2, gpus_per_replica=1, **OPTS)
        assert same is not pool and not same.owner
        assert {r["pid"] for r in fresh_replicas(same)} == {r["pid"] for r in fresh_replicas(pool)}
        with pytest.raises(PoolConfigError, match=r"model_options.dtype: running 'float32', asked 'bfloat16'"):
            RewardPool(tiny_path, name="shared", num_replicas=2, gpus_per_replica=1, dtype="bfloat16", image_roots=None)
        with pytest.raises(PoolConfigError, match=r"num_replicas: running 2, asked 3"):
            RewardPool(tiny_path, name="shared", num_replicas=3, gpus_per_replica=1, **OPTS)
        same.close()  # detaches only
        assert pool.score([{"prompt": "Hi", "completion": "there"}])[0] is not None

    def test_pickled_pool_in_spawned_process(self, pool, model):
        samples = mixed_samples(seed=20)
        mine = pool.score(samples)
        ctx = multiprocessing.get_context("spawn")
        out = ctx.Queue()
        address = ray.get_runtime_context().gcs_address
        child = ctx.Process(target=_score_in_child, args=(pickle.dumps(pool), samples, out, address))
        child.start()
        try:
            status, payload = out.get(timeout=180)
        finally:
            child.join(60)
            if child.is_alive():
                child.kill()
        assert status == "ok", payload
        assert_scores(payload, mine, "spawned process")

    def test_handle_passed_to_an_actor_repeatedly_does_not_leak_threads(self, pool):
        @ray.remote(num_cpus=0)
        class Trainer:
            def step(self, pool, samples):
                return threading.active_count(), pool.score(samples)

        trainer = Trainer.remote()
        samples = [{"prompt": "Hi", "completion": f"Hello {k}"} for k in range(4)]
        counts = [ray.get(trainer.step.remote(pool, samples), timeout=180)[0] for _ in range(6)]
        ray.kill(trainer)
        assert counts[-1] <= counts[1], f"threads in the actor after each call: {counts}"

    def test_offload_waits_requests_and_onload_keeps_replicas_and_scores(self, pool, model):
        samples = grpo_groups(2, 4, seed=250)
        expected = model.score(samples)
        pids = {r["pid"] for r in fresh_replicas(pool)}
        pool.offload()
        assert all(r["offloaded"] for r in fresh_replicas(pool))
        future = pool.submit(samples)
        time.sleep(1.0)
        assert not future.done(), "a request was scored while the replicas were offloaded"
        pool.onload()
        assert_scores(future.result(timeout=WAIT), expected, "after onload")
        after = fresh_replicas(pool)
        assert not any(r["offloaded"] for r in after)
        assert {r["pid"] for r in after} == pids, "offload/onload restarted replicas instead of reconfiguring them"


def _score_in_child(blob, samples, out, address):
    """Spawned process: unpickle the pool handle (it connects to the running cluster) and score."""
    try:
        os.environ.pop("RAY_ADDRESS", None)
        pool = pickle.loads(blob)  # no ray.init here: the handle connects on first use
        scores = pool.submit(samples).result(timeout=120)
        if ray.get_runtime_context().gcs_address != address:
            raise RuntimeError(f"connected to {ray.get_runtime_context().gcs_address}, not {address}")
        out.put(("ok", scores))
    except BaseException as e:  # noqa: BLE001 - reported to the test
        out.put(("error", f"{type(e).__name__}: {e}"))


# ---- 2. one pool for many processes ----------------------------------------------------------------


def test_processes_racing_get_or_create_share_one_pool(tiny_path, model, cluster):
    spec = {"model": str(tiny_path), "name": "race", "requests": 3, "samples_per_request": 4,
            "options": {"num_replicas": 1, "gpus_per_replica": 0, **OPTS}}  # fmt: skip
    results = run_clients([{**spec, "seed": s} for s in range(3)], cluster)
    assert len({tuple(r["pids"]) for r in results}) == 1 and len(results[0]["pids"]) == 1, [r["pids"] for r in results]
    for r in results:
        for request, scores in zip(r["requests"], r["scores"]):
            assert_scores(scores, model.score(request), "racing client")
    status = serve.status().applications["race"].deployments["RewardReplica"].replica_states
    assert status == {"RUNNING": 1}, status

    fourth = RewardPool.connect("race")  # a fourth process attaches
    assert fourth.score([{"prompt": "Hi", "completion": "there"}])[0] is not None
    fourth.close()
    assert RewardPool.connect("race").num_replicas == 1  # close() left the replicas
    RewardPool.connect("race").shutdown()
    with pytest.raises(PoolNotFoundError, match="no pool named 'race'"):
        RewardPool.connect("race")


def test_flooding_processes_never_exceed_the_replica_bound(tiny_path, model, cluster):
    """One admission bound: a replica holds at most max_ongoing_requests parts, whoever sends them
    (each request here is one prompt group of 4: one part)."""
    pool = make_pool(tiny_path, name="flood", num_replicas=1, gpus_per_replica=0, max_ongoing_requests=2)
    try:
        spec = {"model": str(tiny_path), "name": "flood", "requests": 8, "samples_per_request": 4, "threads": 4,
                "options": {"num_replicas": 1, "gpus_per_replica": 0, "max_ongoing_requests": 2, **OPTS}}  # fmt: skip
        results = run_clients([{**spec, "seed": s} for s in range(3)], cluster)
        for r in results:
            for request, scores in zip(r["requests"], r["scores"]):
                assert_scores(scores, model.score(request), "flooding client")
        (report,) = fresh_replicas(pool)
        assert 4 <= report["peak_inflight_samples"] <= 2 * 4, report  # 3 x 4 threads x 4 samples sent at once
        assert report["engine"]["samples"] >= 3 * 8 * 4

        busy = RewardPool.connect("flood", busy="raise", max_pending_samples=6)
        held = busy.submit(heavy_samples(6, seed=9))  # this handle's bound: 6 samples unanswered
        with pytest.raises(PoolBusyError, match="max_pending_samples=6"):
            busy.score([{"prompt": "Hi", "completion": "x"}])
        assert len(held.result(timeout=WAIT)) == 6
        assert busy.score([{"prompt": "Hi", "completion": "x"}])[0] is not None  # room again

        queued = [pool.submit(heavy_samples(4, seed=20 + k)) for k in range(12)]  # more than the replica holds
        pool.shutdown()
        t0 = time.monotonic()
        for f in queued:  # answered before the shutdown, or failed by it: never left to their deadline
            with contextlib.suppress(ScoringError):
                f.result(timeout=30)
        assert time.monotonic() - t0 < 30
        assert any(isinstance(f.exception(), ScoringError) and "shut down" in str(f.exception()) for f in queued)
    finally:
        pool.shutdown()


def test_replicas_land_only_on_gpus_the_trainer_left(tiny_path):
    @ray.remote(num_gpus=2, num_cpus=0)
    class Trainer:
        def gpus(self):
            return [str(g) for g in ray.get_gpu_ids()]

    trainer = Trainer.remote()
    trainer_gpus = ray.get(trainer.gpus.remote(), timeout=60)
    pool = make_pool(tiny_path, num_replicas=None, gpus_per_replica=1)
    try:
        assert pool.num_replicas == 2  # sized to the free GPUs, not every GPU of the cluster
        pool_gpus = [g for r in fresh_replicas(pool) for g in r["gpu_ids"]]
        assert len(pool_gpus) == 2 and not set(pool_gpus) & set(trainer_gpus), (pool_gpus, trainer_gpus)
        with pytest.raises(ReplicaError, match=r"needs 3 GPUs .* 0 free of 4"):
            RewardPool(tiny_path, num_replicas=3, gpus_per_replica=1, **OPTS)
    finally:
        pool.shutdown()
        ray.kill(trainer)


# ---- 3. failures ---------------------------------------------------------------------------------


def test_replica_killed_under_load_resolves_every_request_once(tiny_path, model):
    pool = make_pool(tiny_path, num_replicas=2, gpus_per_replica=0.5)
    try:
        requests = [grpo_groups(2, 4, seed=300 + r, lo=1500, hi=2500) for r in range(10)]  # about 16 s of work
        expected = [model.score(r) for r in requests]  # fault-free scores
        victim = fresh_replicas(pool)[0]
        resolved = [0] * len(requests)
        futures = [pool.submit(r) for r in requests]
        for k, f in enumerate(futures):
            f.add_done_callback(lambda _, k=k: resolved.__setitem__(k, resolved[k] + 1))
        time.sleep(2.0)  # both replicas are busy by now
        assert not all(f.done() for f in futures)
        os.kill(victim["pid"], signal.SIGKILL)
        for k, f in enumerate(futures):
            assert_scores(f.result(timeout=WAIT), expected[k], f"request {k} after the kill")
        time.sleep(1.0)  # a second resolution would show up here
        assert resolved == [1] * len(requests), f"times each future resolved: {resolved}"
        assert pool.stats()["retries"] >= 1  # the kill hit work in flight, which was re-sent
        # Serve replaces the dead replica; the pool serves on
        deadline = time.monotonic() + 120
        while pool.num_replicas < 2 or victim["pid"] in live_pids(pool) or len(live_pids(pool)) < 2:
            assert time.monotonic() < deadline, "the killed replica was not replaced"
            time.sleep(1.0)
        later = grpo_groups(4, 2, seed=400)
        assert_scores(pool.score(later), model.score(later), "after the replacement")
    finally:
        pool.shutdown()


FAULTY_DEVICE = textwrap.dedent('''
    # Loaded at interpreter start in the pool's replicas (PYTHONPATH): while the flag file exists, every
    # forward pass of the reward model raises the error a broken GPU gives.
    import os
    import rewardplug.model as _m

    def _broken(name):
        real = getattr(_m.RewardModel, name)
        def call(self, *a, **k):
            if os.path.exists(os.environ["REWARDPLUG_TEST_FAULT_FLAG"]):
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            return real(self, *a, **k)
        setattr(_m.RewardModel, name, call)

    for _name in ("forward", "forward_prefixes", "image_features"):
        _broken(_name)
''')


def test_broken_device_fails_requests_loudly_and_the_replica_is_restarted(tiny_path, model, tmp_path):
    (tmp_path / "sitecustomize.py").write_text(FAULTY_DEVICE)
    flag = tmp_path / "device-broken"
    env = {"env_vars": {"PYTHONPATH": str(tmp_path), "REWARDPLUG_TEST_FAULT_FLAG": str(flag)}}
    pool = make_pool(tiny_path, num_replicas=1, gpus_per_replica=0, runtime_env=env)
    try:
        samples = grpo_groups(2, 3, seed=700)
        assert_scores(pool.score(samples), model.score(samples), "healthy device")
        old_pid = fresh_replicas(pool)[0]["pid"]
        flag.touch()
        with pytest.raises(ScoringError, match="CUDA error: an illegal memory access") as info:
            pool.score(samples, on_invalid="none")  # a system failure is never a None score
        assert not isinstance(info.value, InvalidSampleError)
        # Serve's health check sees the broken device and replaces the replica
        deadline = time.monotonic() + 120
        while old_pid in live_pids(pool):
            assert time.monotonic() < deadline, "the replica with the broken device was never replaced"
            time.sleep(1.0)
        flag.unlink()  # the device works again
        deadline = time.monotonic() + 120
        while True:
            try:
                assert_scores(pool.score(samples), model.score(samples), "device repaired")
                break
            except (ScoringError, ReplicaError):
                assert time.monotonic() < deadline, "the pool never served again after the device was repaired"
                time.sleep(1.0)
    finally:
        pool.shutdown()


def test_request_timeout(tiny_path):
    pool = make_pool(tiny_path, name="slow", num_replicas=1, gpus_per_replica=0)
    try:
        impatient = RewardPool.connect("slow", request_timeout_s=1.0)
        future = impatient.submit(heavy_samples(24, seed=3))  # about 7 s of compute
        with pytest.raises(PoolTimeoutError, match=r"within request_timeout_s=1.0 \(replicas: \w+ \(pid \d+"):
            future.result(timeout=60)  # a hang fails here
        assert impatient.stats()["timeouts"] == 1
        # the timed-out part was cancelled: the replica let go of its samples long before their ~7 s of work
        deadline = time.monotonic() + 6
        while fresh_replicas(pool)[0]["inflight_samples"]:
            assert time.monotonic() < deadline, "the replica still holds the samples of a request that timed out"
        assert pool.score([{"prompt": "Hi", "completion": "x"}])[0] is not None
    finally:
        pool.shutdown()


def test_replica_that_cannot_load_reports_why(tiny_path, tmp_path):
    import shutil

    import torch
    from safetensors.torch import save_file

    bad = tmp_path / "bad-head"
    shutil.copytree(tiny_path, bad)
    save_file({"wrong.weight": torch.zeros(1, 64)}, str(bad / "value_head.safetensors"))
    t0 = time.perf_counter()
    with pytest.raises(ReplicaError) as info:
        RewardPool(bad, num_replicas=1, gpus_per_replica=0, ready_timeout_s=240, **OPTS)
    message = str(info.value)
    assert "CheckpointError" in message and "wrong.weight" in message, message
    assert time.perf_counter() - t0 < 120
    assert not [n for n, s in serve.status().applications.items() if s.status != "RUNNING"], "a failed pool was left behind"


def test_pool_larger_than_the_cluster_fails_at_once(tiny_path):
    t0 = time.perf_counter()
    with pytest.raises(ReplicaError, match=r"needs 8 GPUs \(1 replicas x 8\) but the cluster has 4 free of 4"):
        RewardPool(tiny_path, gpus_per_replica=8, num_replicas=1, **OPTS)
    assert time.perf_counter() - t0 < 10


def test_soak_through_two_replicas_with_one_killed_midway(tiny_path, model):
    """Threads x requests over distinct images through a 2-replica pool with small cache budgets; one
    replica is SIGKILLed midway. Every request resolves exactly once with its fault-free scores, and the
    surviving replica's resident memory grows after warm-up by less than its budgets plus a stated slack."""
    psutil = pytest.importorskip("psutil")
    budgets_mb, slack_mb = 32 + 32, 200  # vision cache + pixel cache; slack: allocator and Serve's own
    pool = make_pool(tiny_path, num_replicas=2, gpus_per_replica=0, vision_cache_mb=32, pixel_cache_mb=32)
    try:
        threads, per_thread = 4, 12
        requests = [[grpo_groups(2, 4, seed=1000 + 100 * t + k, side=112) for k in range(per_thread)] for t in range(threads)]
        resolved: dict[tuple, int] = {}
        failures: list = []
        warm = threading.Barrier(threads + 1)
        killed = threading.Event()

        def client(t):
            for k, samples in enumerate(requests[t]):
                if k == 2:
                    warm.wait(timeout=WAIT)
                future = pool.submit(samples)
                future.add_done_callback(lambda _, key=(t, k): resolved.__setitem__(key, resolved.get(key, 0) + 1))
                try:
                    assert_scores(future.result(timeout=WAIT), model.score(samples), f"thread {t} request {k}")
                except BaseException as e:  # noqa: BLE001 - reported below
                    failures.append(e)
                if k == per_thread // 2 and t == 0:
                    killed.wait(timeout=WAIT)

        workers = [threading.Thread(target=client, args=(t,)) for t in range(threads)]
        for w in workers:
            w.start()
        warm.wait(timeout=WAIT)  # every thread has two requests done: warm-up over
        reports = fresh_replicas(pool)
        victim, survivor = reports[0]["pid"], reports[1]["pid"]
        rss_warm = psutil.Process(survivor).memory_info().rss
        time.sleep(1.0)
        os.kill(victim, signal.SIGKILL)
        killed.set()
        for w in workers:
            w.join(timeout=4 * WAIT)
        assert not failures, failures[:3]
        assert resolved == {(t, k): 1 for t in range(threads) for k in range(per_thread)}, resolved
        growth_mb = (psutil.Process(survivor).memory_info().rss - rss_warm) / 2**20
        print(f"\nsoak: {threads * per_thread} requests, retries {pool.stats()['retries']}, "
              f"survivor RSS growth after warm-up {growth_mb:.0f} MiB (limit {budgets_mb + slack_mb})")  # fmt: skip
        assert growth_mb < budgets_mb + slack_mb
    finally:
        pool.shutdown()


def test_autoscaling_adds_a_replica_under_queued_load(tiny_path, model):
    """autoscale=(1, 2): one replica when idle; a steady queue of prompt groups makes Serve add the second."""
    pool = make_pool(tiny_path, num_replicas=None, gpus_per_replica=0, autoscale=(1, 2))
    try:
        assert pool.num_replicas == 1
        stop = threading.Event()

        def load(seed):
            k = 0
            while not stop.is_set():
                samples = grpo_groups(4, 4, seed=seed + k, lo=800, hi=1200)  # 4 parts per request
                assert_scores(pool.score(samples), model.score(samples), "under autoscaling")
                k += 1

        workers = [threading.Thread(target=load, args=(5000 + 100 * t,)) for t in range(3)]
        for w in workers:
            w.start()
        deadline = time.monotonic() + 120
        try:
            while pool.num_replicas < 2:
                assert time.monotonic() < deadline, "Serve never added a replica under load"
                time.sleep(1.0)
        finally:
            stop.set()
            for w in workers:
                w.join(timeout=WAIT)
    finally:
        pool.shutdown()
