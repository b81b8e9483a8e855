"""RewardEngine: async batching, sharing paths, thread safety, budgets, bad input, out of memory, stats.

The reference for every score is independent scoring, one sample at a time: ``model.score([s])[0]``
(fp32 on CPU), which tests/test_parity.py ties to the model card's own computation. Every sharing path
of the engine (prefix KV reuse, vision cache, duplicate removal, batching, OOM splitting) must give the
same numbers within 1e-4.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time

import pytest
import torch
from conftest import png_bytes, random_image, text_of_length

from rewardplug import InvalidSampleError, RewardEngine
from rewardplug.engine.caches import VisionCache

TOL = 1e-4
STATS_KEYS = [
    "samples", "real_tokens", "padded_tokens", "padding_efficiency", "batches", "vision_hits", "vision_misses",
    "vision_cache_bytes", "prefix_hits", "queue_depth", "latency_p50_ms", "latency_p95_ms", "latency_p99_ms",
]  # fmt: skip


# ---- helpers -----------------------------------------------------------------------------------




def independent(model, samples) -> list[float]:
    return [model.score([s])[0] for s in samples]


def assert_scores(got, expected, what=""):
    assert len(got) == len(expected), what
    for k, (g, e) in enumerate(zip(got, expected)):
        assert g is not None, f"{what} sample {k}: None"
        assert abs(g - e) <= TOL, f"{what} sample {k}: engine {g} vs independent {e}"


IMG_A = random_image(100, 150, seed=11)
IMG_B = random_image(150, 100, seed=12)
IMG_C = random_image(56, 56, seed=13)
IMG_D = random_image(90, 70, seed=14)


def grpo_samples() -> list[dict]:
    """Three image prompts with G = 4, 6, 8 completions of 1 to 200 tokens each."""
    rng = random.Random(0)
    out = []
    for p, (prompt, image, g) in enumerate(
        [("What is in the picture?", IMG_A, 4), ("Describe the colours.", IMG_B, 6), ("Count the dots.", IMG_C, 8)]
    ):
        lengths = [1, 200] + [rng.randint(2, 199) for _ in range(g - 2)]
        out += [
            {"prompt": prompt, "completion": text_of_length(n, 10 * p + k), "images": [image]} for k, n in enumerate(lengths)
        ]
    return out


def mixed_samples() -> list[dict]:
    system = [{"role": "system", "content": "You are a strict visual judge."}]
    user_img = [{"role": "user", "content": [{"type": "image", "image": IMG_D}, {"type": "text", "text": "Rate it."}]}]
    samples = [
        # two-image prompts (a group of 3)
        *[{"prompt": "Which picture is wider?", "completion": text_of_length(n, n), "images": [IMG_A, IMG_B]}
          for n in (3, 80, 30)],
        # text-only prompts (a group of 3 and a single)
        *[{"prompt": "Write a haiku about autumn.", "completion": text_of_length(n, n + 1)} for n in (12, 150, 1)],
        {"prompt": "Hi", "completion": "Hello there!"},
        # a system prompt (group of 2), conversational prompt and completion
        *[{"prompt": system + [{"role": "user", "content": "Describe the image."}],
           "completion": [{"role": "assistant", "content": text_of_length(n, n + 2)}], "images": [IMG_C]} for n in (20, 90)],
        # whole conversations (messages), one multi-turn
        {"messages": user_img + [{"role": "assistant", "content": "Seven out of ten."}]},
        {"messages": user_img + [{"role": "assistant", "content": "Two."}]},
        {"messages": user_img + [{"role": "assistant", "content": "Why?"}, {"role": "user", "content": "Explain."},
                                 {"role": "assistant", "content": text_of_length(60, 5)}]},
        # answers holding an image: no prefix sharing possible
        *[{"prompt": "Draw a square.", "completion": [{"role": "assistant", "content": [
            {"type": "image", "image": im}, {"type": "text", "text": "Here it is."}]}]} for im in (IMG_C, IMG_D)],
    ]  # fmt: skip
    random.Random(1).shuffle(samples)
    return samples


@pytest.fixture(scope="module")
def grpo(model):
    samples = grpo_samples()
    return samples, independent(model, samples)


@pytest.fixture(scope="module")
def mixed(model):
    samples = mixed_samples()
    return samples, independent(model, samples)


# ---- 1. defaults ---------------------------------------------------------------------------------


def test_defaults_just_work(model):
    samples = [
        {"prompt": "What is it?", "completion": "A picture.", "images": [IMG_C]},
        {"prompt": "Hi", "completion": "Hello!"},
        {"prompt": "What is it?", "completion": text_of_length(70, 3), "images": [IMG_C]},
        {"prompt": "Which is wider?", "completion": "The left.", "images": [IMG_A, IMG_B]},
    ]
    expected = independent(model, samples)
    assert len({round(e, 4) for e in expected}) == len(expected)  # order is observable

    with RewardEngine(model) as engine:
        assert_scores(engine.score(samples), expected, "score")
        assert_scores(engine.submit(samples[::-1]).result(timeout=60), expected[::-1], "submit")
        assert_scores(asyncio.run(engine.ascore(samples[1:])), expected[1:], "ascore")

        async def gather():
            return await asyncio.gather(*(engine.ascore([s]) for s in samples))

        assert_scores([r[0] for r in asyncio.run(gather())], expected, "ascore gather")
        assert engine.score([]) == []
        assert engine.submit([]).result(timeout=1) == []
        assert asyncio.run(engine.ascore([])) == []
        with pytest.raises(TypeError):
            engine.submit(samples[0])
        # work queued just before close is finished, not dropped
        pending = [engine.submit([s]) for s in samples]
    assert all(f.done() for f in pending)
    assert_scores([f.result()[0] for f in pending], expected, "queued before close")
    assert not engine._worker.is_alive() and not any(t.is_alive() for t in engine._encoders.threads)
    with pytest.raises(RuntimeError):
        engine.submit(samples)
    with pytest.raises(RuntimeError):
        engine.score(samples)
    engine.close()  # closing twice is harmless


# ---- 2. exactness of every sharing path ----------------------------------------------------------


def test_grpo_groups_share_prefix_exactly(make_engine, grpo):
    samples, expected = grpo
    engine = make_engine()
    assert_scores(engine.score(samples), expected, "grpo")
    stats = engine.stats()
    assert stats["prefix_groups"] == 3
    assert stats["prefix_hits"] == len(samples) - 3
    assert stats["vision_misses"] == 3
    assert stats["forward_passes"] >= 3  # prefixes, then suffixes in several chunks of similar length
    # and again, interleaved across prompts
    order = list(range(len(samples)))
    random.Random(2).shuffle(order)
    assert_scores(engine.score([samples[i] for i in order]), [expected[i] for i in order], "grpo shuffled")
    assert engine.stats()["vision_misses"] == 3  # cached from the first call


def test_vision_cache_across_prompts_and_calls(make_engine, model):
    first = [
        {"prompt": "What is it?", "completion": "Noise.", "images": [IMG_A]},
        {"prompt": "Is it colourful?", "completion": "Yes, very.", "images": [IMG_A]},
        {"prompt": "Compare them.", "completion": "Same size.", "images": [IMG_B, IMG_A]},
    ]
    second = [
        {"prompt": "Describe it.", "completion": "Dots everywhere.", "images": [IMG_B]},
        {"prompt": "Describe it.", "completion": "Small.", "images": [IMG_C]},
        # the same pixels as IMG_A, given as PNG bytes: the same content, so a cache hit
        {"prompt": "Anything odd?", "completion": "No.", "images": [png_bytes(IMG_A)]},
    ]
    expected = independent(model, first + second)
    engine = make_engine()
    assert_scores(engine.score(first), expected[:3], "first call")
    s1 = engine.stats()
    assert s1["vision_misses"] == 2 and s1["vision_hits"] >= 2
    assert_scores(engine.score(second), expected[3:], "second call")
    s2 = engine.stats()
    assert s2["vision_misses"] == 3  # A, B, C: each distinct image through the tower once
    assert s2["vision_hits"] >= s1["vision_hits"] + 2
    assert s2["vision_cache_entries"] == 3 and s2["vision_cache_bytes"] > 0


def test_identical_samples_scored_once(make_engine, model):
    s = {"prompt": "What is it?", "completion": "A blue circle.", "images": [IMG_D]}
    t = {"prompt": "What is it?", "completion": "A red square.", "images": [IMG_D]}
    u = {"prompt": "Hi", "completion": "Hello."}
    samples = [s, dict(s), t, s, u, dict(u)]
    es, et, eu = independent(model, [s, t, u])
    engine = make_engine()
    assert_scores(engine.score(samples), [es, es, et, es, eu, eu], "duplicates")
    assert engine.stats()["duplicate_hits"] == 3


def test_mixed_sample_kinds_in_one_call(make_engine, mixed):
    samples, expected = mixed
    engine = make_engine()
    assert_scores(engine.score(samples), expected, "mixed")
    stats = engine.stats()
    assert stats["prefix_groups"] >= 4 and stats["prefix_hits"] >= 5
    assert stats["vision_misses"] == 4


@pytest.mark.parametrize("which", ["grpo", "mixed"])
def test_share_prefix_off_gives_the_same_scores(make_engine, grpo, mixed, which):
    samples, expected = {"grpo": grpo, "mixed": mixed}[which]
    engine = make_engine(share_prefix=False)
    assert_scores(engine.score(samples), expected, f"{which} share_prefix=False")
    assert engine.stats()["prefix_hits"] == 0 and engine.stats()["prefix_groups"] == 0


@pytest.mark.parametrize("max_tokens,max_rows", [(64, 2), (300, 3)])
def test_tiny_budgets_give_the_same_scores(make_engine, model, grpo, mixed, max_tokens, max_rows):
    samples = grpo[0] + mixed[0]
    expected = grpo[1] + mixed[1]
    engine = make_engine(max_batch_tokens=max_tokens, max_batch_size=max_rows)
    assert_scores(engine.score(samples), expected, f"budget {max_tokens}x{max_rows}")
    stats = engine.stats()
    assert stats["oom_splits"] == 0 and stats["failed_samples"] == 0
    if max_tokens == 64:
        # every sample is over 64 tokens: each one runs alone, nothing is shared or padded
        assert min(model.encode(s).num_tokens for s in samples) > max_tokens
        assert stats["batches"] == len(samples)
        assert stats["prefix_groups"] == 0 and stats["padding_efficiency"] == 1.0
    else:
        # groups of 4 to 8 completions cannot share in one pass of 3 rows: split into sub-groups
        assert stats["prefix_groups"] > 0
        assert stats["prefix_hits"] <= (max_rows - 1) * stats["prefix_groups"]
        assert len(samples) // max_rows <= stats["batches"] < len(samples)


# ---- 3. thread safety ----------------------------------------------------------------------------


def test_concurrent_submits_from_threads(make_engine, model):
    prompts = [
        ("What is in the picture?", [IMG_A]),
        ("Describe the colours.", [IMG_C]),
        ("Tell me a joke.", []),
        ("Compare the two pictures.", [IMG_C, IMG_D]),
    ]
    pool = [
        {"prompt": q, "completion": text_of_length(n, 7 * p + n), "images": ims}
        for p, (q, ims) in enumerate(prompts)
        for n in (1, 9, 40, 110)
    ]
    pool.append({"prompt": "Draw it.", "completion": [{"role": "assistant", "content": [
        {"type": "image", "image": IMG_D}, {"type": "text", "text": "Done."}]}]})  # fmt: skip
    expected = independent(model, pool)
    engine = make_engine()
    barrier = threading.Barrier(8)
    submitted: list[list] = [[] for _ in range(8)]
    errors = []

    def client(t: int):
        try:
            rng = random.Random(t)
            barrier.wait()
            for r in range(10):
                k = rng.randint(1, 6)
                if r % 2:  # a GRPO group: one prompt, k completions
                    p = rng.randrange(len(prompts))
                    idx = [4 * p + rng.randrange(4) for _ in range(k)]
                else:  # anything
                    idx = [rng.randrange(len(pool)) for _ in range(k)]
                submitted[t].append((engine.submit([pool[i] for i in idx]), idx))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=client, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not errors
    total = 0
    for t in range(8):
        assert len(submitted[t]) == 10
        for future, idx in submitted[t]:
            assert_scores(future.result(timeout=120), [expected[i] for i in idx], f"thread {t}")
            total += len(idx)
    stats = engine.stats()
    assert stats["samples"] == total and stats["requests"] == 80
    assert stats["failed_samples"] == 0 and stats["invalid_samples"] == 0
    assert stats["queue_depth"] == 0


# ---- 4. token budget, padding efficiency ---------------------------------------------------------


@pytest.mark.parametrize("max_tokens,max_rows", [(200, 4), (600, 16)])
def test_every_forward_pass_stays_in_budget(make_engine, model, grpo, mixed, max_tokens, max_rows):
    """Checked on the language model's real inputs: rows x padded length of each pass."""
    shapes = []

    def hook(module, args, kwargs):
        shapes.append(tuple(kwargs["inputs_embeds"].shape[:2]))

    handle = model.backbone.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        engine = make_engine(max_batch_tokens=max_tokens, max_batch_size=max_rows)
        engine.score(grpo[0] + mixed[0])
    finally:
        handle.remove()
    assert shapes
    for rows, length in shapes:
        assert rows == 1 or rows * length <= max_tokens, (rows, length)
        assert rows <= max_rows
    assert engine.stats()["padded_tokens"] == sum(r * n for r, n in shapes)


