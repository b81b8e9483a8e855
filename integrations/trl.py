"""rewardplug as ``reward_funcs`` for TRL's GRPOTrainer and RLOOTrainer (TRL 1.16), and its AsyncGRPOTrainer.

TRL calls a reward function with keywords only: ``prompts``, ``completions``, ``completion_ids`` and
every dataset column (``image`` / ``images`` among them), plus ``trainer_state``, ``log_metric`` and
``log_extra``; it wants one float (or None, which it masks) per completion.

>>> from rewardplug.integrations.trl import RewardFunction
>>> reward = RewardFunction("Skywork/Skywork-VL-Reward-7B")  # doctest: +SKIP  (a named Ray pool, shared by all ranks)
>>> reward = RewardFunction(pool=PoolConfig(model="Skywork/Skywork-VL-Reward-7B", num_replicas=2))  # doctest: +SKIP
>>> trainer = GRPOTrainer(model=policy, reward_funcs=[reward], args=config, train_dataset=ds)  # doctest: +SKIP

Two kinds of failure, never mixed (see ``rewardplug.errors``): a bad sample (an image that cannot be
read, ...) follows ``on_invalid`` ("raise" by default, as in every adapter: the step fails naming it;
"none": None, which TRL masks; or a fixed fallback reward); a system failure (device error, lost
replica, timeout, a bug) raises ``ScoringError`` and the training step fails with its cause. No system
failure ever reaches TRL as None.

A RewardFunction is not an ``nn.Module`` on purpose: TRL would take a module for a text-only
sequence classifier. ``AsyncRewardFunction`` has ``async def __call__``: TRL runs it on its event loop,
concurrently with its other async rewards. ``PoolColocationCallback`` offloads a pool's weights
during the optimizer step (vLLM colocate style).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import threading
import time
import uuid
import warnings
from typing import TYPE_CHECKING, Any, Callable, Sequence

from ..errors import InvalidSampleError, RewardPlugError, ScoringError
from ..serving.config import PoolConfig, split_options
from .on_invalid import DEFAULT as ON_INVALID_DEFAULT
from .on_invalid import parse_on_invalid, raise_hint
from .pools import config_options, open_pool

if TYPE_CHECKING:
    from ..serving.pool import RewardPool

logger = logging.getLogger(__name__)

TRUNCATED = ("score", "none")
AUTO = "auto"  # pool_name default: a name derived from the model and options (see default_pool_name)

# Engine/pool counters whose change since the previous call is logged per step (TRL averages what it
# is given per step, so a cumulative counter would be the wrong figure).
COUNTERS = ("requests", "samples", "batches", "forward_passes", "real_tokens", "padded_tokens", "vision_hits",
            "vision_misses", "prefix_groups", "prefix_hits", "duplicate_hits", "oom_splits", "invalid_samples",
            "failed_samples", "scoring_errors", "retries")  # fmt: skip
LOGGED_DELTAS = ("samples", "batches", "vision_hits", "vision_misses", "prefix_hits", "oom_splits", "scoring_errors",
                 "retries")  # fmt: skip


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

    scorer: a RewardModel, RewardEngine or RewardPool; or a hub id / folder, then:
        - ``pool_name="auto"`` (default): a named RewardPool, get-or-create across processes, so the N
          ranks of a job share ONE pool. Its name is ``default_pool_name(model, options)``:
          "rewardplug-" + 12 hex digits of a hash of the model id and the options, the same on every
          rank without configuration. ``options`` are the pool's (``PoolConfig.from_kwargs``: its
          fields, num_replicas, gpus_per_replica, address, ..., and the model/engine options; an
          unknown name is a TypeError naming it).
        - ``pool_name="my-pool"``: that name (``rewardplug pool start --name my-pool`` may have made it).
        - ``pool_name=None`` or ``device=...``: no pool; an in-process RewardEngine on this rank's own
          device (``cuda:$LOCAL_RANK``, the CPU without CUDA) or on ``device``. ``options`` go to
          ``RewardModel.from_pretrained`` and ``RewardEngine``.
    pool: instead of ``scorer``: a ``PoolConfig`` (the pool it describes, found or made; without a
        name it gets ``default_pool_name`` of its model and options, the name the same options as
        keywords give, so the ranks share it) or a running RewardPool.
    name: the name TRL logs under (default "reward_model").
    on_invalid: what a bad sample (InvalidSampleError: unreadable image, unknown content, ...) gets,
        the same option and default in every adapter (``rewardplug.integrations.on_invalid``):
        "raise" (default): the training step fails with InvalidSampleError naming each bad sample;
        "none": None, which TRL masks when no other reward function scores the row (but see "Mixing"
        below); a float: that fixed fallback reward, returned as is (not normalized). The reasons are
        logged. System failures raise ScoringError whatever this is.
    on_error: deprecated alias of ``on_invalid``.
    truncated: what a completion that ended without one of the policy's end-of-turn ids (it hit the
        length limit) gets: "score" (scored as is; the reward model's chat template closes the turn),
        "none" (masked), or a fixed float penalty (returned as is, not normalized).
    eos_token_ids: the POLICY's end-of-turn and pad ids, to judge truncation. Default: read from the
        trainer that calls (its ``eos_token_ids`` and its processing class's pad id: exactly TRL's own
        ``completions/clipped_ratio`` rule). Under AsyncGRPOTrainer (no trainer in reach) pass them,
        else truncation is not judged (logged once). Never the reward model's tokenizer's ids.
    normalize: None, or "running": (score - running mean) / running std, per value of the
        ``normalize_by`` column (e.g. "data_source") or over everything.
    clip: None, a float c (clip to [-c, c]) or a (low, high) pair; applied after normalization.
    log_every: read the scorer's stats() (and log per-step deltas of its counters) every this many calls.
    log_to: where figures go when TRL passes no ``log_metric`` (AsyncGRPOTrainer): a picklable callable
        ``log_to(name, value)``; default: one ``logging`` INFO line per ``log_every`` calls on the
        logger "rewardplug.integrations.trl" (means over those calls).

    Mixing: TRL sums reward functions with ``nansum`` and masks a row only when EVERY function returns
    None, so a None from this function next to a rule-based reward counts as 0 for this function. It
    warns once when that happens; pass a float ``on_invalid`` to choose what unscorable samples get.

    Logged per call (``log_metric``): latency, bad samples (``invalid_count``, ``invalid_frac``), truncated
    completions (``truncated_count``, ``truncated_frac``), ``raw_mean`` and ``raw_std`` (TRL's sample std,
    n - 1) of the raw scores, and the scorer's counters changed by this call (a pool's are asked of its
    replicas after the answer, ``stats(fresh=True)``, so step N shows step N's work).
    """

    def __init__(
        self,
        scorer: Any = None,
        *,
        pool: PoolConfig | RewardPool | None = None,
        name: str | None = None,
        on_invalid: str | float = ON_INVALID_DEFAULT,
        on_error: str | None = None,
        truncated: str | float = "score",
        eos_token_ids: Sequence[int] | None = None,
        normalize: str | None = None,
        normalize_by: str | None = None,
        clip: float | tuple[float, float] | None = None,
        log_every: int = 1,
        log_to: Callable[[str, float], Any] | None = None,
        pool_name: str | None = AUTO,
        device: str | None = None,
        **options: Any,
    ):
        if on_error is not None:
            warnings.warn("RewardFunction(on_error=...) is deprecated; use on_invalid=... (same values, plus a "
                          "float fallback reward)", DeprecationWarning, stacklevel=2)  # fmt: skip
            if on_invalid != ON_INVALID_DEFAULT and on_invalid != on_error:
                raise ValueError(f"on_error={on_error!r} and on_invalid={on_invalid!r} disagree; pass on_invalid only")
            on_invalid = on_error
        self.on_invalid = parse_on_invalid(on_invalid)
        self.truncated = _check_fixed(truncated, TRUNCATED, "truncated")
        if normalize not in (None, "running"):
            raise ValueError(f"normalize must be None or 'running', got {normalize!r}")
        if (scorer is None) == (pool is None):
            raise TypeError("RewardFunction takes a scorer (a model id or path, RewardModel, RewardEngine or "
                            "RewardPool) or pool=PoolConfig(...) (or a running RewardPool): one of them")  # fmt: skip
        given = sorted(options) + ["device"] * (device is not None) + ["pool_name"] * (pool_name != AUTO)
        self._owns_scorer = isinstance(scorer, str | os.PathLike) or isinstance(pool, PoolConfig)
        if isinstance(scorer, str | os.PathLike):
            scorer = build_scorer(scorer, pool_name=pool_name, device=device, **options)
        elif given and pool is not None:
            raise TypeError(f"options {given} belong in the pool's PoolConfig; pass none beside pool=")
        elif given:
            raise TypeError(f"options {given} apply only when scorer is a model id or path")
        elif pool is not None:
            scorer = open_pool(shared_config(pool) if isinstance(pool, PoolConfig) else pool)
        self.scorer = scorer
        self.__name__ = name or "reward_model"
        self.eos_token_ids = None if eos_token_ids is None else frozenset(int(i) for i in eos_token_ids)
        self.normalize_by = normalize_by
        self.norm = RunningNorm() if normalize == "running" else None
        self.clip = (-clip, clip) if isinstance(clip, int | float) else clip
        self.log_every = max(1, int(log_every))
        self.log_to = log_to
        self._calls = 0
        self._last_counters: dict[str, float] | None = None
        self._counters_read = False  # the first read is a baseline taken before this function's first call
        self._consumer = f"trl:{self.__name__}:{uuid.uuid4().hex[:8]}"  # this function's stats(since=...) mark
        self._pending_figures: dict[str, list[float]] = {}
        self._warned: set[str] = set()

    def __getstate__(self):
        if not _is_pool(self.scorer):
            raise TypeError(
                "a RewardFunction pickles only when backed by a RewardPool (a model or engine lives in this "
                "process); TRL's AsyncGRPOTrainer runs rewards in a spawned process: pass a RewardPool"
            )
        return self.__dict__

    def close(self) -> None:
        """Release the scorer if this function built it: an engine is closed, a pool handle detached
        (a named pool keeps running for the other ranks: ``scorer.shutdown()`` or
        ``rewardplug pool stop NAME`` removes it)."""
        if self._owns_scorer:
            self.scorer.close()

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

    def policy_end_ids(self, kwargs: dict) -> frozenset[int] | None:
        """The policy's end-of-turn and pad ids: ``eos_token_ids`` if given, else the calling trainer's
        (TRL's own truncation rule: ``ids[-1] not in [*trainer.eos_token_ids, tokenizer.pad_token_id]``,
        grpo_trainer.py:2489-2490 / rloo_trainer.py:1520-1521 in TRL 1.16), else None (unknown)."""
        if self.eos_token_ids is not None:
            return self.eos_token_ids
        trainer = calling_trainer(kwargs)
        ids = getattr(trainer, "eos_token_ids", None)
        if ids is None:
            return None
        processing = getattr(trainer, "processing_class", None)
        tokenizer = getattr(processing, "tokenizer", processing)
        pad = getattr(tokenizer, "pad_token_id", None)
        return frozenset(int(i) for i in [*ids, *([pad] if pad is not None else [])])

    def truncated_rows(self, completion_ids: list | None, kwargs: dict) -> list[bool] | None:
        """Per completion: True when it ended without a policy end-of-turn id; None when not judged."""
        if completion_ids is None:
            return None
        end_ids = self.policy_end_ids(kwargs)
        if end_ids is None:
            if self.truncated != "score":
                raise ValueError(
                    f"{self.__name__}: truncated={self.truncated!r} needs the policy's end-of-turn ids, and no "
                    "trainer passed them: pass eos_token_ids=[...] (e.g. [tok.eos_token_id, tok.pad_token_id])"
                )
            self._warn_once("eos", "%s: truncation not judged: pass eos_token_ids=[...] (the policy's end-of-turn "
                            "and pad ids); TRL passed no trainer to read them from", self.__name__)  # fmt: skip
            return None
        return [bool(len(ids)) and int(ids[-1]) not in end_ids for ids in completion_ids]

    # ---- calls ----------------------------------------------------------------------------------

    def __call__(self, prompts: list, completions: list, completion_ids: list | None = None, **kwargs: Any) -> list:
        samples = self.samples(prompts, completions, **kwargs)
        counters = self._counters_due()
        if not self._counters_read and getattr(self.scorer, "stats", None) is not None:
            self._read_counters()  # the baseline: work the scorer did before this function
        start = time.perf_counter()
        with self._failures():
            try:
                scores, errors = self.scorer.score(samples, on_invalid="raise"), {}
            except InvalidSampleError as e:
                self._refuse_if_raise(e)
                # A RewardModel raises before any compute (no e.scores): score the rest now.
                scores = e.scores if e.scores is not None else self.scorer.score(samples, on_invalid="none")
                errors = e.errors
        seconds = time.perf_counter() - start
        figures = self._read_counters() if counters else {}
        return self._finish(scores, errors, completion_ids, kwargs, seconds, figures)

    def _refuse_if_raise(self, error: InvalidSampleError) -> None:
        if self.on_invalid == "raise":
            logger.error("%s: %s\n%s", self.__name__, error, raise_hint("RewardFunction(on_invalid={})"))
            raise error

    def _failures(self):
        return _SystemFailures(self.__name__)

    def _finish(self, scores: list, errors: dict, completion_ids, kwargs: dict, seconds: float,
                counters: dict[str, float]) -> list:  # fmt: skip
        raw = list(scores)
        bad = [i for i, s in enumerate(raw) if i not in errors and (s is None or not math.isfinite(s))]
        if bad:
            raise ScoringError(f"{self.__name__}: the scorer gave no finite score for valid samples {bad[:10]}; "
                               "refusing to hand TRL a masked reward for a system fault")  # fmt: skip
        for i, reason in list(errors.items())[:5]:
            logger.warning("%s: sample %d not scored (gets %r): %s", self.__name__, i, self.on_invalid, reason)
        truncated = self.truncated_rows(completion_ids, kwargs)
        fixed: dict[int, float | None] = {}  # rows returned as a fixed value, kept out of normalization
        if truncated is not None and self.truncated != "score":
            fixed.update({i: _fixed_value(self.truncated) for i, cut in enumerate(truncated) if cut})
        fixed.update({i: _fixed_value(self.on_invalid) for i in errors})
        values: list[float | None] = [None if i in fixed else s for i, s in enumerate(raw)]
        if self.norm is not None:
            keys = kwargs.get(self.normalize_by) if self.normalize_by else None
            values = self.norm(values, keys if keys is not None else [None] * len(values))
        if self.clip is not None:
            low, high = self.clip
            values = [None if v is None else min(max(v, low), high) for v in values]
        for i, v in fixed.items():
            values[i] = v
        if any(v is None for v in values):
            self._warn_if_mixed(kwargs, sum(v is None for v in values))
        self._log(kwargs, raw, errors, truncated, seconds, counters)
        return values

    # ---- mixing ---------------------------------------------------------------------------------

    def _warn_if_mixed(self, kwargs: dict, n_none: int) -> None:
        funcs = getattr(calling_trainer(kwargs), "reward_funcs", None) or []
        others = [f for f in funcs if f is not self]
        if others:
            # TRL 1.16 grpo_trainer.py:2756-2764 (rloo_trainer.py:1650-1657): rewards_per_func * weights,
            # .nansum(dim=1); only rows where every function gave NaN (None) are masked.
            self._warn_once(
                "mixed", "%s returned None for %d rows while %d other reward function(s) score the same rows: "
                "TRL masks a row only when every reward function returns None and otherwise sums with nansum, "
                "so these rows get 0 from %s (a bonus when its scores are mostly negative). Pass "
                "on_invalid=<float> for a fixed fallback reward on unscorable samples.",
                self.__name__, n_none, len(others), self.__name__,
            )  # fmt: skip

    def _warn_once(self, key: str, message: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message, *args)

    # ---- logging --------------------------------------------------------------------------------

    def _log(self, kwargs: dict, raw: list, errors: dict, truncated: list | None, seconds: float,
             counters: dict[str, float]) -> None:  # fmt: skip
        name = self.__name__
        log_extra = kwargs.get("log_extra")
        if log_extra is not None:  # per-completion columns of TRL's completions table
            log_extra(f"{name}/raw_score", list(raw))
            log_extra(f"{name}/invalid", [i in errors for i in range(len(raw))])
            if truncated is not None:
                log_extra(f"{name}/truncated", list(truncated))
        valid = [s for s in raw if s is not None]
        figures = {"latency_ms": seconds * 1e3, "invalid_count": len(errors),
                   "invalid_frac": len(errors) / max(len(raw), 1)}  # fmt: skip
        if truncated is not None:
            figures["truncated_count"] = sum(truncated)
            figures["truncated_frac"] = sum(truncated) / max(len(truncated), 1)
        if valid:
            mean = sum(valid) / len(valid)
            figures["raw_mean"] = mean
            if len(valid) > 1:  # TRL's std (trl.trainer.utils.nanstd): the sample std, n - 1; none for one value
                figures["raw_std"] = math.sqrt(sum((s - mean) ** 2 for s in valid) / (len(valid) - 1))
        self._calls += 1
        figures.update(counters)
        log_metric = kwargs.get("log_metric")
        if log_metric is not None:
            for key, value in figures.items():
                log_metric(f"{name}/{key}", float(value))
            return
        for key, value in figures.items():  # no log_metric (AsyncGRPOTrainer): aggregate, then emit
            self._pending_figures.setdefault(key, []).append(float(value))
        if self._calls % self.log_every == 0:
            means = {k: sum(v) / len(v) for k, v in self._pending_figures.items() if v}
            self._pending_figures = {}
            if self.log_to is not None:
                for key, value in means.items():
                    self.log_to(f"{name}/{key}", value)
            else:
                logger.info("%s: %s", name, " ".join(f"{k}={v:.4g}" for k, v in means.items()))

    def _counters_due(self) -> bool:
        """Whether this call logs the scorer's counters (every ``log_every`` calls)."""
        return getattr(self.scorer, "stats", None) is not None and (self._calls + 1) % self.log_every == 0

    def _read_counters(self) -> dict[str, float]:
        """Change of the scorer's counters since this function's previous read (this step's figures):
        ``stats(since=...)`` where the scorer offers it (an engine: exact), else the difference of
        cumulative stats; a pool's are asked of every replica now (``stats(fresh=True)``), so they hold
        this call's work. On a pool shared by several ranks these are pool-wide figures."""
        from ..engine import RewardEngine

        stats_fn = self.scorer.stats
        self._counters_read = True
        try:
            if isinstance(self.scorer, RewardEngine):
                delta = counters_of(stats_fn(since=self._consumer))
            else:
                counters = counters_of(stats_fn(fresh=True) if _is_pool(self.scorer) else stats_fn())
                last, self._last_counters = self._last_counters or {}, counters
                # a counter that went down belongs to a restarted replica, which starts from 0
                delta = {k: v - last.get(k, 0.0) if v >= last.get(k, 0.0) else v for k, v in counters.items()}
        except Exception as e:  # noqa: BLE001 - figures are optional; scoring already worked
            self._warn_once("stats", "%s: scorer.stats() failed, no engine figures: %s", self.__name__, e)
            return {}
        out = {key: delta[key] for key in LOGGED_DELTAS if key in delta}
        if delta.get("padded_tokens"):
            out["padding_efficiency"] = delta.get("real_tokens", 0.0) / delta["padded_tokens"]
        looked_up = delta.get("vision_hits", 0.0) + delta.get("vision_misses", 0.0)
        if looked_up:
            out["vision_hit_rate"] = delta.get("vision_hits", 0.0) / looked_up
        return out


