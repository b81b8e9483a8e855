"""Reward-model rewards in Ray RLlib (new API stack, Ray 2.60): connector pieces and gymnasium wrappers.

RLlib rewrites rewards in ConnectorV2 pieces (its count-based curiosity example does this).
``RewardModelConnector`` gathers the scoring inputs of the incoming episodes through your function,
scores them in one batched call, and writes the scores back into the episodes. ``add_reward_model``
installs it where Ray 2.60 wants it:

>>> from rewardplug import RewardPool
>>> from rewardplug.integrations.rllib import add_reward_model
>>> pool = RewardPool("Skywork/Skywork-VL-Reward-7B")  # doctest: +SKIP
>>> def to_sample(episode, t):  # the infos of step t carry image, prompt and response
...     info = episode.get_infos(t + 1)
...     return {"prompt": info["prompt"], "completion": info["response"], "images": [info["image"]]}
>>> config = add_reward_model(PPOConfig().environment(MyEnv), scorer=pool, sample_fn=to_sample)  # doctest: +SKIP

or, with the pool's options as one ``PoolConfig`` (the pool is found or made here, in the driver):

>>> from rewardplug.serving.config import PoolConfig
>>> pool = PoolConfig(model="Skywork/Skywork-VL-Reward-7B", num_replicas=2)
>>> config = add_reward_model(PPOConfig().environment(MyEnv), pool=pool, sample_fn=to_sample)  # doctest: +SKIP

- default: a learner connector piece (``config.learners(learner_connector=...)``; the older
  ``config.training(learner_connector=...)`` is deprecated in Ray 2.60). It is pickled into each learner
  (``num_learners >= 1``): the scorer must pickle (a RewardPool does), and ``sample_fn`` must be importable
  there. Env-runner metrics (``episode_return_mean``) still show the environment's rewards.
- ``in_returns=True``: an env-to-module piece on the env runners (``config.env_runners(
  env_to_module_connector=...)``). It runs once per vector step over all sub-environments' episodes, so
  one scorer call scores every sub-environment that stepped; the rewards are rewritten before RLlib
  computes episode returns, so ``env_runners/episode_return_mean`` shows the reward model's scores, and
  the learners train on them.

Failures: a bad sample (InvalidSampleError) is handled as ``on_invalid`` says, the same option and default
as in every adapter: "raise" (default: the step fails naming it), "none" (the environment's reward is
kept; counted in ``reward_model/invalid``) or a float (that reward).
A system failure (``ScoringError`` and any other exception of the scorer) is never turned into a reward:
it propagates and fails the training step.

``RewardModelWrapper`` (one environment) and ``RewardModelVectorWrapper`` (a gymnasium vector env, one
scorer call per vector step for all sub-environments) do the same on the environment side.
"""

from __future__ import annotations

import logging
import time
import warnings
from typing import Any, Callable

import gymnasium as gym
import numpy as np
from cachetools import LRUCache
from ray.rllib.connectors.connector_v2 import ConnectorV2

from ..errors import InvalidSampleError
from .on_invalid import DEFAULT as ON_INVALID_DEFAULT
from .on_invalid import parse_on_invalid, raise_hint

logger = logging.getLogger(__name__)

MODES = ("terminal", "per_step")
TRACKED_EPISODES = 4096  # env-runner piece: episodes whose scored steps it remembers (LRU)
COMBINE = ("replace", "add")


def score_batch(scorer: Any, samples: list, on_invalid: Any) -> tuple[list[float | None], dict[int, str]]:
    """Scores (None for bad samples) and {index: reason} of the bad ones; on_invalid="raise" raises
    InvalidSampleError. Anything else the scorer raises (ScoringError: a system failure) propagates."""
    try:
        scores = scorer.score(samples, on_invalid="raise")
        return list(scores), {}
    except InvalidSampleError as e:
        if on_invalid == "raise":
            logger.error("reward model: %s\n%s", e, raise_hint("on_invalid={}"))
            raise
        scores = e.scores if e.scores is not None else scorer.score(samples, on_invalid="none")
        return list(scores), dict(e.errors)