def test_padding_efficiency_is_one_for_equal_lengths(make_engine, model, monkeypatch):
    # distinct prompts of equal length (singles) and one group with equal-length completions
    singles = [{"prompt": f"Question {k}?", "completion": text_of_length(30, k)} for k in range(4)]
    group = [{"prompt": "What is it?", "completion": text_of_length(25, 10 + k), "images": [IMG_C]} for k in range(4)]
    samples = singles + group
    lengths = {model.encode(s).num_tokens for s in singles}
    assert len(lengths) == 1
    engine = make_engine()
    assert_scores(engine.score(samples), independent(model, samples), "equal lengths")
    stats = engine.stats()
    assert stats["padding_efficiency"] == 1.0
    assert stats["real_tokens"] == stats["padded_tokens"] > 0

    # Rows of different lengths: where the model prefers unpadded batches (a CPU) they run in separate
    # passes with no padding; elsewhere they share a pass and the padding shows in the efficiency.
    pair = [{"prompt": "Hi", "completion": "x"}, {"prompt": "Hi", "completion": text_of_length(100, 1)}]
    for prefers in (True, False):
        monkeypatch.setattr(type(model), "prefers_unpadded_batches", prefers)
        uneven = make_engine(share_prefix=False)
        assert_scores(uneven.score(pair), independent(model, pair), f"uneven, prefers_unpadded={prefers}")
        stats = uneven.stats()
        if prefers:
            assert stats["padding_efficiency"] == 1.0 and stats["forward_passes"] == 2
        else:
            assert 0 < stats["padding_efficiency"] < 0.8 and stats["forward_passes"] == 1


