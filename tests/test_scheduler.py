"""Token-budget planning (rewardplug.engine.scheduler) on WorkItems built from really encoded samples.

What a user relies on: every forward pass the engine plans stays within ``max_batch_tokens`` padded
tokens (rows x longest row) and ``max_batch_size`` rows unless one row alone is longer; every sample is
planned exactly once; only samples with the same prompt (tokens and images) share a prefix.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest
from conftest import random_image

from rewardplug.engine.scheduler import BatchPlan, Unit, make_item, make_units, plan_batches

BUDGETS = [(64, 2), (128, 3), (300, 4), (1000, 8), (16384, 64)]


def _text(n: int, seed: int) -> str:
    rng = random.Random(seed)
    words = ["red", "circle", "noise", "pixel", "blue", "the", "a", "picture", "shows", "maybe"]
    out = ""
    while len(out) < n:
        out += rng.choice(words) + " "
    return out[:n]


def _samples() -> list[dict]:
    a, b, c = random_image(56, 56, seed=1), random_image(150, 100, seed=2), random_image(90, 70, seed=3)
    samples = []
    # GRPO-like groups: one prompt, several completions of very different lengths.
    for p, (prompt, images, lengths) in enumerate([
        ("What is in the picture?", [a], [1, 7, 40, 120, 200, 3]),
        ("Describe the colours in detail, please.", [b], [15, 90, 2, 160]),
        ("Compare the two pictures.", [a, c], [5, 60, 180, 30, 11]),
        ("Tell me a joke.", [], [1, 25, 100, 50, 4, 70, 140, 9]),
    ]):  # fmt: skip
        samples += [{"prompt": prompt, "completion": _text(n, 100 * p + n), "images": images} for n in lengths]
    # Singles: unique prompts, an answer that holds an image, and an exact duplicate.
    samples.append({"prompt": "Is it square?", "completion": "Yes.", "images": [c]})
    samples.append({"prompt": "Hi", "completion": "Hello there!"})
    samples.append({"prompt": "Draw it.", "completion": [{"role": "assistant", "content": [
        {"type": "image", "image": b}, {"type": "text", "text": "Here it is."}]}]})  # fmt: skip
    samples.append(dict(samples[0]))
    return samples


@pytest.fixture(scope="module")
def im_start(model):
    return model.processor.tokenizer.convert_tokens_to_ids("<|im_start|>")


@pytest.fixture(scope="module")
def items(model, im_start):
    return [make_item(model.encode(s), im_start, owner=None, index=i) for i, s in enumerate(_samples())]


def _passes(plan: BatchPlan) -> list[tuple[int, int]]:
    """(rows, longest) of each forward pass the runner makes for ``plan``, bounding the chunked suffix
    passes by one pass over all suffix rows (the most padding they can have)."""
    singles = [u.items[0] for u in plan.units if not u.shared]
    groups = [u for u in plan.units if u.shared]
    passes = []
    if singles:
        passes.append((len(singles), max(i.num_tokens for i in singles)))
    if groups:
        passes.append((len(groups), max(g.items[0].prefix_len for g in groups)))
        suffixes = [i.num_tokens - g.items[0].prefix_len for g in groups for i in g.items]
        passes.append((len(suffixes), max(suffixes)))
    return passes


def test_make_item_keys(model, im_start):
    samples = _samples()
    enc = [model.encode(s) for s in samples]
    it = [make_item(e, im_start) for e in enc]
    # The same sample twice: same identity key; same prompt, other answer: same prefix key only.
    assert it[0].key == it[-1].key
    assert it[0].key != it[1].key
    assert it[0].prefix_key == it[1].prefix_key and it[0].prefix_len == it[1].prefix_len > 0
    # The prefix ends right after the last <|im_start|> and holds every image token of the sample.
    for item, e in zip(it, enc):
        if item.prefix_len:
            assert int(e.input_ids[item.prefix_len - 1]) == im_start
            assert int((e.input_ids[item.prefix_len :] == im_start).sum()) == 0
            assert not bool(e.mm_token_type_ids[item.prefix_len :].any())
    # Different prompts (or the same text with other images) never share a prefix key.
    prompts = {(s["prompt"] if isinstance(s["prompt"], str) else "", len(s.get("images", []))) for s in samples}
    keys = {i.prefix_key for i in it if i.prefix_len}
    assert len(keys) == len(prompts) - 1  # minus the answer-with-image sample, which shares nothing
    # The same text with another image: other identity and other prefix key.
    other = make_item(model.encode({**samples[0], "images": [random_image(56, 56, seed=99)]}), im_start)
    assert other.key != it[0].key and other.prefix_key != it[0].prefix_key
    # An answer that holds an image: nothing can be shared.
    draw = it[-2]
    assert bool(enc[-2].mm_token_type_ids.any())
    assert draw.prefix_len == 0 and draw.prefix_key == b""


def test_make_units(items):
    flat = make_units(items, share_prefix=False)
    assert all(not u.shared and u.rows == 1 for u in flat)
    assert sorted(id(i) for u in flat for i in u.items) == sorted(id(i) for i in items)

    units = make_units(items, share_prefix=True)
    assert sorted(id(i) for u in units for i in u.items) == sorted(id(i) for i in items)
    for u in units:
        if u.shared:
            assert u.rows >= 2
            assert len({i.prefix_key for i in u.items}) == 1 and u.items[0].prefix_len > 0
        else:
            assert u.rows == 1
    # 4 GRPO groups; the first one also holds the duplicate of its first sample.
    assert sorted(u.rows for u in units if u.shared) == [4, 5, 7, 8]
    assert [u.longest for u in units] == sorted(u.longest for u in units)


@pytest.mark.parametrize("share_prefix", [True, False])
@pytest.mark.parametrize("max_tokens,max_rows", BUDGETS)
def test_plan_batches_respects_budgets(items, share_prefix, max_tokens, max_rows):
    units = make_units(list(items), share_prefix)
    plans = plan_batches(units, max_tokens, max_rows)

    planned = [i for p in plans for u in p.units for i in u.items]
    assert Counter(map(id, planned)) == Counter(map(id, items)), "every sample planned exactly once"
    for plan in plans:
        assert plan.units
        alone = len(plan.units) == 1 and plan.units[0].rows == 1
        for rows, longest in _passes(plan):
            if alone:
                continue  # one sample over the budget runs alone
            assert rows * longest <= max_tokens, (rows, longest, max_tokens)
            assert rows <= max_rows, (rows, max_rows)
        for u in plan.units:
            if u.shared:
                assert u.rows >= 2 and len({i.prefix_key for i in u.items}) == 1
                assert not share_prefix or u.items[0].prefix_len > 0
            else:
                assert u.rows == 1
        # A sample over the budget is never packed with others.
        for u in plan.units:
            for i in u.items:
                if i.num_tokens > max_tokens:
                    assert alone
    if max_tokens >= sum(i.num_tokens for i in items) and max_rows >= len(items):
        assert len(plans) == 1
    # The row budget alone forces at least this many plans.
    assert len(plans) >= -(-len(items) // max_rows)


def test_tiny_budget_splits_oversized_groups(items):
    units = make_units(list(items), share_prefix=True)
    group = max((u for u in units if u.shared), key=lambda u: u.rows)  # the 8-completion text group
    plans = plan_batches([group], 128, 2)
    parts = [u for p in plans for u in p.units]
    assert len(parts) >= 4  # 8 rows, 2 per pass
    assert sorted(id(i) for u in parts for i in u.items) == sorted(id(i) for i in group.items)
    for u in parts:
        assert u.rows <= 2
        if u.shared:  # a sub-group re-encodes the prefix and keeps the budget
            p = u.items[0].prefix_len
            assert p + u.rows * max(i.num_tokens - p for i in u.items) <= 128 or u.rows == 1


def test_oversized_single_runs_alone(items):
    big = max(items, key=lambda i: i.num_tokens)
    small = sorted(items, key=lambda i: i.num_tokens)[:3]
    budget = big.num_tokens - 1
    plans = plan_batches([Unit([i], False) for i in small + [big]], budget, 64)
    with_big = [p for p in plans if any(i is big for u in p.units for i in u.items)]
    assert len(with_big) == 1 and len(with_big[0].units) == 1
    assert sum(len(p.units) for p in plans) == 4


def test_big_budget_is_one_batch(items):
    plans = plan_batches(make_units(list(items), True), 10**6, 10**3)
    assert len(plans) == 1