class AsyncRewardFunction(RewardFunction):
    """Same as RewardFunction, with ``async def __call__``: TRL awaits it on its own event loop, next to
    its other async reward functions, while the scorer's engine or pool does the work."""

    async def __call__(self, prompts: list, completions: list, completion_ids: list | None = None, **kwargs: Any):
        import asyncio

        samples = self.samples(prompts, completions, **kwargs)
        counters = self._counters_due()
        if not self._counters_read and getattr(self.scorer, "stats", None) is not None:
            await asyncio.to_thread(self._read_counters)  # the baseline (see __call__)
        start = time.perf_counter()
        ascore = getattr(self.scorer, "ascore", None)
        if ascore is None:
            ascore = lambda s, **kw: asyncio.to_thread(self.scorer.score, s, **kw)  # noqa: E731 - a RewardModel
        with self._failures():
            try:
                scores, errors = await ascore(samples, on_invalid="raise"), {}
            except InvalidSampleError as e:
                self._refuse_if_raise(e)
                scores = e.scores if e.scores is not None else await ascore(samples, on_invalid="none")
                errors = e.errors
        seconds = time.perf_counter() - start
        # Off TRL's event loop: reading a pool's stats blocks (and may wait for its replicas' reports).
        figures = await asyncio.to_thread(self._read_counters) if counters else {}
        return self._finish(scores, errors, completion_ids, kwargs, seconds, figures)


