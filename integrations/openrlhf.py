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

- ``use_scorer(scorer)`` called in the process (a RewardPool, RewardEngine or RewardModel);
- ``REWARDPLUG_URL`` (+ ``REWARDPLUG_API_KEY``): a rewardplug HTTP service, through RewardClient;
- ``REWARDPLUG_POOL``: the named pool, get-or-create with ``REWARDPLUG_MODEL`` (options as JSON in
  ``REWARDPLUG_POOL_OPTIONS``, e.g. ``{"num_replicas": 2}``), else ``RewardPool.connect``;
  ``REWARDPLUG_RAY_ADDRESS`` names the Ray cluster when the process is not already in one.

Images come from the labels and the policy's chat format is re-rendered into the reward model's
template (see ``rewardplug.serving.get_reward`` for the label layout). A query that cannot be scored gets
``REWARDPLUG_INVALID_REWARD`` (default 0.0) and ``rm_invalid = 1`` in ``extra_logs``. A system failure
(``ScoringError``) is raised; note that OpenRLHF's executor logs a raised error and leaves that sample's
reward empty, which fails the step when the rewards are gathered.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from typing import Any

from ..errors import InvalidSampleError
from ..serving.get_reward import assemble, build_batch

logger = logging.getLogger(__name__)

_scorer: Any = None
_lock = threading.Lock()


def use_scorer(scorer: Any) -> None:
    """Score this process's ``reward_func`` calls with ``scorer`` (anything with ``score(samples,
    on_invalid=...)``: a RewardPool, RewardEngine, RewardModel or RewardClient); None resets."""
    global _scorer
    with _lock:
        _scorer = scorer


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
    from ..serving.pool import RewardPool

    address = os.environ.get("REWARDPLUG_RAY_ADDRESS")
    if model:
        options = json.loads(os.environ.get("REWARDPLUG_POOL_OPTIONS") or "{}")
        return RewardPool(model, name=name, address=address, **options)
    return RewardPool.connect(name, address=address)


def _current_scorer() -> Any:
    global _scorer
    with _lock:
        if _scorer is None:
            _scorer = scorer_from_env()
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


def reward_func(queries: list[str], prompts: list[str], labels: list) -> dict:
    """OpenRLHF's custom reward function: ``{"rewards", "scores", "extra_logs"}``, one entry per query.

    ``rewards`` and ``scores`` are the reward model's scores (the fallback for a query that cannot be
    scored); ``extra_logs`` holds per-query ``rm_score``, ``rm_invalid`` and ``rm_truncated`` (1.0 when the
    response ended without an end-of-turn token), which OpenRLHF logs as means.
    """
    fallback = float(os.environ.get("REWARDPLUG_INVALID_REWARD", "0.0"))
    batch = build_batch(list(queries), list(prompts) if prompts is not None else None,
                        list(labels) if labels is not None else None)  # fmt: skip
    index = batch.to_score
    scores: dict[int, float] = {}
    errors: dict[int, str] = {}
    if index:
        values, bad = score_samples(_current_scorer(), [batch.samples[i] for i in index])
        scores = {index[k]: v for k, v in enumerate(values) if v is not None}
        errors = {index[k]: reason for k, reason in bad.items()}
    out = assemble(batch, scores, errors, fallback)
    out.pop("errors")  # OpenRLHF reads rewards, scores and extra_logs; reasons were logged
    return out
