"""The engine's fault matrix: faults injected into the real model (tiny checkpoint), a real engine.

Two kinds of failure, never mixed: a bad sample (InvalidSampleError, per sample) and a system failure
(ScoringError with the cause, the whole request). Only out of memory splits batches. No thread dies of a
failure; close(timeout) never hangs.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
from conftest import random_image, text_of_length

from rewardplug import InvalidSampleError
from rewardplug.errors import EngineClosedError, ScoringError

TOL = 1e-4
DEVICE_ERROR = "CUDA error: an illegal memory access was encountered"
FORWARDS = ("forward", "forward_prefixes", "forward_suffixes", "image_features")

IMG_A = random_image(100, 150, seed=21)
IMG_B = random_image(56, 56, seed=22)


def samples() -> list[dict]:
    """A GRPO group over an image (prefix sharing), a text group, and singles."""
    group = [{"prompt": "What is in the picture?", "completion": text_of_length(n, n), "images": [IMG_A]}
             for n in (3, 40, 90, 17)]  # fmt: skip
    text = [{"prompt": "Write a haiku.", "completion": text_of_length(n, n + 1)} for n in (12, 60, 5)]
    singles = [{"prompt": "Hi", "completion": "Hello!"},
               {"prompt": "Is it square?", "completion": "Yes.", "images": [IMG_B]},
               {"prompt": f"Question {text_of_length(30, 3)}?", "completion": text_of_length(120, 4)}]  # fmt: skip
    return group + text + singles


@pytest.fixture(scope="module")
def expected(model):
    return [model.score([s])[0] for s in samples()]


def assert_scores(got, expected, what=""):
    assert len(got) == len(expected), what
    for k, (g, e) in enumerate(zip(got, expected)):
        assert g is not None and abs(g - e) <= TOL, f"{what} sample {k}: {g} vs {e}"


def break_device(monkeypatch, model) -> dict[str, int]:
    """Every forward entry point of the model raises a CUDA-style device error; returns call counts."""
    calls = dict.fromkeys(FORWARDS, 0)

    def broken(name):
        def raise_device_error(*args, **kwargs):
            calls[name] += 1
            raise RuntimeError(DEVICE_ERROR)

        return raise_device_error

    for name in FORWARDS:
        monkeypatch.setattr(model, name, broken(name))
    return calls


def repair_device(monkeypatch, model) -> None:
    for name in FORWARDS:
        monkeypatch.delattr(model, name)  # the instance attribute goes; the class's method shows again


# ---- device error ---------------------------------------------------------------------------------


@pytest.mark.parametrize("on_invalid", ["raise", "none"])
def test_device_error_fails_the_request_with_its_cause_without_bisecting(make_engine, model, monkeypatch, on_invalid):
    engine = make_engine()
    calls = break_device(monkeypatch, model)
    batch = samples()
    with pytest.raises(ScoringError) as info:
        engine.score(batch, on_invalid=on_invalid, timeout=60)
    error = info.value
    assert not isinstance(error, InvalidSampleError)
    assert isinstance(error.__cause__, RuntimeError) and str(error.__cause__) == DEVICE_ERROR
    assert DEVICE_ERROR in str(error) and f"batch of {len(batch)} samples" in str(error)
    # One batch, one failing call (the vision tower runs first): no split, no retry per sample.
    assert sum(calls.values()) == 1, calls
    stats = engine.stats()
    assert stats["oom_splits"] == 0 and stats["failed_samples"] == 0 and stats["invalid_samples"] == 0
    assert stats["scoring_errors"] == 1 and stats["healthy"] is False


def test_broken_engine_is_unhealthy_until_the_device_works(make_engine, model, monkeypatch, expected):
    engine = make_engine()
    batch = samples()
    assert engine.check_health() is None  # healthy from the start
    break_device(monkeypatch, model)
    for _ in range(3):  # every request fails loudly, and the engine keeps taking them
        with pytest.raises(ScoringError, match="illegal memory access"):
            engine.score(batch[:2], timeout=60)
    with pytest.raises(ScoringError, match="probe forward fails too") as info:
        engine.check_health()
    assert isinstance(info.value.__cause__, RuntimeError)
    assert not engine.stats()["healthy"]

    repair_device(monkeypatch, model)
    engine.check_health()  # the probe passes: healthy again
    assert engine.stats()["healthy"]
    assert_scores(engine.score(batch, timeout=60), expected, "after repair")


def test_a_successful_batch_clears_the_broken_state(make_engine, model, monkeypatch, expected):
    engine = make_engine()
    break_device(monkeypatch, model)
    with pytest.raises(ScoringError):
        engine.score(samples()[:1], timeout=60)
    repair_device(monkeypatch, model)
    assert_scores(engine.score(samples(), timeout=60), expected, "after repair")
    assert engine.stats()["healthy"]
    engine.check_health()


def test_device_error_in_one_batch_spares_the_other_batches(make_engine, model, monkeypatch, expected):
    """Only the requests with samples in the failing batch fail; the same window's other batches are
    scored. max_batch_size=1 makes each sample its own batch; the 'Hi' batch hits the device error."""
    real_forward = model.forward
    hi = model.encode({"prompt": "Hi", "completion": "Hello!"}).num_tokens

    def forward(batch, *args, **kwargs):
        if batch.input_ids.shape[1] == hi:
            raise RuntimeError(DEVICE_ERROR)
        return real_forward(batch, *args, **kwargs)

    monkeypatch.setattr(model, "forward", forward)
    engine = make_engine(max_batch_size=1, max_wait_ms=200)
    batch = samples()
    k = 7  # {"prompt": "Hi", ...}
    others = [engine.submit([s]) for i, s in enumerate(batch) if i != k]
    doomed = engine.submit([batch[k]])
    with pytest.raises(ScoringError, match="batch of 1 samples"):
        doomed.result(timeout=60)
    assert_scores([f.result(timeout=60)[0] for f in others], [e for i, e in enumerate(expected) if i != k])


# ---- out of memory ----------------------------------------------------------------------------------


@pytest.mark.parametrize("max_rows", [1, 2, 3, 4, 5])
def test_out_of_memory_at_every_batch_size_splits_to_the_same_scores(make_engine, model, expected, max_rows):
    """Any pass with more than ``max_rows`` rows (language model or vision tower) runs out of memory."""
    lm, visual = model.backbone.language_model, model.backbone.visual
    rows_seen = []

    def lm_oom(module, args, kwargs):
        rows = kwargs["inputs_embeds"].shape[0]
        rows_seen.append(rows)
        if rows > max_rows:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")

    def vision_oom(module, args, kwargs):
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        if grid is not None and len(grid) > max_rows:
            raise torch.OutOfMemoryError("CUDA out of memory (injected, vision)")

    handles = [lm.register_forward_pre_hook(lm_oom, with_kwargs=True),
               visual.register_forward_pre_hook(vision_oom, with_kwargs=True)]  # fmt: skip
    try:
        engine = make_engine()
        assert_scores(engine.score(samples(), timeout=120), expected, f"OOM above {max_rows} rows")
    finally:
        for h in handles:
            h.remove()
    stats = engine.stats()
    assert stats["oom_splits"] > 0 and stats["failed_samples"] == 0 and stats["healthy"]
    assert max(r for r in rows_seen) > max_rows  # the fault really fired


def test_sample_out_of_memory_alone_is_that_samples_reason(make_engine, model, expected):
    lm = model.backbone.language_model
    batch = samples()
    doomed = 9  # the longest single
    length = model.encode(batch[doomed]).num_tokens

    def this_length(module, args, kwargs):
        if kwargs["inputs_embeds"].shape[1] >= length:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    handle = lm.register_forward_pre_hook(this_length, with_kwargs=True)
    try:
        engine = make_engine()
        with pytest.raises(InvalidSampleError) as info:
            engine.score(batch, timeout=120)
    finally:
        handle.remove()
    assert list(info.value.errors) == [doomed]
    assert "out of memory even when scored alone" in info.value.errors[doomed]
    assert_scores([s for i, s in enumerate(info.value.scores) if i != doomed],
                  [e for i, e in enumerate(expected) if i != doomed], "neighbours")  # fmt: skip
    assert engine.stats()["healthy"]  # a too-large sample is not a broken device


# ---- encoding ---------------------------------------------------------------------------------------


def test_exception_in_encoding_fails_that_request_and_no_thread(make_engine, model, monkeypatch, expected):
    real = model.encode_many
    poison = "poison"

    def encode_many(batch):
        if any(isinstance(s, dict) and s.get("completion") == poison for s in batch):
            raise RuntimeError("tokenizer exploded (injected)")
        return real(batch)

    monkeypatch.setattr(model, "encode_many", encode_many)
    engine = make_engine(encode_workers=2)
    bad = [{"prompt": "Hi", "completion": poison}]
    for _ in range(2 * engine.encode_workers + 1):  # more failures than workers: each survives
        with pytest.raises(ScoringError, match="encoding a request of 1 samples failed") as info:
            engine.score(bad, timeout=60)
        assert isinstance(info.value.__cause__, RuntimeError)
        assert "tokenizer exploded" in str(info.value)
    assert all(t.is_alive() for t in engine._encoders.threads) and engine._worker.is_alive()
    assert_scores(engine.score(samples(), timeout=60), expected, "after encoding failures")


# ---- threads and close -------------------------------------------------------------------------------


def stuck_forward(monkeypatch, model) -> tuple[threading.Event, threading.Event]:
    entered, release = threading.Event(), threading.Event()
    for name in FORWARDS:
        real = getattr(model, name)

        def stuck(*args, _real=real, **kwargs):
            entered.set()
            release.wait(60)
            return _real(*args, **kwargs)

        monkeypatch.setattr(model, name, stuck)
    return entered, release


def test_close_with_a_stuck_model_returns_within_its_timeout(make_engine, model, monkeypatch):
    engine = make_engine()
    entered, release = stuck_forward(monkeypatch, model)
    try:
        running = engine.submit(samples()[:2])
        assert entered.wait(30)
        queued = engine.submit(samples()[2:4])
        start = time.monotonic()
        engine.close(timeout=1.0)
        assert time.monotonic() - start < 3.0
        for future in (running, queued):
            with pytest.raises(EngineClosedError, match="closed before this request was scored"):
                future.result(timeout=1)
        with pytest.raises(EngineClosedError):
            engine.submit(samples()[:1])
        engine.close(timeout=1.0)  # twice is harmless
    finally:
        release.set()


def test_submit_to_an_engine_whose_threads_are_gone_raises(make_engine, model, monkeypatch):
    """Threads catch every Exception; a BaseException (here KeyboardInterrupt inside a forward) still ends
    the model thread: its request fails and later submits raise instead of hanging."""

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    for name in FORWARDS:
        monkeypatch.setattr(model, name, interrupted)
    engine = make_engine()
    future = engine.submit(samples()[:1])
    with pytest.raises(EngineClosedError, match="model thread stopped"):
        future.result(timeout=30)
    engine._worker.join(10)
    with pytest.raises(EngineClosedError, match="threads are gone"):
        engine.submit(samples()[:1])
    with pytest.raises(EngineClosedError):
        engine.check_health()
    engine.close(timeout=5)
