"""rewardplug as ``reward_funcs`` for TRL's GRPOTrainer and RLOOTrainer (TRL 1.16).

TRL calls a reward function with keywords only: ``prompts``, ``completions``, ``completion_ids`` and
every dataset column (``image`` / ``images`` among them), plus ``trainer_state``, ``log_metric`` and
``log_extra``; it wants one float (or None, which it masks) per completion.

>>> from rewardplug import RewardPool
>>> from rewardplug.integrations.trl import RewardFunction
>>> reward = RewardFunction(RewardPool("Skywork/Skywork-VL-Reward-7B"))  # doctest: +SKIP
>>> trainer = GRPOTrainer(model=policy, reward_funcs=[reward], args=config, train_dataset=ds)  # doctest: +SKIP

A RewardFunction is not an ``nn.Module`` on purpose: TRL would take a module for a text-only
sequence classifier. ``AsyncRewardFunction`` has ``async def __call__``: TRL runs it on its event loop,
concurrently with its other async rewards.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from typing import Any, Sequence

from ..errors import InvalidSampleError

logger = logging.getLogger(__name__)

# End-of-turn ids of Qwen2/2.5-VL policies: <|im_end|>, <|endoftext|>.
QWEN_EOS_IDS = (151645, 151643)
TRUNCATED = ("score", "none")


class RunningNorm:
    """Running mean and standard deviation (Welford), one per key (e.g. per data source)."""

    def __init__(self, eps: float = 1e-6):
        self.eps = eps
        self._state: dict[Any, list[float]] = {}  # key -> [count, mean, M2]
        self._lock = threading.Lock()

    def __getstate__(self):
        return {"eps": self.eps, "_state": self._state}

    def __setstate__(self, state):
        self.__dict__.update(state, _lock=threading.Lock())

    def __call__(self, values: list[float | None], keys: Sequence[Any]) -> list[float | None]:
        with self._lock:
            for v, k in zip(values, keys):
                if v is None or math.isnan(v):
                    continue
                n, mean, m2 = self._state.setdefault(k, [0, 0.0, 0.0])
                n += 1
                delta = v - mean
                mean += delta / n
                m2 += delta * (v - mean)
                self._state[k] = [n, mean, m2]
            out = []
            for v, k in zip(values, keys):
                if v is None:
                    out.append(None)
                    continue
                n, mean, m2 = self._state.get(k, [0, 0.0, 0.0])
                std = math.sqrt(m2 / (n - 1)) if n > 1 else 1.0
                out.append((v - mean) / (std + self.eps))
            return out


class RewardFunction:
    """A TRL reward function backed by a RewardModel, RewardEngine, RewardPool, or a model id/path.

    scorer: a RewardModel, RewardEngine or RewardPool; or a hub id / folder, loaded as a RewardPool
        (``pool_options`` go to it) so scoring runs on the pool's GPUs, not the trainer's.
    name: the name TRL logs under (default "reward_model").
    on_error: "none" (default): a sample that cannot be scored gets None, which TRL masks, and the
        reason is logged; "raise": the training step fails with InvalidSampleError.
    truncated: what a completion that ended without an end-of-turn token (it hit the length limit)
        gets: "score" (scored as is, the chat template closes the turn), "none" (masked), or a fixed
        float penalty. Truncation is read from ``completion_ids``; its share is logged either way.
    eos_token_ids: the policy's end-of-turn ids (default: <|im_end|> and <|endoftext|> of the reward
        model's tokenizer when it is in this process, else Qwen's ids; Qwen-family policies share them).
    normalize: None, or "running": (score - running mean) / running std, per value of the
        ``normalize_by`` column (e.g. "data_source") or over everything.
    clip: None, a float c (clip to [-c, c]) or a (low, high) pair; applied after normalization.
    log_every: call the scorer's stats() (and log cache and latency figures) every this many calls.
    """

    def __init__(
        self,
        scorer: Any,
        *,
        name: str | None = None,
        on_error: str = "none",
        truncated: str | float = "score",
        eos_token_ids: Sequence[int] | None = None,
        normalize: str | None = None,
        normalize_by: str | None = None,
        clip: float | tuple[float, float] | None = None,
        log_every: int = 1,
        **pool_options: Any,
    ):
        if on_error not in ("none", "raise"):
            raise ValueError(f"on_error must be 'none' or 'raise', got {on_error!r}")
        if not (truncated in TRUNCATED or isinstance(truncated, int | float)):
            raise ValueError(f"truncated must be 'score', 'none' or a float penalty, got {truncated!r}")
        if normalize not in (None, "running"):
            raise ValueError(f"normalize must be None or 'running', got {normalize!r}")
        if isinstance(scorer, str | os.PathLike):
            from ..serving.pool import RewardPool

            scorer = RewardPool(scorer, **pool_options)
        elif pool_options:
            raise TypeError(f"options {sorted(pool_options)} apply only when scorer is a model id or path")
        self.scorer = scorer
        self.__name__ = name or "reward_model"
        self.on_error = on_error
        self.truncated = truncated
        self.eos_token_ids = set(eos_token_ids if eos_token_ids is not None else _eos_ids(scorer))
        self.normalize_by = normalize_by
        self.norm = RunningNorm() if normalize == "running" else None
        self.clip = (-clip, clip) if isinstance(clip, int | float) else clip
        self.log_every = log_every
        self._calls = 0
        self._last_stats: dict = {}

    def __getstate__(self):
        from ..serving.pool import RewardPool

        if not isinstance(self.scorer, RewardPool):
            raise TypeError(
                "a RewardFunction pickles only when backed by a RewardPool (a model or engine lives in this "
                "process); TRL's AsyncGRPOTrainer runs rewards in a spawned process: pass a RewardPool"
            )
        return self.__dict__

    # ---- building samples -----------------------------------------------------------------------

    def samples(self, prompts: list, completions: list, **kwargs: Any) -> list[dict]:
        """One rewardplug sample per (prompt, completion), with the row's images."""
        images = kwargs.get("images")
        if images is None and kwargs.get("image") is not None:
            images = [[im] if im is not None else [] for im in kwargs["image"]]
        out = []
        for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
            row_images = images[i] if images is not None else None
            out.append({"prompt": prompt, "completion": completion, "images": list(row_images or [])})
        return out

    def _truncated_rows(self, completion_ids: list | None) -> list[bool]:
        if completion_ids is None:
            return []
        return [bool(len(ids)) and int(ids[-1]) not in self.eos_token_ids for ids in completion_ids]

    # ---- calls ----------------------------------------------------------------------------------

    def __call__(self, prompts: list, completions: list, completion_ids: list | None = None, **kwargs: Any) -> list:
        samples = self.samples(prompts, completions, **kwargs)
        start = time.perf_counter()
        try:
            scores = self.scorer.score(samples, on_invalid="raise")
            errors: dict = {}
        except InvalidSampleError as e:
            if self.on_error == "raise":
                raise
            # A RewardModel raises before any compute (no e.scores): score the rest now.
            scores = e.scores if e.scores is not None else self.scorer.score(samples, on_invalid="none")
            errors = e.errors
        return self._finish(scores, errors, completion_ids, kwargs, time.perf_counter() - start)

    def _finish(self, scores: list, errors: dict, completion_ids, kwargs: dict, seconds: float) -> list:
        for i, reason in list(errors.items())[:5]:
            logger.warning("%s: sample %d not scored (masked): %s", self.__name__, i, reason)
        raw = list(scores)
        truncated = self._truncated_rows(completion_ids)
        if self.truncated != "score":
            for i, cut in enumerate(truncated):
                if cut:
                    scores[i] = None if self.truncated == "none" else float(self.truncated)
        if self.norm is not None:
            keys = kwargs.get(self.normalize_by) if self.normalize_by else None
            scores = self.norm(scores, keys if keys is not None else [None] * len(scores))
        if self.clip is not None:
            low, high = self.clip
            scores = [None if s is None else min(max(s, low), high) for s in scores]
        self._log(kwargs, raw, errors, truncated, seconds)
        return scores

    def _log(self, kwargs: dict, raw: list, errors: dict, truncated: list, seconds: float) -> None:
        log = kwargs.get("log_metric")
        self._calls += 1
        if log is None:
            return
        valid = [s for s in raw if s is not None]
        name = self.__name__
        log(f"{name}/latency_ms", seconds * 1e3)
        log(f"{name}/invalid_frac", len(errors) / max(len(raw), 1))
        log(f"{name}/truncated_frac", sum(truncated) / max(len(truncated), 1))
        if valid:
            log(f"{name}/raw_mean", sum(valid) / len(valid))
        if self._calls % self.log_every == 0:
            stats = self.scorer.stats() if hasattr(self.scorer, "stats") else {}
            for key in ("prefix_hits", "vision_hits", "vision_misses", "padding_efficiency", "latency_p99_ms",
                        "engine_prefix_hits", "engine_vision_hits", "retries"):  # fmt: skip
                if key in stats and isinstance(stats[key], int | float):
                    log(f"{name}/{key}", float(stats[key]))