class RewardModelConnector(ConnectorV2):
    """Connector piece: rewrite episode rewards with reward-model scores (learner or env-to-module).

    scorer: anything with ``score(samples, on_invalid=...)`` (RewardPool, RewardEngine, RewardModel).
    sample_fn: (episode, t) -> sample, or None to skip; t is the step to score (its action is
        ``episode.get_actions(t)``, the infos it returned ``episode.get_infos(t + 1)``). Episodes arrive
        as SingleAgentEpisode; the artificial bootstrap step PPO's learner pipeline adds is never passed.
    mode: "terminal" scores finished episodes at their last real step; "per_step" every real step.
        As a learner piece, terminal means terminated (chunks that did not end are left alone; with
        ``score_truncated=True`` also truncated episodes, which after PPO's bootstrap step cannot be told
        from chunk ends). On the env runner (``on_env_runner=True``) truncation is known exactly:
        ``score_truncated`` then scores truncated episodes at their last step.
    combine: "replace" the environment's reward, or "add" ``coeff * score`` to it.
    on_invalid: what a sample that cannot be scored gets: "raise" (default, as in every adapter: the step
        fails with InvalidSampleError naming it), "none" (the environment's reward is kept; counted in
        ``reward_model/invalid``), or a float reward. ``missing=<float>`` is the old spelling of
        ``on_invalid=<float>``.
    on_env_runner: set by ``add_reward_model(in_returns=True)``: the piece runs in the env-to-module
        pipeline, once per vector step, and scores each newly taken step exactly once.

    Metrics (per training iteration, not smoothed): ``reward_model/scored`` and ``/invalid`` (sums),
    ``/mean_score`` (mean over the scored samples), ``/latency_ms`` (mean per scorer call).
    """

    def __init__(
        self,
        input_observation_space: gym.Space | None = None,
        input_action_space: gym.Space | None = None,
        *,
        scorer: Any,
        sample_fn: Callable[[Any, int], Any],
        mode: str = "terminal",
        combine: str = "replace",
        coeff: float = 1.0,
        on_invalid: str | float = ON_INVALID_DEFAULT,
        score_truncated: bool = False,
        on_env_runner: bool = False,
        missing: float | None = None,
        **kwargs: Any,
    ):
        super().__init__(input_observation_space, input_action_space, **kwargs)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if combine not in COMBINE:
            raise ValueError(f"combine must be one of {COMBINE}, got {combine!r}")
        if missing is not None:
            warnings.warn("missing=<float> is now on_invalid=<float>", DeprecationWarning, stacklevel=2)
            on_invalid = float(missing)
        on_invalid = parse_on_invalid(on_invalid)
        self.scorer, self.sample_fn = scorer, sample_fn
        self.mode, self.combine, self.coeff, self.on_invalid = mode, combine, coeff, on_invalid
        self.score_truncated, self.on_env_runner = score_truncated, on_env_runner
        # Env runner: episode id -> global steps already scored. Bounded: an env runner holds one ongoing
        # episode per sub-environment, and a finished one is dropped after the next vector step.
        self._scored_up_to: LRUCache = LRUCache(maxsize=TRACKED_EPISODES)

    def __call__(self, *, rl_module, batch, episodes, explore=None, shared_data=None, metrics=None, **kwargs):
        targets = self._env_runner_targets(episodes) if self.on_env_runner else self._learner_targets(episodes, shared_data)
        samples, kept = [], []
        for episode, t in targets:
            sample = self.sample_fn(episode, t)
            if sample is not None:
                kept.append((episode, t))
                samples.append(sample)
        if not samples:
            return batch
        start = time.perf_counter()
        scores, errors = score_batch(self.scorer, samples, self.on_invalid)
        seconds = time.perf_counter() - start
        for (episode, t), score in zip(kept, scores):
            if score is None:
                if self.on_invalid == "none":
                    continue
                new = float(self.on_invalid)
            else:
                env_reward = float(episode.get_rewards(t))
                new = self.coeff * score + (env_reward if self.combine == "add" else 0.0)
            episode.set_rewards(new_data=new, at_indices=t)
        if errors:
            logger.warning("reward model: %d of %d samples could not be scored: %s", len(errors), len(samples),
                           "; ".join(f"sample {i}: {r}" for i, r in list(errors.items())[:3]))  # fmt: skip
        if metrics is not None:
            valid = [s for s in scores if s is not None]
            metrics.log_value("reward_model/scored", len(samples), reduce="sum")
            metrics.log_value("reward_model/invalid", len(errors), reduce="sum")
            metrics.log_value("reward_model/latency_ms", seconds * 1e3, reduce="mean")
            for value in valid:  # one value per sample: the iteration's mean is over samples, not calls
                metrics.log_value("reward_model/mean_score", float(value), reduce="mean")
        return batch

    def _learner_targets(self, episodes, shared_data) -> list[tuple[Any, int]]:
        targets = []
        # PPO's pipeline appends one artificial timestep to each episode before this piece runs.
        extra = 1 if (shared_data or {}).get("_added_loss_mask_for_valid_episode_ts") else 0
        for episode in self.single_agent_episode_iterator(episodes, agents_that_stepped_only=False):
            steps = len(episode) - extra
            if steps <= 0:
                continue
            if self.mode == "terminal":
                if episode.is_terminated or (self.score_truncated and episode.is_truncated):
                    targets.append((episode, steps - 1))
            else:
                targets.extend((episode, t) for t in range(steps))
        return targets

    def _env_runner_targets(self, episodes) -> list[tuple[Any, int]]:
        """The steps taken since the last call (one per sub-environment that stepped)."""
        targets = []
        for episode in self.single_agent_episode_iterator(episodes, agents_that_stepped_only=False):
            steps = len(episode)
            done_before = self._scored_up_to.get(episode.id_, episode.t_started)
            first = max(0, done_before - episode.t_started)  # chunk-relative index of the first new step
            if first >= steps:
                continue
            self._scored_up_to[episode.id_] = episode.t_started + steps
            if self.mode == "terminal":
                if episode.is_terminated or (self.score_truncated and episode.is_truncated):
                    targets.append((episode, steps - 1))
            else:
                targets.extend((episode, t) for t in range(first, steps))
        return targets