class _SystemFailures:
    """Lets rewardplug's own errors through (ScoringError, InvalidSampleError, BusyError, ...) and turns
    any other exception from the scorer into a ScoringError with it as the cause: a trainer step fails
    loudly, never trains on a missing reward."""

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        if error is None or isinstance(error, RewardPlugError) or not isinstance(error, Exception):
            return False
        raise ScoringError(f"{self.name}: scoring failed ({type(error).__name__}: {error})") from error


# ---- building the scorer from a model id -------------------------------------------------------------


def default_pool_name(model: str | os.PathLike, options: dict | None = None) -> str:
    """"rewardplug-" + 12 hex digits of sha256(model id, options): every rank that asks for the same
    model with the same options gets the same name, hence one shared pool. ``options``: the keywords
    as given (a PoolConfig's: ``integrations.pools.config_options``)."""
    key = json.dumps({"model": os.fspath(model), "options": options or {}}, sort_keys=True, default=repr)
    return "rewardplug-" + hashlib.sha256(key.encode()).hexdigest()[:12]


def shared_config(config: PoolConfig) -> PoolConfig:
    """``config`` with a name: its own, else ``default_pool_name`` of its model and options (the name the
    same options given as keywords get), so every rank finds one pool."""
    return config if config.name else config.with_(name=default_pool_name(config.model, config_options(config)))


