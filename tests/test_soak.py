"""Soak (short): threads x GRPO requests over distinct images through one engine with small budgets.

Every request resolves exactly once, with the right shape (a bad sample in some requests comes back
None, the others scored); resident memory after warm-up grows by less than the configured budgets plus
a stated slack. ``python benchmarks/soak.py --minutes 10`` is the long version.
"""

from __future__ import annotations

import gc
import threading
import time

import numpy as np
import psutil
from conftest import text_of_length
from PIL import Image

from rewardplug import RewardEngine, RewardModel

THREADS, WARMUP, REQUESTS, GROUP, SIZE = 4, 3, 20, 4, 448
VISION_CACHE_MB, PIXEL_CACHE_MB, MAX_QUEUED = 4, 8, 16
# Allocator fragmentation, Python heaps, torch's per-thread scratch: measured growth is under 30 MiB here.
SLACK_MB = 64


def request(thread: int, k: int) -> list[dict]:
    rng = np.random.default_rng(1000 * thread + k)
    image = Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))  # distinct every time
    prompt = f"Request {k} of thread {thread}: what is in the picture?"
    samples = [{"prompt": prompt, "completion": text_of_length(10 + 37 * g, k + g), "images": [image]}
               for g in range(GROUP)]  # fmt: skip
    if k % 5 == 4:
        samples[2] = {"prompt": prompt}  # bad: no completion
    return samples


class Resolutions:
    """A metrics sink counting request completions (the engine observes a latency once per request)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.latencies = 0

    def count(self, name, value):
        pass

    def observe(self, name, value):
        if name == "request_latency_seconds":
            with self.lock:
                self.latencies += 1


def test_soak_every_request_resolves_once_and_memory_stays_bounded(tiny_path):
    model = RewardModel.from_pretrained(tiny_path, dtype="float32", device="cpu", pixel_cache_mb=PIXEL_CACHE_MB)
    sink = Resolutions()
    engine = RewardEngine(model, vision_cache_mb=VISION_CACHE_MB, max_queued_samples=MAX_QUEUED,
                          max_batch_tokens=4096, metrics=sink)  # fmt: skip
    process = psutil.Process()
    callbacks: dict[int, int] = {}
    failures: list[str] = []
    lock = threading.Lock()
    peak = [0]
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            stop.wait(0.05)

    def client(t: int, ks: range):
        for k in ks:
            samples = request(t, k)
            future = engine.submit(samples, on_invalid="none", timeout=120)
            future.add_done_callback(lambda f, key=(t, k): _count(key))
            try:
                scores = future.result(timeout=120)
            except Exception as e:  # noqa: BLE001 - collected, asserted below
                failures.append(f"{t}/{k}: {type(e).__name__}: {e}")
                continue
            expected_none = [k % 5 == 4 and g == 2 for g in range(GROUP)]
            if [s is None for s in scores] != expected_none:
                failures.append(f"{t}/{k}: {scores}")

    def _count(key):
        with lock:
            callbacks[hash(key)] = callbacks.get(hash(key), 0) + 1

    def run(ks: range):
        threads = [threading.Thread(target=client, args=(t, ks)) for t in range(THREADS)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(300)
        assert not any(th.is_alive() for th in threads), "a client hung"

    try:
        run(range(WARMUP))
        gc.collect()
        warm = process.memory_info().rss
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        start = time.monotonic()
        run(range(WARMUP, WARMUP + REQUESTS))
        elapsed = time.monotonic() - start
        stop.set()
        watcher.join()
        gc.collect()
        end = process.memory_info().rss
    finally:
        engine.close(timeout=60)

    total = THREADS * (WARMUP + REQUESTS)
    assert not failures, failures[:5]
    assert len(callbacks) == total and set(callbacks.values()) == {1}, "every request resolved exactly once"
    assert sink.latencies == total
    stats = engine.stats()
    assert stats["requests"] == total and stats["scoring_errors"] == 0 and stats["queued_samples"] == 0
    assert stats["invalid_samples"] == THREADS * sum(k % 5 == 4 for k in range(WARMUP + REQUESTS))
    assert stats["vision_cache_bytes"] <= VISION_CACHE_MB * 2**20
    assert model.encoder.pixel_cache.bytes <= PIXEL_CACHE_MB * 2**20

    # Intake budget: queued samples each hold at most one image's pixels (fp32).
    one = model.encode(request(0, 0)[0])
    intake_mb = MAX_QUEUED * one.pixel_values.numel() * 4 / 2**20
    budget_mb = VISION_CACHE_MB + PIXEL_CACHE_MB + intake_mb + SLACK_MB
    growth_mb = (max(peak[0], end) - warm) / 2**20
    print(f"soak: {total} requests in {elapsed:.1f} s after warm-up; RSS warm {warm / 2**20:.0f} MiB, "
          f"peak {peak[0] / 2**20:.0f} MiB, end {end / 2**20:.0f} MiB, growth {growth_mb:.0f} MiB, "
          f"budget {budget_mb:.0f} MiB")  # fmt: skip
    assert growth_mb <= budget_mb, f"RSS grew {growth_mb:.0f} MiB after warm-up; budgets + slack {budget_mb:.0f} MiB"


def test_soak_busy_raise_never_loses_a_request(model):
    """Many threads against a tiny intake with busy='raise': each submit is either refused at once
    (BusyError) or resolved exactly once; nothing hangs, nothing is left queued."""
    from rewardplug.errors import BusyError

    engine = RewardEngine(model, max_queued_samples=3, busy="raise", metrics=None)
    outcomes = {"busy": 0, "scored": 0, "other": []}
    lock = threading.Lock()

    def client(t):
        for k in range(15):
            try:
                scores = engine.score([{"prompt": f"Q{t}.{k}?", "completion": text_of_length(20 + k, t)}], timeout=120)
                assert len(scores) == 1 and isinstance(scores[0], float)
                key = "scored"
            except BusyError:
                key = "busy"
            except Exception as e:  # noqa: BLE001 - collected, asserted below
                with lock:
                    outcomes["other"].append(repr(e))
                continue
            with lock:
                outcomes[key] += 1

    threads = [threading.Thread(target=client, args=(t,)) for t in range(8)]
    try:
        for th in threads:
            th.start()
        for th in threads:
            th.join(300)
    finally:
        engine.close(timeout=60)
    assert not outcomes["other"]
    assert outcomes["busy"] + outcomes["scored"] == 8 * 15
    assert outcomes["busy"] > 0 and outcomes["scored"] > 0
    assert engine.stats()["queued_samples"] == 0
