"""rewardplug as OpenRLHF's ``reward_func`` (``--reward.remote_url /path/to/reward_func.py``), OpenRLHF 0.11.

OpenRLHF loads the file and calls ``reward_func(queries, prompts, labels)`` in a worker thread, one query
per call, on each rollout worker. This one scores through a named RewardPool that every caller shares,
so the pool batches the concurrent calls of all workers on its replicas:

    # examples/openrlhf_reward_func.py
    from rewardplug.integrations.openrlhf import reward_func

    export REWARDPLUG_MODEL=Skywork/Skywork-VL-Reward-7B REWARDPLUG_POOL=skywork-rm
    python -m openrlhf.cli.train_ppo_ray ... --reward.remote_url examples/openrlhf_reward_func.py \\
        --data.label_key label

Where the scores come from (first match; read once per process):

- ``use_pool(pool)`` called in the process (in the reward file): a ``PoolConfig``, whose pool is found
  or made on the first call (give it a name, so every worker shares one pool), or a running RewardPool;
- ``use_scorer(scorer)``: any scorer (a RewardPool, RewardEngine, RewardModel or RewardClient);
- ``REWARDPLUG_URL`` (+ ``REWARDPLUG_API_KEY``): a rewardplug HTTP service, through RewardClient;
- ``REWARDPLUG_POOL``: the named pool, get-or-create with ``REWARDPLUG_MODEL`` (its options as JSON in
  ``REWARDPLUG_POOL_OPTIONS``, e.g. ``{"num_replicas": 2}``: PoolConfig fields and model/engine options,
  made into one PoolConfig; an unknown name is a TypeError naming it), else attached to as it runs (then
  ``REWARDPLUG_POOL_OPTIONS`` holds only this handle's options, such as ``request_timeout_s``);
  ``REWARDPLUG_RAY_ADDRESS`` names the Ray cluster when the process is not already in one.

Images come from the labels and the policy's chat format is re-rendered into the reward model's
template (see ``rewardplug.get_reward`` for the label layout).

A query that cannot be scored follows ``REWARDPLUG_ON_INVALID``, the same option and default as in every
adapter: "raise" (default) raises InvalidSampleError naming each bad query and its reason (logged at
ERROR); a float is its reward, with ``rm_invalid = 1`` in ``extra_logs``. "none" is refused: OpenRLHF has
no per-sample mask (``NO_MASK``). ``REWARDPLUG_INVALID_REWARD=<float>`` is the old spelling of
``REWARDPLUG_ON_INVALID=<float>``. A system failure (``ScoringError``) is raised too. OpenRLHF's executor
logs a raised error (at INFO) and leaves that sample's reward empty, which fails the step when the
rewards are gathered (``'NoneType' object has no attribute 'to'``): the reason is in rewardplug's log.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import warnings
from typing import Any

from ..errors import InvalidSampleError
from ..serving.config import PoolConfig
from ..get_reward import assemble, build_batch
from .on_invalid import DEFAULT as ON_INVALID_DEFAULT
from .on_invalid import parse_on_invalid, raise_hint
from .pools import connect_pool, open_pool

logger = logging.getLogger(__name__)

ON_INVALID_ENV, OLD_ENV = "REWARDPLUG_ON_INVALID", "REWARDPLUG_INVALID_REWARD"
# Why on_invalid="none" is refused here (checked in OpenRLHF 0.11.2).
NO_MASK = ("OpenRLHF has no per-sample mask for rewards: a None reward fails the step, and its group_norm / "
           "reinforce_baseline advantages take rewards.mean(-1) of each group, so one NaN makes every advantage "
           "of its group NaN")  # fmt: skip

_scorer: Any = None  # a scorer, or a PoolConfig until the first call opens its pool
_lock = threading.Lock()


def use_scorer(scorer: Any) -> None:
    """Score this process's ``reward_func`` calls with ``scorer`` (anything with ``score(samples,
    on_invalid=...)``: a RewardPool, RewardEngine, RewardModel or RewardClient); None resets."""
    global _scorer
    with _lock:
        _scorer = scorer


def use_pool(pool: Any) -> None:
    """Score this process's ``reward_func`` calls through a pool: a ``PoolConfig`` (its pool is found or
    made on the first call; name it, so every rollout worker shares one) or a running RewardPool."""
    from ..serving.pool import RewardPool

    if not isinstance(pool, PoolConfig | RewardPool):
        raise TypeError(f"use_pool takes a rewardplug PoolConfig or a running RewardPool, got {type(pool).__name__}")
    use_scorer(pool)


def scorer_from_env() -> Any:
    """The scorer the environment names (see the module docstring)."""
    url = os.environ.get("REWARDPLUG_URL")
    if url:
        from ..serving.client import RewardClient

        return RewardClient(url, api_key=os.environ.get("REWARDPLUG_API_KEY"))
    name = os.environ.get("REWARDPLUG_POOL")
    model = os.environ.get("REWARDPLUG_MODEL")
    if not name and not model:
        raise RuntimeError(
            "rewardplug reward_func: set REWARDPLUG_POOL (and REWARDPLUG_MODEL to start it) or REWARDPLUG_URL"
        )
    address = os.environ.get("REWARDPLUG_RAY_ADDRESS")
    options = json.loads(os.environ.get("REWARDPLUG_POOL_OPTIONS") or "{}")
    if model:
        return open_pool(PoolConfig.from_kwargs(model, name=name, address=address, **options))
    return connect_pool(name, address=address, options=options)


def _current_scorer() -> Any:
    global _scorer
    with _lock:
        if _scorer is None:
            _scorer = scorer_from_env()
        elif isinstance(_scorer, PoolConfig):
            _scorer = open_pool(_scorer)
        return _scorer


def score_samples(scorer: Any, samples: list) -> tuple[list, dict]:
    """``(scores, {index: reason})`` from any scorer; system failures propagate."""
    try:
        return list(scorer.score(samples, on_invalid="raise")), {}
    except InvalidSampleError as e:
        if e.scores is not None:
            return list(e.scores), dict(e.errors)
        # A RewardModel refuses before any compute: score the good ones alone.
        good = [i for i in range(len(samples)) if i not in e.errors]
        scores: list = [None] * len(samples)
        for i, value in zip(good, scorer.score([samples[i] for i in good], on_invalid="raise") if good else []):
            scores[i] = value
        return scores, dict(e.errors)


def on_invalid_from_env() -> str | float:
    """``REWARDPLUG_ON_INVALID`` ("raise", the default, or a float reward); ``REWARDPLUG_INVALID_REWARD``
    is its old spelling (a float; DeprecationWarning)."""
    value, old = os.environ.get(ON_INVALID_ENV), os.environ.get(OLD_ENV)
    if old is not None:
        warnings.warn(f"{OLD_ENV} is deprecated: use {ON_INVALID_ENV}=<float> (the default is 'raise')",
                      DeprecationWarning, stacklevel=2)  # fmt: skip
        if value is None:
            value = old
        elif parse_on_invalid(value, where=ON_INVALID_ENV) != parse_on_invalid(old, where=OLD_ENV):
            raise ValueError(f"{ON_INVALID_ENV}={value!r} and {OLD_ENV}={old!r} disagree; set {ON_INVALID_ENV} only")
    return parse_on_invalid(value or ON_INVALID_DEFAULT, where=ON_INVALID_ENV, none_refused=NO_MASK)


def reward_func(queries: list[str], prompts: list[str], labels: list) -> dict:
    """OpenRLHF's custom reward function: ``{"rewards", "scores", "extra_logs"}``, one entry per query.

    ``rewards`` and ``scores`` are the reward model's scores (the ``REWARDPLUG_ON_INVALID`` reward for a
    query that cannot be scored; with "raise", the default, InvalidSampleError naming it instead);
    ``extra_logs`` holds per-query ``rm_score``, ``rm_invalid`` and ``rm_truncated`` (1.0 when the
    response ended without an end-of-turn token), which OpenRLHF logs as means.
    """
    on_invalid = on_invalid_from_env()
    batch = build_batch(list(queries), list(prompts) if prompts is not None else None,
                        list(labels) if labels is not None else None)  # fmt: skip
    index = batch.to_score
    scores: dict[int, float] = {}
    errors: dict[int, str] = {}
    if index:
        values, bad = score_samples(_current_scorer(), [batch.samples[i] for i in index])
        scores = {index[k]: v for k, v in enumerate(values) if v is not None}
        errors = {index[k]: reason for k, reason in bad.items()}
    errors = {**batch.errors, **errors}
    if errors and on_invalid == "raise":
        error = InvalidSampleError(errors)
        # OpenRLHF logs a raised error at INFO only: say here which queries and why.
        logger.error("rewardplug reward_func: %s\n%s", error, raise_hint(ON_INVALID_ENV + "={}", masks=False))
        raise error
    out = assemble(batch, scores, errors, on_invalid)
    out.pop("errors")  # OpenRLHF reads rewards, scores and extra_logs; reasons were logged
    return out
