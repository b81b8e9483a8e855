"""Encoding in worker processes (rewardplug.encoding.workers): bitwise the token ids, positions and pixel
codes of encoding in this process, a process that dies fails only the request it held and is replaced,
and no shared-memory segment is left behind.

Starting a process imports torch and transformers (seconds on a quiet machine, much longer on a busy
one), so the pools here are few and shared within the module.
"""

from __future__ import annotations

import glob
import os
import signal
import time

import numpy as np
import pytest
import torch
from conftest import png_bytes, random_image
from test_encoding import grouped_request

from rewardplug import RewardModel
from rewardplug.encoding import PixelCodes
from rewardplug.encoding.workers import EncoderProcesses
from rewardplug.errors import ScoringError

SHM = "/dev/shm/rp-enc-*"


@pytest.fixture(scope="module", autouse=True)
def no_segment_left_behind():
    before = set(glob.glob(SHM))
    yield
    assert set(glob.glob(SHM)) - before == set()


@pytest.fixture(scope="module")
def pool(model):
    with EncoderProcesses.for_model(model, workers=2) as processes:
        yield processes


def corpus(image_token_id: int) -> list:
    """The encoding tests' request (prompt groups of every form) and more: byte sources, RGBA and
    grayscale images, images resized on the host, token samples, and samples that are bad."""
    images = [random_image(100, 150, seed=1), random_image(200, 60, seed=2), random_image(64, 64, seed=3)]
    samples = grouped_request(images)
    rgba, gray = random_image(90, 70, seed=4, mode="RGBA"), random_image(56, 84, seed=5).convert("L")
    png = png_bytes(random_image(300, 200, seed=6))
    for k, answer in enumerate(["A cat.", "Two dogs, maybe.", "Nothing at all."]):
        samples.append({"prompt": "What is it?", "completion": answer, "images": [png]})
        samples.append({"prompt": "And this one?", "completion": answer, "images": [rgba, gray]})
        samples.append({"messages": [{"role": "user", "content": [{"type": "image", "image": {"bytes": png}},
                                                                  {"type": "text", "text": f"Q{k}"}]},
                                     {"role": "assistant", "content": answer}]})  # fmt: skip
    samples.append({"input_ids": [97, 98, 99, 100]})
    samples.append({"input_ids": torch.tensor([97, image_token_id, 98]), "images": [images[2]]})
    samples.append({"prompt": "q", "completion": "b", "images": [b"not an image"]})
    samples.append({"input_ids": [97, 98], "images": np.zeros((28, 28, 3), dtype=np.uint8)})
    return samples


def assert_bitwise_equal(got: list, errors: dict, want: list, want_errors: dict) -> None:
    assert errors == want_errors
    assert len(got) == len(want)
    for g, w in zip(got, want):
        if w is None:
            assert g is None
            continue
        assert torch.equal(g.input_ids, w.input_ids) and g.input_ids.dtype == w.input_ids.dtype
        assert torch.equal(g.mm_token_type_ids, w.mm_token_type_ids)
        assert (g.position_ids is None) == (w.position_ids is None)
        assert g.position_ids is None or torch.equal(g.position_ids, w.position_ids)
        assert g.image_digests == w.image_digests
        if w.pixels is None:
            assert g.pixels is None
            continue
        assert torch.equal(g.image_grid_thw, w.image_grid_thw)
        assert type(g.pixels) is type(w.pixels)
        if isinstance(w.pixels, PixelCodes):
            assert g.pixels.table is w.pixels.table  # this process's table: codes of both kinds concatenate
            assert [size for _, size in g.pixels.parts] == [size for _, size in w.pixels.parts]
            assert all(torch.equal(a, b) for (a, _), (b, _) in zip(g.pixels.parts, w.pixels.parts))
        assert torch.equal(g.pixel_values, w.pixel_values)


def test_processes_encode_the_corpus_bitwise_as_this_process_does(model, pool):
    samples = corpus(model.encoder.image_token_id)
    want, want_errors = model.encode_many(samples)
    assert len(want_errors) == 2 and sum(e is not None and e.pixels is not None for e in want) > 20
    before = model.encoder.counters.snapshot()
    got, errors = pool.encode_many(samples)
    assert_bitwise_equal(got, errors, want, want_errors)
    # The group's pixels stay one object, as in this process; the counts come back to the model's encoder.
    assert all(got[k].pixels is got[0].pixels for k in range(1, 8))
    assert model.encoder.counters.samples == before["samples"] + len(samples)


def test_processes_encode_requests_from_several_threads(model, pool):
    from concurrent.futures import ThreadPoolExecutor

    images = [random_image(120 + 28 * k, 90, seed=40 + k) for k in range(6)]
    requests = [[{"prompt": f"q{r}", "completion": f"answer {g}" * (g + 1), "images": [images[r]]} for g in range(8)]
                for r in range(6)]  # fmt: skip
    want = [model.encode_many(r) for r in requests]
    with ThreadPoolExecutor(4) as threads:
        got = list(threads.map(pool.encode_many, requests))
    for (g, ge), (w, we) in zip(got, want):
        assert_bitwise_equal(g, ge, w, we)
    assert len(set(pool.pids())) == 2