def rank_device() -> str:
    """This rank's own device: ``cuda:$LOCAL_RANK`` (``cuda:0`` when the launcher gives each rank one
    visible GPU), or "cpu" without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return f"cuda:{local_rank if local_rank < torch.cuda.device_count() else 0}"


def build_scorer(model: str | os.PathLike, *, pool_name: str | None = AUTO, device: str | None = None, **options):
    """A named RewardPool (get-or-create; ``options`` become its PoolConfig) or, with ``pool_name=None``
    / ``device``, an in-process RewardEngine on this rank's device (``options``: model and engine options)."""
    if device is None and pool_name is not None:
        name = default_pool_name(model, options) if pool_name == AUTO else pool_name
        logger.info("reward pool %r for %s", name, os.fspath(model))
        return open_pool(PoolConfig.from_kwargs(model, name=name, **options))
    from ..engine import RewardEngine
    from ..model import RewardModel

    try:
        model_options, engine_options = split_options(options)
    except TypeError as e:  # a pool's option (num_replicas, ...) among them, or a name nothing takes
        raise TypeError(f"pool_name=None / device=...: the model runs in this process, with model and engine "
                        f"options only: {e}") from None  # fmt: skip
    placement = {} if model_options.get("device_map") is not None else {"device": device or rank_device()}
    return RewardEngine(RewardModel.from_pretrained(model, **placement, **model_options), **engine_options)