class AsyncRewardFunction(RewardFunction):
    """Same as RewardFunction, with ``async def __call__``: TRL awaits it on its own event loop, next to
    its other async reward functions, while the scorer's engine or pool does the work."""

    async def __call__(self, prompts: list, completions: list, completion_ids: list | None = None, **kwargs: Any):
        samples = self.samples(prompts, completions, **kwargs)
        start = time.perf_counter()
        ascore = getattr(self.scorer, "ascore", None)
        if ascore is None:
            import asyncio

            ascore = lambda s, **kw: asyncio.to_thread(self.scorer.score, s, **kw)  # noqa: E731 - a RewardModel
        try:
            scores, errors = await ascore(samples, on_invalid="raise"), {}
        except InvalidSampleError as e:
            if self.on_error == "raise":
                raise
            scores, errors = (e.scores if e.scores is not None else await ascore(samples, on_invalid="none")), e.errors
        return self._finish(scores, errors, completion_ids, kwargs, time.perf_counter() - start)


def _eos_ids(scorer: Any) -> tuple[int, ...]:
    model = getattr(scorer, "model", scorer)
    tokenizer = getattr(getattr(model, "processor", None), "tokenizer", None)
    if tokenizer is None:
        return QWEN_EOS_IDS
    return tuple(tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>"))
