"""Property-based fuzzing of sample dicts through a real engine (hypothesis).

Random nesting of messages, content items, types, roles, image sources and garbage. The property: a
request either gets finite scores or fails with InvalidSampleError naming its bad samples; never another
exception, never a hang (every wait has a timeout), never a dead engine (it still scores a known sample
exactly afterwards). Fixed example counts and deadlines keep it well under a minute.
"""

from __future__ import annotations

import base64
import math

import numpy as np
import pytest
from conftest import png_bytes, random_image
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rewardplug import InvalidSampleError, RewardEngine
from rewardplug.errors import SampleError
from rewardplug.images import ImagePolicy
from rewardplug.samples import to_conversation

SETTINGS = settings(
    max_examples=400, deadline=10_000, derandomize=True, suppress_health_check=list(HealthCheck), database=None
)
TIMEOUT = 60  # seconds per request: a hang fails the test instead of stalling it

IMAGES = [random_image(28, 28, seed=1), random_image(56, 30, seed=2), random_image(40, 60, seed=3, mode="RGBA")]
PNG = png_bytes(IMAGES[0])

garbage = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=True)
    | st.text(max_size=12) | st.binary(max_size=16),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)  # fmt: skip


@st.composite
def arrays(draw):
    shape = draw(st.sampled_from([(20, 20), (20, 20, 3), (20, 20, 4), (20, 20, 2), (0, 5, 3), (4,), (3, 3, 3, 3)]))
    dtype = draw(st.sampled_from([np.uint8, np.float32, np.int64]))
    return np.zeros(shape, dtype=dtype)


def image_sources(tmp_png: str):
    return st.one_of(
        st.sampled_from(IMAGES),
        st.just(PNG),
        st.binary(max_size=64),
        st.just("data:image/png;base64," + base64.b64encode(PNG).decode()),
        st.text(max_size=20).map(lambda t: "data:image/png;base64," + t),
        st.sampled_from([tmp_png, "file://" + tmp_png, "/nonexistent/x.png", "relative/missing.png",
                         "http://127.0.0.1:9/a.png", "ftp://host/a.png", "", "s3://b/k", "~nobody-here/a.png",
                         "a\x00b.png"]),
        st.fixed_dictionaries({"bytes": st.one_of(st.just(PNG), st.binary(max_size=8), garbage)}),
        st.fixed_dictionaries({"path": st.one_of(st.just(tmp_png), st.text(max_size=10))}),
        arrays(),
        garbage,
    )  # fmt: skip


def samples_strategy(tmp_png: str):
    image = image_sources(tmp_png)
    text = st.text(max_size=40)
    item = st.one_of(
        text,
        st.fixed_dictionaries({"type": st.just("text"), "text": st.one_of(text, garbage)}),
        st.fixed_dictionaries({"type": st.just("image")}, optional={"image": image}),
        st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.one_of(
            st.fixed_dictionaries({"url": image}), image)}),  # fmt: skip
        st.fixed_dictionaries({"image": image}),
        st.fixed_dictionaries({"type": st.sampled_from(["audio", "video", "input_audio", "Image", "file"]) | garbage},
                              optional={"text": text, "video": garbage}),  # fmt: skip
        st.dictionaries(st.text(max_size=6), garbage, max_size=2),
        garbage,
    )
    content = st.one_of(text, st.lists(item, max_size=4), garbage)
    role = st.one_of(st.sampled_from(["system", "user", "assistant", "assistant", "user", "tool", "System"]), garbage)
    message = st.one_of(st.fixed_dictionaries({"role": role, "content": content}), garbage)
    messages = st.lists(message, max_size=4)
    images = st.one_of(st.lists(image, max_size=3), image)
    ids = st.one_of(st.lists(st.integers(-5, 160_000), max_size=30), garbage)
    well_formed = st.fixed_dictionaries({  # near-valid samples, so the scoring paths get exercised too
        "prompt": st.sampled_from(["What is it?", "Describe the picture."]) | text,
        "completion": st.text(min_size=1, max_size=40),
        "images": st.lists(st.sampled_from(IMAGES) | image, max_size=2),
    })  # fmt: skip
    return st.one_of(
        well_formed,
        st.fixed_dictionaries({"messages": messages}, optional={"images": images}),
        st.fixed_dictionaries(
            {"prompt": st.one_of(text, messages, garbage), "completion": st.one_of(text, messages, message, garbage)},
            optional={"images": images, "image": image},
        ),
        st.fixed_dictionaries({"input_ids": ids}, optional={"images": images}),
        garbage,
    )


@pytest.fixture(scope="module")
def tmp_png(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "ok.png"
    IMAGES[1].save(path)
    return str(path)


@pytest.fixture(scope="module")
def engine(model):
    engine = RewardEngine(model, max_batch_tokens=2048, metrics=None, max_wait_ms=1)
    yield engine
    engine.close(timeout=30)


@pytest.fixture(scope="module")
def known(model):
    sample = {"prompt": "What is it?", "completion": "Dots.", "images": [IMAGES[0]]}
    return sample, model.score([sample])[0]


def test_fuzzed_samples_give_scores_or_invalid_sample_errors(engine, known, tmp_png):
    tried = {"requests": 0, "scored": 0, "invalid": 0}

    @SETTINGS
    @given(st.lists(samples_strategy(tmp_png), min_size=1, max_size=3))
    def check(batch):
        tried["requests"] += 1
        try:
            scores = engine.score(batch, timeout=TIMEOUT)
        except InvalidSampleError as e:
            tried["invalid"] += 1
            assert set(e.errors) <= set(range(len(batch))) and e.errors
            assert all(isinstance(reason, str) and reason for reason in e.errors.values())
            scores = [s for i, s in enumerate(e.scores) if i not in e.errors]
        else:
            tried["scored"] += 1
        assert all(isinstance(s, float) and math.isfinite(s) for s in scores)

    check()
    sample, score = known
    assert engine.score([sample], timeout=TIMEOUT)[0] == pytest.approx(score, abs=1e-4)  # alive and exact
    assert engine.stats()["scoring_errors"] == 0 and engine.stats()["healthy"]
    assert tried["requests"] >= 300 and tried["invalid"] > 0 and tried["scored"] > 0
    print(f"fuzz: {tried}")


def test_fuzzed_samples_only_raise_sample_error_when_normalized(tmp_png):
    """One layer down: turning any sample into a conversation either works or raises SampleError
    (whose message names the problem), never another exception type."""
    policy = ImagePolicy()

    @SETTINGS
    @given(samples_strategy(tmp_png))
    def check(sample):
        if isinstance(sample, dict) and "input_ids" in sample:
            return  # token samples are checked by the encoder, not to_conversation
        try:
            to_conversation(sample, policy)
        except SampleError as e:
            assert str(e)

    check()