def add_reward_model(config: Any, *, scorer: Any = None, sample_fn: Callable[[Any, int], Any],
                     in_returns: bool = False, pool: Any = None, **options: Any) -> Any:  # fmt: skip
    """Install a RewardModelConnector on an RLlib AlgorithmConfig and return the config.

    scorer: anything with ``score(samples, on_invalid=...)``; or, instead, ``pool``: a ``PoolConfig``
    (its pool is found or made now, in this process; without a name it is private to this process and
    removed with it) or a running RewardPool.

    in_returns=False: as the learner connector (``config.learners(learner_connector=...)``).
    in_returns=True: as the env-to-module connector on the env runners, so episode returns (and what the
        learners train on) are the scores; it replaces any env-to-module connector set before.
    options: RewardModelConnector's (mode, combine, coeff, on_invalid, score_truncated).
    A RewardPool scorer pickles into learners and env runners and attaches there on its first call.
    """
    if pool is not None:
        if scorer is not None:
            raise TypeError("add_reward_model takes scorer= or pool=, not both")
        from .pools import open_pool

        scorer = open_pool(pool)
    if in_returns:
        return config.env_runners(
            env_to_module_connector=lambda env, spaces=None, device=None: RewardModelConnector(
                scorer=scorer, sample_fn=sample_fn, on_env_runner=True, **options
            )
        )
    return config.learners(
        learner_connector=lambda obs_space, act_space: RewardModelConnector(scorer=scorer, sample_fn=sample_fn, **options)
    )


def _apply(score: float | None, error: str | None, reward: float, info: dict, combine: str, coeff: float,
           on_invalid: Any) -> float:  # fmt: skip
    """The reward of one step given its score or error; records both in info."""
    if error is not None:
        info["reward_model_error"] = error
        return reward if on_invalid == "none" else float(on_invalid)
    info["reward_model_score"] = score
    return coeff * score + (reward if combine == "add" else 0.0)


class RewardModelWrapper(gym.Wrapper):
    """Environment-side variant for one environment: the reward of each step (or only of the last, with
    ``terminal_only=True``) becomes the reward model's score of ``sample_fn(obs, info)``.

    sample_fn: (observation, info) -> sample or None (keep the environment's reward).
    on_invalid: a bad sample: "raise" (default: the step fails naming it), "none" (keep the environment's
        reward), or a float reward.
    The score or the reason goes into ``info["reward_model_score"]`` / ``info["reward_model_error"]``.
    A system failure of the scorer propagates out of ``step``. For vector envs use
    RewardModelVectorWrapper (one scorer call per vector step).
    """

    def __init__(self, env: gym.Env, *, scorer: Any, sample_fn: Callable[[Any, dict], Any],
                 terminal_only: bool = True, combine: str = "replace", coeff: float = 1.0,
                 on_invalid: str | float = ON_INVALID_DEFAULT):  # fmt: skip
        super().__init__(env)
        if combine not in COMBINE:
            raise ValueError(f"combine must be one of {COMBINE}, got {combine!r}")
        on_invalid = parse_on_invalid(on_invalid)
        self.scorer, self.sample_fn = scorer, sample_fn
        self.terminal_only, self.combine, self.coeff, self.on_invalid = terminal_only, combine, coeff, on_invalid

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        if self.terminal_only and not (terminated or truncated):
            return obs, reward, terminated, truncated, info
        sample = self.sample_fn(obs, info)
        if sample is None:
            return obs, reward, terminated, truncated, info
        info = dict(info)
        scores, errors = score_batch(self.scorer, [sample], self.on_invalid)
        reward = _apply(scores[0], errors.get(0), reward, info, self.combine, self.coeff, self.on_invalid)
        return obs, reward, terminated, truncated, info