def test_images_resized_on_the_device_come_back_as_whole_image_codes(tiny_path):
    rm = RewardModel.from_pretrained(tiny_path, dtype="float32", device="cpu", resize_on_device=True)
    samples = corpus(rm.encoder.image_token_id)
    want, want_errors = rm.encode_many(samples)
    assert any(size is not None for w in want if w is not None and isinstance(w.pixels, PixelCodes)
               for _, size in w.pixels.parts)  # fmt: skip
    with EncoderProcesses.for_model(rm, workers=1) as processes:
        got, errors = processes.encode_many(samples)
    assert_bitwise_equal(got, errors, want, want_errors)


class KillsItsReader:
    """A sample that kills the process that unpickles it (as the kernel's out-of-memory killer would)."""

    def __reduce__(self):
        return (_sigkill_self, ())


def _sigkill_self():
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_process_that_dies_fails_its_request_and_is_replaced(model, pool):
    samples = corpus(model.encoder.image_token_id)
    want, want_errors = model.encode_many(samples)
    pids = pool.pids()
    with pytest.raises(ScoringError, match=r"encoder process \d \(pid \d+\) died \(exit code -9\) while encoding "
                                           r"a request of 2 samples; a new process replaces it"):  # fmt: skip
        pool.encode_many([{"prompt": "q", "completion": "a"}, KillsItsReader()])
    # The other process keeps serving at once; the dead one is replaced (a new process, not a restart).
    got, errors = pool.encode_many(samples)
    assert_bitwise_equal(got, errors, want, want_errors)
    deadline = time.monotonic() + 300
    while pool.alive() < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert pool.alive() == 2 and pool.replaced == 1 and len(set(pool.pids()) - set(pids)) == 1
    for _ in range(4):  # both processes, the new one included
        got, errors = pool.encode_many(samples)
        assert_bitwise_equal(got, errors, want, want_errors)


def test_a_process_killed_while_idle_is_replaced_without_failing_a_request(model, pool):
    samples = corpus(model.encoder.image_token_id)[:8]
    want, want_errors = model.encode_many(samples)
    deadline = time.monotonic() + 300
    while pool.alive() < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    replaced = pool.replaced
    victim = pool.pids()[0]
    os.kill(victim, signal.SIGKILL)
    time.sleep(0.5)
    for _ in range(3):
        got, errors = pool.encode_many(samples)
        assert_bitwise_equal(got, errors, want, want_errors)
    assert pool.replaced == replaced + 1
    deadline = time.monotonic() + 300
    while (pool.alive() < 2 or victim in pool.pids()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert pool.alive() == 2 and victim not in pool.pids()


def test_samples_that_cannot_be_pickled_are_encoded_in_this_process(model, pool):
    image = random_image(64, 64, seed=9)
    local = type("LocalImage", (type(image),), {})  # a class no other process can import
    odd = local()
    odd.__dict__.update(image.__dict__)
    samples = [{"prompt": "q", "completion": "a", "images": [odd]}, {"prompt": "q", "completion": "b", "images": [image]}]
    want, want_errors = model.encode_many(samples)
    got, errors = pool.encode_many(samples)
    assert_bitwise_equal(got, errors, want, want_errors)


def test_a_failure_in_a_process_that_is_not_the_samples_raises_scoring_error(tiny_path):
    rm = RewardModel.from_pretrained(tiny_path, dtype="float32", device="cpu")
    rm.processor.chat_template = "{{ messages[0]['content'] | no_such_filter }}"
    with EncoderProcesses.for_model(rm, workers=1) as processes:
        with pytest.raises(ScoringError, match="encoding sample 0 failed") as info:
            processes.encode_many([{"prompt": "q", "completion": "a"}])
        assert "no_such_filter" in str(info.value.__cause__)
        pid = processes.pids()[0]
        assert processes.encode_many([{"input_ids": [97, 98]}])[0][0] is not None  # the process lives on
        assert processes.pids() == [pid] and processes.replaced == 0


def test_closing_stops_the_processes_and_leaves_no_segment(model):
    processes = EncoderProcesses.for_model(model, workers=1)
    (pid,) = processes.pids()
    processes.encode_many(corpus(model.encoder.image_token_id)[:4])
    processes.close()
    assert processes.alive() == 0
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(ScoringError, match="closed"):
        processes.encode_many([{"prompt": "q", "completion": "a"}])


def test_handoff_carries_float_pixels_bitwise_and_removes_its_segment(tiny_path):
    """The image processor's own float pixels (the torchvision backend: no exact table) go through a
    segment as they are; the segment is gone once read."""
    from rewardplug.encoding import handoff

    rm = RewardModel.from_pretrained(tiny_path, dtype="float32", device="cpu", image_backend="torchvision")
    samples = corpus(rm.encoder.image_token_id)
    want, want_errors = rm.encode_many(samples)
    assert any(isinstance(w.pixels, torch.Tensor) for w in want if w is not None)
    name = f"rp-enc-test-{os.getpid()}-1"
    packed = handoff.pack(want, name)
    assert os.path.exists(f"/dev/shm/{name}")
    got = handoff.unpack(packed)
    assert not os.path.exists(f"/dev/shm/{name}")
    assert_bitwise_equal(got, want_errors, want, want_errors)