# ---- 5. bad input ---------------------------------------------------------------------------------


def test_invalid_samples(make_engine, model):
    good = [
        {"prompt": "What is it?", "completion": "Dots.", "images": [IMG_C]},
        {"prompt": "What is it?", "completion": "Many coloured dots.", "images": [IMG_C]},
        {"prompt": "Hi", "completion": "Hello."},
    ]
    expected = independent(model, good)
    request = [good[0], {"prompt": "What is it?"}, good[1],
               {"prompt": "What is it?", "completion": "x", "images": [b"not an image at all"]}, good[2]]  # fmt: skip

    engine = make_engine()
    with pytest.raises(InvalidSampleError) as info:
        engine.submit(request).result(timeout=60)
    err = info.value
    assert sorted(err.errors) == [1, 3]
    assert "completion" in err.errors[1]
    assert "image" in err.errors[3]
    assert err.scores[1] is None and err.scores[3] is None
    assert_scores([err.scores[i] for i in (0, 2, 4)], expected, "valid ones of a bad request")

    scores = engine.score(request, on_invalid="none")
    assert scores[1] is None and scores[3] is None
    assert_scores([scores[i] for i in (0, 2, 4)], expected, "on_invalid=none")

    with pytest.raises(InvalidSampleError) as info:  # only bad samples: still resolves
        engine.score([{"completion": "no prompt"}], timeout=30)
    assert list(info.value.errors) == [0]
    assert_scores(engine.score(good), expected, "after bad requests")
    assert engine.stats()["invalid_samples"] == 5

    lenient = make_engine(on_invalid="none")
    scores = lenient.score(request)
    assert scores[1] is None and scores[3] is None
    assert_scores([scores[i] for i in (0, 2, 4)], expected, "engine on_invalid=none")
    with pytest.raises(ValueError):
        make_engine(on_invalid="ignore")


