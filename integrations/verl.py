"""rewardplug in verl 0.9's reward loop (``verl.experimental.reward_loop``).

Two doors:

1. ``RewardPlugManager``, a reward manager (verl's ``RewardManagerBase``). Each reward-loop worker calls
   its ``async run_single(item)`` for every rollout, many at once. The manager reads the item's raw prompt
   messages (``raw_prompt``), its images (embedded in the messages, or ``multi_modal_data``) and the
   decoded response, gathers the items that arrive within ``batch_wait_ms`` into one request (a GRPO
   group lands together, on one replica), and scores them through a named RewardPool that all workers
   share::

       reward.reward_manager.source=importlib \\
       reward.reward_manager.module.path=pkg://rewardplug.integrations.verl \\
       reward.reward_manager.name=RewardPlugManager \\
       +reward.rewardplug.model=Skywork/Skywork-VL-Reward-7B \\
       +reward.rewardplug.pool_name=skywork-rm \\
       +reward.rewardplug.pool_options.num_replicas=2

   ``model``, ``pool_name``, ``address`` and ``pool_options`` become one ``PoolConfig`` (the pool's
   options, ``rewardplug.serving.config``); in Python, ``VerlRewardOptions(pool=PoolConfig(...))`` (or a
   running RewardPool) gives it whole.

   It returns ``{"reward_score": reward, "reward_extra_info": {"rm_score", "rm_invalid", "rm_truncated"}}``;
   verl puts the extra fields in the batch, its rollout dumps and its validation metrics.

2. ``compute_score``, an ``async`` custom reward function (``reward.custom_reward_function.path=
   pkg://rewardplug.integrations.verl``), for verl's naive manager: verl awaits it on the worker's event
   loop (no thread per sample). It sees only ``solution_str`` and ``extra_info``, so the question and
   images must be in ``extra_info`` (``{"question": ..., "images": [...]}``).

Options (``+reward.rewardplug.<key>=...`` for the manager, ``+reward.custom_reward_function.reward_kwargs.
<key>=...`` for the function), see ``VerlRewardOptions``. A bad sample follows ``on_invalid``, the same
option and default as in every adapter: "raise" (default) fails the step naming it, a float is its reward;
"none" is refused (verl has no per-sample mask). A system failure (``ScoringError``: lost replica,
device error, timeout) is raised and fails verl's step: it is never turned into a reward.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import threading
import warnings
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..errors import InvalidSampleError
from ..serving.config import PoolConfig
from .on_invalid import DEFAULT as ON_INVALID_DEFAULT
from .on_invalid import parse_on_invalid, raise_hint
from .pools import connect_options, connect_pool, open_pool

logger = logging.getLogger(__name__)

try:  # verl is optional: the function door and the options work without it
    from verl.experimental.reward_loop.reward_manager.base import RewardManagerBase
except ImportError:  # pragma: no cover - exercised only where verl is absent
    RewardManagerBase = object

BACKENDS = ("pool", "engine", "http")
QUESTION_KEYS = ("question", "prompt", "problem", "query")
END_OF_TURN = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<end_of_turn>", "</s>")
# Why on_invalid="none" is refused here (checked in verl 0.9.1).
NO_MASK = ("verl has no per-sample mask for rewards: its GRPO advantage (core_algos.compute_grpo_outcome_advantage) "
           "takes torch.mean and torch.std of each group's scores, so one NaN makes every advantage of its group "
           "NaN, and a None is not a number in its rm_scores tensor")  # fmt: skip


@dataclass
class VerlRewardOptions:
    """Where the scores come from and what becomes of them.

    backend: "pool" (default; a named RewardPool on the Ray cluster verl runs on: ``model`` +
        ``pool_name`` get-or-create, ``pool_name`` alone connects), "http" (a ``rewardplug serve``
        service at ``url``) or "engine" (a RewardEngine in each reward worker: CPU tests, one-node debugging).
    pool_options: the pool's options (PoolConfig fields: num_replicas, gpus_per_replica, part_samples,
        request_timeout_s, ..., and model/engine options such as dtype); with ``model``, ``pool_name``
        and ``address`` they make one PoolConfig (``pool_config()``; an unknown name is a TypeError
        naming it). With ``pool_name`` alone (attach to a running pool) only this handle's options.
    pool: instead of those four, in Python: a PoolConfig, or a running RewardPool.
    model_options: RewardModel options for the engine backend (dtype, device, ...).
    on_invalid: a sample that cannot be scored (flagged ``rm_invalid = 1``): "raise" (default, as in
        every adapter) fails the step with InvalidSampleError naming it; a float is its reward. "none"
        is refused (``NO_MASK``). ``invalid_score=<float>`` and ``on_invalid=fallback`` are the old
        spellings of ``on_invalid=<float>`` (DeprecationWarning).
    truncated_score: None (a truncated response is scored as is), or the reward it gets instead.
        Truncated: the response ends without an end-of-turn id (``eos_token_ids``; default: the policy
        tokenizer's eos and the usual end-of-turn tokens it knows).
    batch_wait_ms / max_batch: how long the first item waits for others, and the most items per request.
    """

    model: str | None = None
    pool_name: str | None = None
    backend: str | None = None
    url: str | None = None
    api_key: str | None = None
    address: str | None = None
    pool_options: dict = field(default_factory=dict)
    pool: Any = None  # a PoolConfig or a running RewardPool
    model_options: dict = field(default_factory=dict)
    on_invalid: str | float | None = None  # None: the default, "raise"
    invalid_score: float | None = None  # deprecated: on_invalid=<float>
    truncated_score: float | None = None
    eos_token_ids: list[int] | None = None
    batch_wait_ms: float = 5.0
    max_batch: int = 512

    def __post_init__(self):
        if self.backend is None:
            self.backend = "http" if self.url else "pool"
        if self.backend not in BACKENDS:
            raise ValueError(f"rewardplug backend must be one of {BACKENDS}, got {self.backend!r}")
        self.on_invalid = self._resolve_on_invalid()
        if self.max_batch < 1 or self.batch_wait_ms < 0:
            raise ValueError("rewardplug max_batch must be >= 1 and batch_wait_ms >= 0")

    def _resolve_on_invalid(self) -> str | float:
        value, old = self.on_invalid, self.invalid_score
        if value == "fallback" or (old is not None and value is None):
            warnings.warn("rewardplug invalid_score=<x> / on_invalid=fallback are deprecated: use on_invalid=<x> "
                          "(a float reward for unscorable samples; the default is 'raise')", DeprecationWarning,
                          stacklevel=3)  # fmt: skip
            value = 0.0 if old is None else old  # 0.0: the old default fallback
        elif old is not None and value != "raise" and parse_on_invalid(value) != float(old):
            raise ValueError(f"rewardplug on_invalid={value!r} and invalid_score={old!r} disagree; pass on_invalid only")
        self.invalid_score = None
        value = ON_INVALID_DEFAULT if value is None else value
        return parse_on_invalid(value, where="rewardplug on_invalid", none_refused=NO_MASK)

    def check_source(self) -> None:
        """Raise ValueError unless the options name where the scores come from."""
        if self.backend == "http" and not self.url:
            raise ValueError("rewardplug backend 'http' needs url")
        if self.backend == "engine" and not self.model:
            raise ValueError("rewardplug backend 'engine' needs model")
        if self.backend == "pool" and not (self.model or self.pool_name or self.pool is not None):
            raise ValueError("rewardplug needs model (and pool_name to share the pool) or pool_name")
        self.pool_config()  # a wrong pool option shows when verl builds the worker, not at its first reward

    def pool_config(self) -> PoolConfig | None:
        """The pool these options describe (backend "pool"): ``pool`` if it is a PoolConfig, else
        ``PoolConfig.from_kwargs(model, name=pool_name, address=address, **pool_options)``; None when
        they name a running pool (``pool_name`` alone, or a RewardPool)."""
        if self.backend != "pool":
            return None
        if self.pool is not None:
            beside = [k for k in ("model", "pool_name", "address", "pool_options") if getattr(self, k)]
            if beside:
                raise TypeError(f"rewardplug pool= is the whole pool: put {beside} in its PoolConfig, not beside")
            if isinstance(self.pool, PoolConfig):
                return self.pool
            from ..serving.pool import RewardPool

            if not isinstance(self.pool, RewardPool):
                got = type(self.pool).__name__
                raise TypeError(f"rewardplug pool= takes a PoolConfig or a running RewardPool, got {got}")
            return None
        if not self.model:
            connect_options(self.pool_name, self.pool_options)  # attaching takes only a handle's options
            return None
        return PoolConfig.from_kwargs(self.model, name=self.pool_name, address=self.address, **self.pool_options)

    @classmethod
    def from_mapping(cls, values: Any) -> "VerlRewardOptions":
        """From a dict or an OmegaConf node (verl's ``reward.rewardplug``); unknown keys are an error."""
        if values is not None and not isinstance(values, dict):
            from omegaconf import OmegaConf

            values = OmegaConf.to_container(values, resolve=True)
        values = dict(values or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown rewardplug options {unknown}; known: {sorted(known)}")
        return cls(**values)

    @classmethod
    def from_env(cls, **overrides: Any) -> "VerlRewardOptions":
        """REWARDPLUG_URL / REWARDPLUG_API_KEY / REWARDPLUG_POOL / REWARDPLUG_MODEL / REWARDPLUG_ON_INVALID,
        then ``overrides``."""
        env = {"url": os.environ.get("REWARDPLUG_URL"), "api_key": os.environ.get("REWARDPLUG_API_KEY"),
               "pool_name": os.environ.get("REWARDPLUG_POOL"), "model": os.environ.get("REWARDPLUG_MODEL"),
               "on_invalid": os.environ.get("REWARDPLUG_ON_INVALID")}  # fmt: skip
        values = {k: v for k, v in env.items() if v}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_mapping(values)

    def scorer_key(self) -> str:
        keep = ("backend", "model", "pool_name", "url", "api_key", "address", "pool_options", "model_options")
        values = {k: getattr(self, k) for k in keep}
        # never asdict(self): it would deep-copy a running RewardPool
        values["pool"] = asdict(self.pool) if isinstance(self.pool, PoolConfig) else id(self.pool)
        return json.dumps(values, sort_keys=True, default=str)


# ---- scorers, one per process and options (every manager and function call in a worker shares it) ----

_scorers: dict[str, Any] = {}
_scorers_lock = threading.Lock()


def scorer_for(options: VerlRewardOptions) -> Any:
    """The process's scorer for these options, built on first use."""
    options.check_source()
    key = options.scorer_key()
    with _scorers_lock:
        if key not in _scorers:
            _scorers[key] = _build_scorer(options)
        return _scorers[key]


def _build_scorer(o: VerlRewardOptions) -> Any:
    if o.backend == "http":
        from ..serving.client import RewardClient

        return RewardClient(o.url, api_key=o.api_key)
    if o.backend == "engine":
        from ..engine import RewardEngine
        from ..model import RewardModel

        return RewardEngine(RewardModel.from_pretrained(o.model, **o.model_options))
    config = o.pool_config()
    if config is not None or o.pool is not None:
        return open_pool(config or o.pool)
    return connect_pool(o.pool_name, address=o.address, options=o.pool_options)


async def ascore_with_errors(scorer: Any, samples: list) -> tuple[list, dict[int, str]]:
    """``(scores, {index: reason})`` from a scorer with ``ascore`` (or only ``score``: run off the loop).
    System failures propagate."""
    ascore = getattr(scorer, "ascore", None)
    if ascore is None:
        ascore = lambda s, **kw: asyncio.to_thread(scorer.score, s, **kw)  # noqa: E731 - a RewardModel
    try:
        return list(await ascore(samples, on_invalid="raise")), {}
    except InvalidSampleError as e:
        if e.scores is not None:
            return list(e.scores), dict(e.errors)
        good = [i for i in range(len(samples)) if i not in e.errors]  # refused before any compute
        scores: list = [None] * len(samples)
        if good:
            for i, value in zip(good, await ascore([samples[i] for i in good], on_invalid="raise")):
                scores[i] = value
        return scores, dict(e.errors)


class MicroBatcher:
    """Gathers the samples submitted on one event loop within ``wait_s`` (or until ``max_items``) and
    scores them in one request: verl starts a worker's run_single calls together, so a GRPO group's
    responses travel together (and land on one replica, where its prompt and image are shared).
    Holds at most ``max_items`` samples before sending. Measured against one request per item (the
    engine's window and the pool's routing left to gather them): benchmarks/bench_verl.py, docs/verl.md."""

    def __init__(self, scorer: Any, wait_s: float = 0.005, max_items: int = 512):
        self.scorer = scorer
        self.wait_s = wait_s
        self.max_items = max_items
        self.requests = 0  # requests sent (for tests and logs)
        self._pending: list[tuple[Any, asyncio.Future]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task] = set()

    async def score(self, sample: Any) -> tuple[float | None, str | None]:
        """``(score, None)``, or ``(None, reason)`` for a sample that cannot be scored."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((sample, future))
        if len(self._pending) >= self.max_items:
            self._flush()
        elif self._timer is None:
            self._timer = loop.call_later(self.wait_s, self._flush)
        return await future

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        items, self._pending = self._pending, []
        if items:
            task = asyncio.get_running_loop().create_task(self._run(items))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, items: list[tuple[Any, asyncio.Future]]) -> None:
        self.requests += 1
        try:
            scores, errors = await ascore_with_errors(self.scorer, [s for s, _ in items])
        except BaseException as error:  # a system failure: every waiting item fails with it
            for _, future in items:
                if not future.done():
                    future.set_exception(error)
            if not isinstance(error, Exception):
                raise
            return
        for i, (_, future) in enumerate(items):
            if future.done():
                continue
            if i in errors or scores[i] is None:
                future.set_result((None, errors.get(i, "not scored")))
            else:
                future.set_result((scores[i], None))


# ---- building samples from verl's data ---------------------------------------------------------------


def _to_list(value: Any) -> list:
    if value is None:
        return []
    if getattr(value, "dtype", None) == object:  # numpy object arrays (verl's non-tensor columns)
        value = value.tolist()
    return list(value) if isinstance(value, list | tuple) else [value]


def _split_tags(text: str) -> list[dict] | str:
    """verl datasets write images as "<image>" tags in string content."""
    if "<image>" not in text and "<video>" not in text:
        return text
    items = []
    for part in re.split(r"(<image>|<video>)", text):
        if part == "<image>":
            items.append({"type": "image"})
        elif part == "<video>":
            items.append({"type": "video"})
        elif part:
            items.append({"type": "text", "text": part})
    return items


def _normalize_item(item: Any) -> Any:
    """verl's dataset writes image items as ``{"type": "image", "bytes"|"path"|"image": ...}``."""
    if isinstance(item, dict) and item.get("type") == "image" and item.get("image") is None:
        source = {k: item[k] for k in ("bytes", "path", "url") if item.get(k) is not None}
        if source:
            return {"type": "image", "image": source}
    return item


def prompt_messages(raw_prompt: Any) -> list[dict]:
    """verl's ``raw_prompt`` (a list or numpy array of messages) as rewardplug messages."""
    messages = []
    for m in _to_list(raw_prompt):
        m = dict(m)
        content = m.get("content")
        if isinstance(content, str):
            content = _split_tags(content)
        if isinstance(content, list | tuple) or getattr(content, "dtype", None) == object:
            content = [_normalize_item(it) for it in _to_list(content)]
        m["content"] = content
        messages.append(m)
    return messages


def item_images(multi_modal_data: Any) -> list:
    """Images from verl's ``multi_modal_data`` ({"image": [...]} or {"images": [...]})."""
    if not isinstance(multi_modal_data, dict):
        return []
    images = multi_modal_data.get("image")
    if images is None:
        images = multi_modal_data.get("images")
    return [im for im in _to_list(images) if im is not None]


class RewardPlugManager(RewardManagerBase):
    """verl reward manager scoring each rollout with the multimodal reward model (see the module docstring).

    verl builds it with ``(config, tokenizer, compute_score, **reward_kwargs)``: its options are
    ``config.reward.rewardplug`` (``VerlRewardOptions``); ``tokenizer`` is the policy's. ``scorer``
    (a RewardPool, RewardEngine, RewardModel or RewardClient) may be passed directly instead.
    """

    def __init__(self, config: Any, tokenizer: Any, compute_score: Any = None, *, scorer: Any = None,
                 options: VerlRewardOptions | dict | None = None, **reward_kwargs: Any):  # fmt: skip
        if RewardManagerBase is object:
            raise ImportError("RewardPlugManager needs verl (pip install 'verl>=0.9')")
        super().__init__(config, tokenizer, compute_score)
        if options is None:
            reward = config.get("reward") if config is not None else None
            options = reward.get("rewardplug") if reward is not None else None
            if options is None and scorer is None:
                raise ValueError("RewardPlugManager needs +reward.rewardplug.model=... (or .pool_name / .url)")
        if isinstance(options, VerlRewardOptions):
            self.options = options
        else:
            self.options = VerlRewardOptions.from_mapping(options)
        if scorer is None:
            self.options.check_source()  # a config error shows when verl builds the worker
        # A pool's constructor waits on Serve with blocking calls, which Serve refuses on an event loop
        # (verl's reward workers are async Ray actors): there the scorer is built on first use, off the loop.
        self.scorer = scorer if scorer is not None or _in_event_loop() else scorer_for(self.options)
        self.eos_token_ids = set(self.options.eos_token_ids or _end_ids(tokenizer))
        self._batchers: dict[int, MicroBatcher] = {}

    async def score_one(self, sample: dict) -> tuple[float | None, str | None]:
        """``(score, None)``, or ``(None, reason)`` for a sample that cannot be scored, through the batcher."""
        return await (await self.batcher()).score(sample)

    async def batcher(self) -> MicroBatcher:
        """The batcher of the running event loop (verl runs a worker's calls on one loop)."""
        if self.scorer is None:
            self.scorer = await asyncio.to_thread(scorer_for, self.options)
        loop = asyncio.get_running_loop()
        if id(loop) not in self._batchers:
            self._batchers[id(loop)] = MicroBatcher(self.scorer, self.options.batch_wait_ms / 1e3,
                                                    self.options.max_batch)  # fmt: skip
        return self._batchers[id(loop)]

    def sample_of(self, item: Any) -> tuple[dict, bool]:
        """The rewardplug sample of one DataProto item, and whether its response was truncated."""
        response_ids = item.batch["responses"]
        length = int(item.batch["attention_mask"][-response_ids.shape[-1] :].sum())
        valid = response_ids[:length]
        truncated = length == 0 or int(valid[-1]) not in self.eos_token_ids
        answer = self.tokenizer.decode(valid, skip_special_tokens=True)
        raw_prompt = item.non_tensor_batch.get("raw_prompt")
        if raw_prompt is None:
            raise KeyError("the batch has no 'raw_prompt': RewardPlugManager needs verl's raw chat messages")
        messages = prompt_messages(raw_prompt) + [{"role": "assistant", "content": answer}]
        images = item_images(item.non_tensor_batch.get("multi_modal_data"))
        return {"messages": messages, "images": images}, truncated

    async def run_single(self, data: Any) -> dict:
        """Score one rollout: ``{"reward_score": float, "reward_extra_info": {...}}``."""
        item = data[-1:][0]  # multi-sequence outputs: the last sequence carries the answer (as verl's naive)
        sample, truncated = self.sample_of(item)
        raw, reason = await self.score_one(sample)
        if raw is None:
            return {"reward_score": invalid_reward(self.options, reason, describe(item)),
                    "reward_extra_info": logged_fields(raw, truncated)}  # fmt: skip
        reward = self.options.truncated_score if truncated and self.options.truncated_score is not None else raw
        return {"reward_score": float(reward), "reward_extra_info": logged_fields(raw, truncated)}


def describe(item: Any) -> str:
    """Where a verl item comes from, for the error that names it: data_source, uid, extra_info's index."""
    non_tensor = getattr(item, "non_tensor_batch", None) or {}
    extra = non_tensor.get("extra_info")
    found = {"data_source": non_tensor.get("data_source"), "uid": non_tensor.get("uid"),
             "index": extra.get("index") if isinstance(extra, dict) else None}  # fmt: skip
    return ", ".join(f"{k}={v}" for k, v in found.items() if v is not None) or "a rollout"


def invalid_reward(options: VerlRewardOptions, reason: str | None, where: str) -> float:
    """The reward of a sample that could not be scored, or InvalidSampleError naming it (on_invalid="raise")."""
    reason = f"{reason or 'not scored'} ({where})"
    if options.on_invalid == "raise":
        logger.error("rewardplug: %s\n%s", reason, raise_hint("+reward.rewardplug.on_invalid={}", masks=False))
        raise InvalidSampleError({0: reason})
    logger.warning("rewardplug: sample not scored (reward %s): %s", options.on_invalid, reason)
    return float(options.on_invalid)


def _in_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def logged_fields(raw: float | None, truncated: bool | None) -> dict:
    """The per-sample fields verl logs: the raw model score (NaN when unscored) and 0/1 flags."""
    out = {"rm_score": math.nan if raw is None else float(raw), "rm_invalid": float(raw is None)}
    if truncated is not None:
        out["rm_truncated"] = float(truncated)
    return out


def _end_ids(tokenizer: Any) -> set[int]:
    ids = set()
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    ids.update(vocab[t] for t in END_OF_TURN if t in vocab)
    return ids


# ---- the custom-function door ------------------------------------------------------------------------

_fn_batchers: dict[tuple[str, int], MicroBatcher] = {}


def _function_sample(solution_str: str, extra_info_: dict | None) -> dict:
    info = dict(extra_info_ or {})
    images = info.get("images", info.get("image"))
    images = [im for im in _to_list(images) if im is not None]
    if info.get("raw_prompt") is not None:
        return {"messages": prompt_messages(info["raw_prompt"]) + [{"role": "assistant", "content": solution_str}],
                "images": images}  # fmt: skip
    question = next((info[k] for k in QUESTION_KEYS if isinstance(info.get(k), str)), None)
    if question is None:
        question = ""  # scored as an empty question; the sample is still well formed
    return {"prompt": question, "completion": solution_str, "images": images}


async def compute_score(data_source: Any, solution_str: str, ground_truth: Any, extra_info: dict | None = None,
                        **kwargs: Any) -> dict:  # fmt: skip
    """verl's custom reward function, async: ``{"score": reward, "rm_score", "rm_invalid"}``.

    The question and images come from ``extra_info`` (``question``/``prompt``/``problem``/``query`` and
    ``images``, or the chat messages under ``raw_prompt``). Options come from ``reward_kwargs`` (the
    ``VerlRewardOptions`` fields), else from REWARDPLUG_URL / REWARDPLUG_POOL / REWARDPLUG_MODEL.
    Concurrent calls on one event loop are sent as one request.
    """
    known = {f.name for f in fields(VerlRewardOptions)}
    options = VerlRewardOptions.from_env(**{k: v for k, v in kwargs.items() if k in known})
    scorer = await asyncio.to_thread(scorer_for, options)  # off the loop: a pool's constructor blocks
    key = (options.scorer_key(), id(asyncio.get_running_loop()))
    if key not in _fn_batchers:
        _fn_batchers[key] = MicroBatcher(scorer, options.batch_wait_ms / 1e3, options.max_batch)
    raw, reason = await _fn_batchers[key].score(_function_sample(solution_str, extra_info))
    if raw is None:
        index = extra_info.get("index") if isinstance(extra_info, dict) else None
        where = f"data_source={data_source}" + (f", index={index}" if index is not None else "")
        score = invalid_reward(options, reason, where)
    else:
        score = float(raw)
    return {"score": score, **logged_fields(raw, None)}