class RewardModelVectorWrapper(gym.vector.VectorWrapper):
    """RewardModelWrapper for a gymnasium vector env: after each vector step, the sub-environments that
    need a score are scored together in ONE scorer call.

    sample_fn: (observation, info) -> sample or None, per sub-environment (info: that sub-environment's
        info dict, unbatched). Options as RewardModelWrapper. Steps that only reset a sub-environment
        (gymnasium's next-step autoreset) are never scored. Per sub-environment, the score or the reason
        is in ``infos["reward_model_score"]`` / ``infos["reward_model_error"]`` (NaN / "" where absent).

    In RLlib, return it from your env creator when ``"num_envs"`` is in the env config, with
    ``config.env_runners(gym_env_vectorize_mode="vector_entry_point")``.
    """

    def __init__(self, env: gym.vector.VectorEnv, *, scorer: Any, sample_fn: Callable[[Any, dict], Any],
                 terminal_only: bool = True, combine: str = "replace", coeff: float = 1.0,
                 on_invalid: str | float = ON_INVALID_DEFAULT):  # fmt: skip
        super().__init__(env)
        if combine not in COMBINE:
            raise ValueError(f"combine must be one of {COMBINE}, got {combine!r}")
        mode = env.metadata.get("autoreset_mode", gym.vector.AutoresetMode.NEXT_STEP)
        if mode != gym.vector.AutoresetMode.NEXT_STEP:
            raise ValueError(f"RewardModelVectorWrapper needs next-step autoreset (RLlib's), got {mode}")
        on_invalid = parse_on_invalid(on_invalid)
        self.scorer, self.sample_fn = scorer, sample_fn
        self.terminal_only, self.combine, self.coeff, self.on_invalid = terminal_only, combine, coeff, on_invalid
        self._resetting = np.zeros(self.num_envs, bool)  # sub-envs whose next step is an autoreset

    def reset(self, **kwargs):
        self._resetting[:] = False
        return self.env.reset(**kwargs)

    def step(self, actions):
        obs, rewards, terminated, truncated, infos = self.env.step(actions)
        rewards = np.array(rewards, dtype=np.float64)
        rows, samples = [], []
        for i in range(self.num_envs):
            if self._resetting[i] or (self.terminal_only and not (terminated[i] or truncated[i])):
                continue
            sample = self.sample_fn(_row(obs, i), _info_row(infos, i))
            if sample is not None:
                rows.append(i)
                samples.append(sample)
        self._resetting = np.logical_or(terminated, truncated)
        if samples:
            scores, errors = score_batch(self.scorer, samples, self.on_invalid)
            col_score = np.full(self.num_envs, np.nan)
            col_error = np.full(self.num_envs, "", dtype=object)
            for k, i in enumerate(rows):
                info: dict = {}
                rewards[i] = _apply(scores[k], errors.get(k), float(rewards[i]), info, self.combine, self.coeff,
                                    self.on_invalid)  # fmt: skip
                col_score[i] = info.get("reward_model_score", np.nan)
                col_error[i] = info.get("reward_model_error", "")
            mask = np.zeros(self.num_envs, bool)
            mask[rows] = True
            infos = {**infos, "reward_model_score": col_score, "_reward_model_score": mask,
                     "reward_model_error": col_error, "_reward_model_error": mask}  # fmt: skip
        return obs, rewards, terminated, truncated, infos


def _row(batched: Any, i: int) -> Any:
    if isinstance(batched, dict):
        return {k: _row(v, i) for k, v in batched.items()}
    if isinstance(batched, tuple):
        return tuple(_row(v, i) for v in batched)
    return batched[i]


def _info_row(infos: dict, i: int) -> dict:
    """Sub-environment i's info dict from gymnasium's batched infos (values with "_key" masks)."""
    out = {}
    for key, value in infos.items():
        if key.startswith("_"):
            continue
        mask = infos.get("_" + key)
        if mask is not None and not mask[i]:
            continue
        out[key] = _info_row(value, i) if isinstance(value, dict) else value[i]
    return out