# ---- 6. out of memory -------------------------------------------------------------------------------


def test_out_of_memory_splits_and_isolates(make_engine, model, grpo):
    lm = model.backbone.language_model
    samples = grpo[0] + [{"prompt": f"Question {k}?", "completion": text_of_length(5 + 7 * k, k)} for k in range(5)]
    expected = grpo[1] + independent(model, samples[len(grpo[0]) :])

    def over_two_rows(module, args, kwargs):
        if kwargs["inputs_embeds"].shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    handle = lm.register_forward_pre_hook(over_two_rows, with_kwargs=True)
    try:
        engine = make_engine()
        assert_scores(engine.score(samples), expected, "OOM above 2 rows")
        assert engine.stats()["oom_splits"] > 0
        assert engine.stats()["failed_samples"] == 0
    finally:
        handle.remove()

    # One sample's length always runs out of memory, even alone.
    texts = [{"prompt": f"Tell me about {w}.", "completion": text_of_length(n, n)}
             for w, n in [("cats", 10), ("dogs", 40), ("owls", 300), ("fish", 70), ("bees", 25)]]  # fmt: skip
    expected = independent(model, texts)
    doomed = 2
    length = model.encode(texts[doomed]).num_tokens
    assert all(model.encode(t).num_tokens < length for k, t in enumerate(texts) if k != doomed)

    def this_length(module, args, kwargs):
        if kwargs["inputs_embeds"].shape[1] == length:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    handle = lm.register_forward_pre_hook(this_length, with_kwargs=True)
    try:
        engine = make_engine()
        with pytest.raises(InvalidSampleError) as info:
            engine.score(texts, timeout=60)
        assert list(info.value.errors) == [doomed]
        assert "out of memory" in info.value.errors[doomed]
        others = [k for k in range(len(texts)) if k != doomed]
        assert_scores([info.value.scores[k] for k in others], [expected[k] for k in others], "OOM neighbours")
        scores = engine.score(texts, on_invalid="none")
        assert scores[doomed] is None
        assert engine.stats()["failed_samples"] == 2
        # still serving, hook still active
        assert_scores(engine.score([texts[k] for k in others]), [expected[k] for k in others], "after OOM")
    finally:
        handle.remove()
    assert_scores(engine.score(texts), expected, "after the hook is gone")


# ---- 7. stats, vision cache -----------------------------------------------------------------------