# ---- helpers -------------------------------------------------------------------------------------------


def calling_trainer(kwargs: dict) -> Any:
    """The TRL trainer that called, or None: GRPOTrainer/RLOOTrainer pass ``log_metric`` as their own
    bound method ``_log_metric``; AsyncGRPOTrainer's rollout worker passes no trainer at all."""
    return getattr(kwargs.get("log_metric"), "__self__", None)


def counters_of(stats: dict) -> dict[str, float]:
    """The cumulative counters in an engine's stats (top level) or a pool's (``engine_*`` sums over its
    replicas, else each replica's ``engine`` report summed)."""
    out: dict[str, float] = {}
    replicas = stats.get("replicas")
    for key in COUNTERS:
        for candidate in (f"engine_{key}", key):
            value = stats.get(candidate)
            if _is_number(value):
                out[key] = float(value)
                break
        else:
            if isinstance(replicas, list):
                reports = [r.get("engine", r) for r in replicas if isinstance(r, dict)]
                values = [r.get(key) for r in reports if isinstance(r, dict) and _is_number(r.get(key))]
                if values:
                    out[key] = float(sum(values))
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_pool(scorer: Any) -> bool:
    from ..serving.pool import RewardPool

    return isinstance(scorer, RewardPool)


def _check_fixed(value: Any, words: tuple[str, ...], what: str) -> str | float:
    if isinstance(value, str):
        if value not in words:
            raise ValueError(f"{what} must be one of {words} or a float, got {value!r}")
        return value
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    raise ValueError(f"{what} must be one of {words} or a finite float, got {value!r}")