def test_stats_are_sensible(make_engine, model, grpo):
    samples = grpo[0]
    engine = make_engine(share_prefix=False)
    before = engine.stats()
    for key in STATS_KEYS:
        assert key in before, key
    assert before["samples"] == 0 and before["latency_p50_ms"] == 0.0 and before["queue_depth"] == 0

    for k in range(0, len(samples), 3):
        engine.score(samples[k : k + 3])
    stats = engine.stats()
    n = len(samples)
    assert stats["samples"] == n and stats["requests"] == -(-n // 3)
    # without prefix sharing, real tokens are exactly the samples' tokens
    assert stats["real_tokens"] == sum(model.encode(s).num_tokens for s in samples)
    assert stats["real_tokens"] <= stats["padded_tokens"]
    assert stats["padding_efficiency"] == pytest.approx(stats["real_tokens"] / stats["padded_tokens"])
    assert 0 < stats["padding_efficiency"] <= 1
    assert 1 <= stats["batches"] <= n
    assert stats["vision_misses"] == 3 and stats["vision_hits"] == n - 3
    assert stats["vision_cache_bytes"] > 0
    assert stats["queue_depth"] == 0
    assert 0 < stats["latency_p50_ms"] <= stats["latency_p95_ms"] <= stats["latency_p99_ms"] < 60_000


def test_vision_cache_lru_in_bytes():
    def t(n):  # n float32 values: 4n bytes
        return torch.zeros(n, dtype=torch.float32)

    cache = VisionCache(max_bytes=100)
    cache.put("a", t(10))
    cache.put("b", t(10))
    assert cache.bytes == 80 and len(cache) == 2
    assert cache.get("a") is not None  # a is now the most recently used
    cache.put("c", t(5))  # 100 bytes: fits exactly
    assert len(cache) == 3 and cache.bytes == 100
    cache.put("d", t(5))  # 120 > 100: the least recently used (b) goes
    assert cache.get("b") is None
    assert cache.get("a") is not None and cache.get("c") is not None and cache.get("d") is not None
    assert cache.bytes == 80
    # recency now: a, c, d (oldest first)
    cache.put("e", t(15))  # 140: a goes (then 100, within the bound)
    assert cache.get("a") is None and len(cache) == 3 and cache.bytes == 100
    assert cache.get("c") is not None  # recency: d, e, c
    cache.put("f", t(5))  # 120: d goes, not c
    assert cache.get("d") is None
    assert cache.get("c") is not None and cache.get("e") is not None and cache.get("f") is not None
    assert cache.bytes == 100 and len(cache) == 3
    cache.put("huge", t(26))  # over the bound alone: not kept, nothing evicted
    assert cache.get("huge") is None and len(cache) == 3 and cache.bytes == 100
    assert cache.get("missing") is None


# ---- bugs found while writing these tests (they fail until rewardplug is fixed) -------------------


def test_vision_cache_bound_is_real_memory(make_engine, model):
    """The byte bound must hold for the memory the cache really keeps alive. The vision tower returns one
    tensor for a whole batch of images, split into per-image views: caching the views keeps the whole
    batch's storage alive, however few images the cache claims to hold."""
    images = [random_image(56 + 14 * k, 84, seed=40 + k) for k in range(4)]
    samples = [{"prompt": "What is it?", "completion": "Dots.", "images": [im]} for im in images]
    one = model.encode(samples[0])
    one_bytes = (one.num_patches // 4) * model.config.text_config.hidden_size * 4
    engine = make_engine(vision_cache_mb=1.5 * one_bytes / 2**20)  # room for about one image
    engine.score(samples)
    cache = engine.vision_cache
    assert cache.bytes <= cache.max_bytes
    storages = {}
    for features in cache._entries.values():
        storage = features.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    assert sum(storages.values()) <= cache.max_bytes, (
        f"cache says {cache.bytes} bytes (bound {cache.max_bytes}) but keeps {sum(storages.values())} bytes alive"
    )


def test_submit_racing_close_never_hangs(model):
    """A submit that passes the closed check while close() runs must either raise or be served; it must
    never leave a future that no thread will resolve. The race is made deterministic by pausing submit
    between its check and its enqueue (it counts the request in between)."""
    engine = RewardEngine(model)
    stats = engine._stats
    real_add = stats.add
    inside, release = threading.Event(), threading.Event()

    def paused_add(**deltas):
        if "requests" in deltas and threading.current_thread().name == "racer":
            inside.set()
            release.wait(10)
        real_add(**deltas)

    stats.add = paused_add
    outcome = {}

    def racer():
        try:
            outcome["future"] = engine.submit([{"prompt": "Hi", "completion": "Hello."}])
        except RuntimeError as e:
            outcome["error"] = e

    thread = threading.Thread(target=racer, name="racer")
    thread.start()
    assert inside.wait(10)
    closer = threading.Thread(target=engine.close, kwargs={"timeout": 10})
    closer.start()
    closer.join(1.0)  # today close() returns at once; a fix may make it wait for the submit in flight
    release.set()
    closer.join(10)
    thread.join(10)
    if "error" in outcome:
        return
    future = outcome["future"]
    try:
        future.result(timeout=2)
    except RuntimeError:
        pass  # failing the request is fine too
    except TimeoutError:
        pytest.fail("a request submitted while the engine closed was never resolved")


def test_submit_rejects_unknown_on_invalid(make_engine):
    """RewardModel.score and RewardEngine(...) refuse an unknown on_invalid; submit/score must too, or a
    typo ("ignore", "None") silently turns errors into None scores."""
    engine = make_engine()
    sample = {"prompt": "Hi", "completion": "Hello."}
    with pytest.raises(ValueError):
        engine.submit([sample], on_invalid="ignore")
    with pytest.raises(ValueError):
        engine.score([{"prompt": "Hi"}], on_invalid="None", timeout=30)


# ---- 8. intake bound, head-of-line, key/value budget ------------------------------------------------

TEXTS = [{"prompt": f"Question {k}?", "completion": text_of_length(10 + 3 * k, k)} for k in range(12)]


class HeldModel:
    """Holds every language model pass until released (a hook on the real model), so requests stay
    queued while a test looks at the intake."""

    def __init__(self, model):
        self.entered, self.release = threading.Event(), threading.Event()
        self.handle = model.backbone.language_model.register_forward_pre_hook(self._hold)

    def _hold(self, module, args):
        self.entered.set()
        self.release.wait(60)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release.set()
        self.handle.remove()


def test_intake_is_bounded_in_samples_busy_raise(make_engine, model):
    from rewardplug.errors import BusyError

    expected = independent(model, TEXTS[:6])
    engine = make_engine(max_queued_samples=4, busy="raise")
    with HeldModel(model) as held:
        first = engine.submit(TEXTS[:3])
        assert held.entered.wait(30)
        with pytest.raises(BusyError, match="holds 3 queued samples"):
            engine.submit(TEXTS[3:5])
        with pytest.raises(BusyError):
            asyncio.run(engine.ascore(TEXTS[3:5]))
        second = engine.submit(TEXTS[3:4])  # 3 + 1 fits exactly
        assert engine.stats()["queued_samples"] == 4
    assert_scores(first.result(timeout=60) + second.result(timeout=60), expected[:4])
    assert engine.stats()["queued_samples"] == 0
    assert_scores(engine.score(TEXTS[:5]), expected[:5], "room again")


def test_submit_waits_for_room_up_to_its_timeout(make_engine, model):
    from rewardplug.errors import BusyError

    expected = independent(model, TEXTS[:4])
    engine = make_engine(max_queued_samples=3)
    with HeldModel(model) as held:
        first = engine.submit(TEXTS[:3])
        assert held.entered.wait(30)
        start = time.monotonic()
        with pytest.raises(BusyError, match="no room within 0.3 s"):
            engine.submit(TEXTS[3:4], timeout=0.3)
        assert 0.25 <= time.monotonic() - start < 5
        waiting = {}
        thread = threading.Thread(target=lambda: waiting.update(f=engine.submit(TEXTS[3:4])))
        thread.start()
        thread.join(0.3)
        assert thread.is_alive()  # waits while the engine is full
    thread.join(60)
    assert_scores(first.result(timeout=60) + waiting["f"].result(timeout=60), expected)


def test_request_larger_than_the_bound_runs_when_the_engine_is_empty(make_engine, model):
    from rewardplug.errors import BusyError

    engine = make_engine(max_queued_samples=2, busy="raise")
    expected = independent(model, TEXTS[:5])
    assert_scores(engine.score(TEXTS[:5]), expected, "alone")
    with HeldModel(model) as held:
        small = engine.submit(TEXTS[:1])
        assert held.entered.wait(30)
        with pytest.raises(BusyError):
            engine.submit(TEXTS[:5])
    assert_scores(small.result(timeout=60), expected[:1])


def test_ascore_waits_for_room_without_blocking_the_event_loop(make_engine, model):
    expected = independent(model, TEXTS[:3])
    engine = make_engine(max_queued_samples=2)

    async def main(held):
        first = asyncio.wrap_future(engine.submit(TEXTS[:2]))
        ticks = 0
        waiter = asyncio.ensure_future(engine.ascore(TEXTS[2:3]))
        for _ in range(30):  # 0.3 s of a loop that must keep running
            await asyncio.sleep(0.01)
            ticks += 1
        assert not waiter.done()  # still waiting for room, the loop still ticking
        held.release.set()
        return await first, await waiter, ticks

    with HeldModel(model) as held:
        got_first, got_second, ticks = asyncio.run(asyncio.wait_for(main(held), 60))
    assert ticks == 30
    assert_scores(got_first + got_second, expected)


def test_small_request_does_not_wait_behind_a_large_one_being_encoded(make_engine, model, monkeypatch):
    real = model.encode_many

    def slow_for_large(samples):
        if len(samples) >= 8:
            time.sleep(1.5)  # a large request's host work (images, template)
        return real(samples)

    monkeypatch.setattr(model, "encode_many", slow_for_large)
    engine = make_engine(encode_workers=2)
    large = engine.submit(TEXTS[:8])
    small = engine.submit(TEXTS[8:9])
    small.result(timeout=60)
    assert not large.done()
    assert_scores(large.result(timeout=60), independent(model, TEXTS[:8]))


@pytest.mark.parametrize("max_kv_tokens", [300, 700])
def test_expanded_prefix_key_value_stays_in_the_planners_budget(make_engine, model, grpo, max_kv_tokens):
    """Each suffix pass holds rows x (padded prefix + padded suffix) key/value tokens: measured on the
    real forward_suffixes calls, it never exceeds max_kv_tokens, and the scores do not change."""
    seen = []
    real = model.forward_suffixes

    def measured(cache, rows, prefix_mask, suffixes, **kwargs):
        seen.append(len(rows) * (prefix_mask.shape[1] + suffixes.input_ids.shape[1]))
        return real(cache, rows, prefix_mask, suffixes, **kwargs)

    model.forward_suffixes = measured
    try:
        engine = make_engine(max_kv_tokens=max_kv_tokens)
        assert_scores(engine.score(grpo[0]), grpo[1], "kv budget")
    finally:
        del model.forward_suffixes
    assert seen and max(seen) <= max_kv_tokens, seen
    assert engine.stats()["prefix_hits"] > 0  # still sharing
    assert engine.stats()["kv_budget_bytes"] == max_kv_tokens * engine.kv_bytes_per_token


def test_a_group_larger_than_one_suffix_pass_encodes_its_prefix_once(make_engine, model, grpo):
    """A key/value budget that fits only a few suffix rows per pass splits the suffix passes, not the
    prompt groups: each of the three prompts runs its prefix once (splitting a group would encode its
    prefix again per part), its suffixes run in several passes, and the scores do not change."""
    prefix_rows, suffix_passes = [], []
    real_prefixes, real_suffixes = model.forward_prefixes, model.forward_suffixes

    def prefixes(batch, *args, **kwargs):
        prefix_rows.append(batch.input_ids.shape[0])
        return real_prefixes(batch, *args, **kwargs)

    def suffixes(cache, rows, *args, **kwargs):
        suffix_passes.append(len(rows))
        return real_suffixes(cache, rows, *args, **kwargs)

    model.forward_prefixes, model.forward_suffixes = prefixes, suffixes
    try:
        engine = make_engine(max_kv_tokens=700)
        assert_scores(engine.score(grpo[0]), grpo[1], "kv budget, one prefix pass per group")
    finally:
        del model.forward_prefixes, model.forward_suffixes
    assert sum(prefix_rows) == 3, prefix_rows  # three prompts, each prefix encoded once
    assert len(suffix_passes) > 3 and sum(suffix_passes) == 4 + 6 + 8, suffix_passes  # every row, in several passes


# ---- 9. metrics and per-step deltas --------------------------------------------------------------------


def test_prometheus_counters_and_histograms_per_engine(make_engine, model):
    from prometheus_client import REGISTRY

    def value(metric, **labels):
        return REGISTRY.get_sample_value(metric, {"engine": "metrics-test", **labels}) or 0.0

    before = {m: value(m) for m in ("rewardplug_samples_total", "rewardplug_tokens_total",
                                    "rewardplug_invalid_samples_total", "rewardplug_request_latency_seconds_count",
                                    "rewardplug_batch_padded_tokens_count")}  # fmt: skip
    engine = make_engine(name="metrics-test")
    engine.score(TEXTS[:4])
    engine.score([{"prompt": "Hi"}], on_invalid="none")
    stats = engine.stats()
    assert value("rewardplug_samples_total") - before["rewardplug_samples_total"] == 5
    assert value("rewardplug_tokens_total") - before["rewardplug_tokens_total"] == stats["real_tokens"]
    assert value("rewardplug_invalid_samples_total") - before["rewardplug_invalid_samples_total"] == 1
    assert value("rewardplug_request_latency_seconds_count") - before["rewardplug_request_latency_seconds_count"] == 2
    assert value("rewardplug_batch_padded_tokens_count") - before["rewardplug_batch_padded_tokens_count"] == stats["batches"]


def test_metrics_sink_is_pluggable(make_engine, model):
    class Recorder:
        def __init__(self):
            self.counts, self.observed = {}, {}

        def count(self, name, value):
            self.counts[name] = self.counts.get(name, 0) + value

        def observe(self, name, value):
            self.observed.setdefault(name, []).append(value)

    sink = Recorder()
    engine = make_engine(metrics=sink)
    engine.score(TEXTS[:3])
    assert sink.counts["samples"] == 3 and sink.counts["requests"] == 1
    assert sink.counts["real_tokens"] == engine.stats()["real_tokens"]
    assert len(sink.observed["request_latency_seconds"]) == 1
    with pytest.raises(ValueError, match="metrics must be"):
        make_engine(metrics="statsd")


def test_stats_since_gives_each_consumer_its_own_deltas(make_engine, model):
    engine = make_engine()
    engine.score(TEXTS[:3])
    first = engine.stats(since="trainer")
    assert first["samples"] == 3 and first["requests"] == 1 and first["latency_p50_ms"] > 0
    engine.score(TEXTS[3:5])
    step = engine.stats(since="trainer")
    assert step["samples"] == 2 and step["requests"] == 1
    assert step["real_tokens"] == sum(model.encode(s).num_tokens for s in TEXTS[3:5])
    idle = engine.stats(since="trainer")
    assert idle["samples"] == 0 and idle["latency_p50_ms"] == 0.0 and idle["padding_efficiency"] == 1.0
    assert engine.stats(since="other")["samples"] == 5  # another consumer: since start
    assert engine.stats()["samples"] == 5  # cumulative unchanged


def test_ray_metrics_sink_records_through_rays_api(model, caplog):
    """metrics="ray" (for Serve replicas): Ray's Counter/Histogram accept every name, tag and value the
    engine sends (a sink failure would be logged, never raised, so the log is what is checked).
    Starts Ray: run under the shared Ray lock."""
    import logging

    ray = pytest.importorskip("ray")
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        engine = RewardEngine(model, metrics="ray", name="ray-metrics-test")
        with caplog.at_level(logging.WARNING, logger="rewardplug.engine.stats"):
            assert_scores(engine.score(TEXTS[:3]), independent(model, TEXTS[:3]))
            engine.score([{"prompt": "Hi"}], on_invalid="none")
        engine.close(timeout=30)
        assert not [r for r in caplog.records if "metrics sink failed" in r.getMessage()]
        from rewardplug.engine import metrics

        assert set(metrics._ray) >= {"samples", "invalid_samples", "request_latency_seconds", "batch_padded_tokens"}
    finally:
        ray.shutdown()


def test_small_request_does_not_wait_behind_all_of_a_large_one_being_scored(make_engine, model):
    engine = make_engine(max_batch_tokens=1024, max_batch_size=8, max_wait_ms=1)
    large_samples = [{"prompt": f"Question {k}?", "completion": text_of_length(120, k)} for k in range(480)]
    large = engine.submit(large_samples)
    deadline = time.monotonic() + 60
    while engine.stats()["batches"] < 1:  # the large request is encoded and being scored
        assert time.monotonic() < deadline and not large.done()
        time.sleep(0.001)
    small = engine.submit(TEXTS[:1])
    assert_scores(small.result(timeout=60), independent(model, TEXTS[:1]))
    assert not large.done()  # the small one went in a round between the large one's rounds
    got = large.result(timeout=120)
    picked = list(range(0, 480, 37))
    assert_scores([got[k] for k in picked], independent(model, [large_samples[k] for k in picked]))


def test_batches_read_scores_once_and_the_next_batch_is_launched_first(make_engine, model, grpo, mixed, monkeypatch):
    """Each pass leaves its scores on the device; a batch's scores are read once, when it is finished (on a
    GPU, reading is the synchronisation), and within a round (here one: everything fits 4 x max_batch_tokens)
    batch k+1 is launched before batch k is read, so the device does not wait for the host between batches."""
    from rewardplug.engine.runner import ModelRunner

    events: list[tuple] = []
    real_cpu, real_launch, real_finish = torch.Tensor.cpu, ModelRunner.launch, ModelRunner.finish
    real_head = type(model)._head
    numbers: dict[int, int] = {}

    def counted_cpu(self, *args, **kwargs):
        if self.is_floating_point():  # scores (the host's own integer tensors are not read from a device)
            events.append(("read", self.shape[0]))
        return real_cpu(self, *args, **kwargs)

    def counted_head(self, hidden, last_index):
        events.append(("pass",))
        return real_head(self, hidden, last_index)

    def launch(self, units):
        launched = real_launch(self, units)
        launched.number = numbers[len(numbers)] = len(numbers)
        events.append(("launched", launched.number))
        return launched

    def finish(self, launched):
        events.append(("finish", launched.number))
        return real_finish(self, launched)

    monkeypatch.setattr(torch.Tensor, "cpu", counted_cpu)
    monkeypatch.setattr(type(model), "_head", counted_head)
    monkeypatch.setattr(ModelRunner, "launch", launch)
    monkeypatch.setattr(ModelRunner, "finish", finish)
    engine = make_engine(max_batch_tokens=4096, max_batch_size=4)
    samples = grpo[0] + mixed[0]
    assert sum(e.num_tokens for e in model.encode_many(samples)[0]) <= 4 * 4096  # one round
    assert_scores(engine.score(samples), grpo[1] + mixed[1], "pipelined batches")
    batches = len(numbers)
    assert batches >= 3 and sum(1 for e in events if e[0] == "pass") > batches
    position = {e: k for k, e in enumerate(events) if e[0] in ("launched", "finish")}
    for k in range(batches - 1):
        assert position[("launched", k + 1)] < position[("finish", k)], " ".join(str(e) for e in events if e[0] != "pass")  # launched before k is read
    for k in range(batches):  # between a batch's finish and the next event: exactly one read, of its scores
        after = events[position[("finish", k)] + 1 :]
        reads = [e for e in after[: next((j for j, e in enumerate(after) if e[0] != "read"), len(after))]]
        assert len(reads) == 1, (k, events)
    assert sum(e[1] for e in events if e[0] == "read") == len(samples)  # every score read once, nothing else


def test_next_batch_is_launched_before_the_last_one_is_read_across_rounds(make_engine, model, monkeypatch):
    """Pipelining does not stop at a round's end: the first batch of round r+1 is launched before the
    last batch of round r is read, and between a launch and the read of the batch before it nothing reads
    a float tensor (.cpu, .item, .tolist, .numpy: on a GPU each would wait for the device)."""
    from rewardplug.engine.runner import ModelRunner
    from rewardplug.engine.scheduler import Scheduler

    events: list[tuple] = []
    real_launch, real_finish, real_plan = ModelRunner.launch, ModelRunner.finish, Scheduler._plan
    round_of: dict[int, int] = {}
    rounds = [0]

    def plan(self, items):
        batches = real_plan(self, items)
        rounds[0] += 1
        for b in batches:
            round_of[id(b.units[0])] = rounds[0]
        return batches

    def launch(self, units):
        launched = real_launch(self, units)
        launched.number = len([e for e in events if e[0] == "launched"])
        events.append(("launched", launched.number, round_of[id(units[0])]))
        return launched

    def finish(self, launched):
        events.append(("finish", launched.number))
        return real_finish(self, launched)

    def reading(name):
        real = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            if self.is_floating_point():
                events.append(("read", name))
            return real(self, *args, **kwargs)

        return read

    for name in ("cpu", "item", "tolist", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, reading(name))
    monkeypatch.setattr(Scheduler, "_plan", plan)
    monkeypatch.setattr(ModelRunner, "launch", launch)
    monkeypatch.setattr(ModelRunner, "finish", finish)
    engine = make_engine(max_batch_tokens=256, max_batch_size=4, share_prefix=True)
    samples = [{"prompt": f"Question {k % 7}?", "completion": text_of_length(20 + 7 * k, k)} for k in range(40)]
    assert sum(e.num_tokens for e in model.encode_many(samples)[0]) > 3 * 4 * 256  # several rounds
    assert_scores(engine.score(samples), independent(model, samples), "pipelined across rounds")
    launches = [e for e in events if e[0] == "launched"]
    round_ends = [k for k in range(len(launches) - 1) if launches[k][2] != launches[k + 1][2]]
    assert len(round_ends) >= 2, launches
    position = {e[:2]: k for k, e in enumerate(events) if e[0] in ("launched", "finish")}
    for k in range(len(launches) - 1):
        assert position[("launched", k + 1)] < position[("finish", k)], (k, k in round_ends, events)
        between = events[position[("launched", k + 1)] + 1 : position[("finish", k)]]
        assert not [e for e in between if e[0] == "read"], (k, between)


def test_encoder_processes_give_the_same_scores_and_are_closed_with_the_engine(model, grpo, mixed, monkeypatch):
    """encode_processes=True: requests are encoded in worker processes (shared-memory handoff); scores
    equal in-process encoding's, every sharing path still works (vision cache, prefixes, duplicates),
    and close() stops the processes and leaves no shared-memory segment."""
    import glob
    import os

    engine = RewardEngine(model, encode_workers=2, encode_processes=True)
    try:
        pids = engine._processes.pids()
        assert len(pids) == 2

        def in_this_process(samples):
            raise AssertionError("encoded in the engine's process, not in its encoder processes")

        monkeypatch.setattr(model, "encode_many", in_this_process)
        samples = grpo[0] + mixed[0]
        futures = [engine.submit(samples[k : k + 5]) for k in range(0, len(samples), 5)]  # several requests at once
        got = [score for f in futures for score in f.result(timeout=120)]
        assert_scores(got, grpo[1] + mixed[1], "encoded in processes")
        assert_scores(engine.score(grpo[0] + grpo[0][:3]), grpo[1] + grpo[1][:3], "duplicates, encoded in processes")
        stats = engine.stats()
        assert stats["prefix_hits"] > 0 and stats["duplicate_hits"] >= 3
    finally:
        engine.close(timeout=60)
    assert engine._processes.alive() == 0
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not glob.glob(f"/dev/shm/rp-enc-{engine._processes._id}-*")  # this pool's segments (others run beside)


@pytest.mark.parametrize("outcome", ["scores", "invalid", "failure"])
def test_a_requests_room_and_counters_are_released_before_its_answer_is_visible(outcome):
    """A caller woken by the answer may submit again at once (a pool handle's max_pending_samples, the
    engine's admission): the request's bookkeeping must be done before its future resolves."""
    from rewardplug.engine.pending import PendingRequest

    seen = []
    pending = PendingRequest(2, "raise", on_done=lambda p: seen.append(p.future.done()))
    if outcome == "failure":
        pending.fail(RuntimeError("device lost"))
    else:
        pending.resolve([0, 1], [1.0, None], {1: "bad image"} if outcome == "invalid" else {})
    assert pending.future.done() and seen == [False]