def _fixed_value(policy: str | float) -> float | None:
    return None if policy == "none" else float(policy)  # "raise" never gets here


# ---- colocation -----------------------------------------------------------------------------------------


def _trainer_callback_base():
    from transformers import TrainerCallback

    return TrainerCallback


class PoolColocationCallback(_trainer_callback_base()):
    """A TRL/transformers TrainerCallback for a reward pool that shares GPUs with the trainer (vLLM
    colocate style): ``pool.offload()`` (weights to host memory) right before each optimizer step and
    ``pool.onload()`` at the start of the next step, before generation and scoring; also before an
    evaluation that follows a step, and at the end of training (the pool is left loaded).

    >>> reward = RewardFunction(pool)  # doctest: +SKIP
    >>> trainer = GRPOTrainer(..., reward_funcs=[reward], callbacks=[PoolColocationCallback(pool)])  # doctest: +SKIP

    Scoring happens inside the step's first micro-batch, so the weights are on the device from
    ``on_step_begin`` through the forward/backward passes, and off only for the optimizer step.
    """

    def __init__(self, pool: Any):
        self.pool = pool
        self.offloaded = False

    def _onload(self) -> None:
        if self.offloaded:
            self.pool.onload()
            self.offloaded = False

    def on_step_begin(self, args, state, control, **kwargs):
        self._onload()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if not self.offloaded:
            self.pool.offload()
            self.offloaded = True

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_evaluate:  # evaluation generates and scores before the next step begins
            self._onload()

    def on_train_end(self, args, state, control, **kwargs):
        self._onload()

