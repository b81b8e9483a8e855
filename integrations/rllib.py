"""Reward-model rewards in Ray RLlib (new API stack): a learner connector piece and a gymnasium wrapper.

RLlib rewrites rewards in learner ConnectorV2 pieces (its count-based curiosity example does this).
``RewardModelConnector`` gathers the scoring inputs of the incoming episodes through your function,
scores them in one batched call (a RewardPool: it pickles, so it reaches remote learners), and writes
the scores back into the episodes before the train batch is built:

>>> from rewardplug import RewardPool
>>> from rewardplug.integrations.rllib import RewardModelConnector
>>> pool = RewardPool("Skywork/Skywork-VL-Reward-7B")  # doctest: +SKIP
>>> def to_sample(episode, t):  # the infos of step t carry image, prompt and response
...     info = episode.get_infos(t + 1)
...     return {"prompt": info["prompt"], "completion": info["response"], "images": [info["image"]]}
>>> config.training(learner_connector=lambda obs, act: RewardModelConnector(scorer=pool, sample_fn=to_sample))  # doctest: +SKIP

``RewardModelWrapper`` does the same on the environment side, one step at a time.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import gymnasium as gym
import numpy as np
from ray.rllib.connectors.connector_v2 import ConnectorV2

logger = logging.getLogger(__name__)

MODES = ("terminal", "per_step")
COMBINE = ("replace", "add")


class RewardModelConnector(ConnectorV2):
    """Learner connector piece: rewrite episode rewards with reward-model scores.

    scorer: anything with ``score(samples, on_invalid="none")`` (RewardPool, RewardEngine, RewardModel).
    sample_fn: (episode, t) -> sample, or None to skip; t is the step to score (its action is
        ``episode.get_actions(t)``, the infos it returned ``episode.get_infos(t + 1)``). Episodes arrive
        as SingleAgentEpisode; the artificial bootstrap step PPO's pipeline adds is never passed.
    mode: "terminal" scores terminated episodes at their last real step (chunks that did not end are
        left alone; with ``score_truncated=True`` also episodes the environment truncated, which after
        PPO's bootstrap step cannot be told from chunk ends); "per_step" scores every real step.
    combine: "replace" the environment's reward, or "add" ``coeff * score`` to it.
    missing: reward written when a sample cannot be scored (default: keep the environment's reward;
        the count is reported in the metrics).
    """

    def __init__(
        self,
        input_observation_space: gym.Space | None = None,
        input_action_space: gym.Space | None = None,
        *,
        scorer: Any,
        sample_fn: Callable[[Any], Any],
        mode: str = "terminal",
        combine: str = "replace",
        coeff: float = 1.0,
        missing: float | None = None,
        score_truncated: bool = False,
        **kwargs: Any,
    ):
        super().__init__(input_observation_space, input_action_space, **kwargs)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if combine not in COMBINE:
            raise ValueError(f"combine must be one of {COMBINE}, got {combine!r}")
        self.scorer, self.sample_fn = scorer, sample_fn
        self.mode, self.combine, self.coeff, self.missing = mode, combine, coeff, missing
        self.score_truncated = score_truncated

    def __call__(self, *, rl_module, batch, episodes, explore=None, shared_data=None, metrics=None, **kwargs):
        targets: list[tuple[Any, int]] = []  # (episode, timestep index)
        samples: list[Any] = []
        # PPO's pipeline appends one artificial timestep to each episode before this piece runs.
        extra = 1 if (shared_data or {}).get("_added_loss_mask_for_valid_episode_ts") else 0
        for episode in self.single_agent_episode_iterator(episodes, agents_that_stepped_only=False):
            steps = len(episode) - extra
            if steps <= 0:
                continue
            if self.mode == "terminal":
                if not (episode.is_terminated or (self.score_truncated and episode.is_truncated)):
                    continue
                indices = [steps - 1]
            else:
                indices = list(range(steps))
            for t in indices:
                sample = self.sample_fn(episode, t)
                if sample is not None:
                    targets.append((episode, t))
                    samples.append(sample)
        if not samples:
            return batch
        start = time.perf_counter()
        scores = self.scorer.score(samples, on_invalid="none")
        seconds = time.perf_counter() - start
        for (episode, t), score in zip(targets, scores):
            env_reward = float(episode.get_rewards(t))
            if score is None:
                if self.missing is None:
                    continue
                new = float(self.missing)
            else:
                new = self.coeff * score + (env_reward if self.combine == "add" else 0.0)
            episode.set_rewards(new_data=new, at_indices=t)
        if metrics is not None:
            valid = [s for s in scores if s is not None]
            metrics.log_value("reward_model/scored", len(samples), reduce="sum")
            metrics.log_value("reward_model/invalid", len(samples) - len(valid), reduce="sum")
            metrics.log_value("reward_model/latency_ms", seconds * 1e3)
            if valid:
                metrics.log_value("reward_model/mean_score", float(np.mean(valid)))
        return batch


class RewardModelWrapper(gym.Wrapper):
    """Environment-side variant: the reward of each step (or only of the last, with
    ``terminal_only=True``) becomes the reward model's score of ``sample_fn(obs, info)``.

    sample_fn: (observation, info) -> sample or None (keep the environment's reward).
    The score and any error go into ``info["reward_model_score"]`` / ``info["reward_model_error"]``.
    """

    def __init__(self, env: gym.Env, *, scorer: Any, sample_fn: Callable[[Any, dict], Any],
                 terminal_only: bool = True, combine: str = "replace", coeff: float = 1.0):  # fmt: skip
        super().__init__(env)
        if combine not in COMBINE:
            raise ValueError(f"combine must be one of {COMBINE}, got {combine!r}")
        self.scorer, self.sample_fn = scorer, sample_fn
        self.terminal_only, self.combine, self.coeff = terminal_only, combine, coeff

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        if self.terminal_only and not (terminated or truncated):
            return obs, reward, terminated, truncated, info
        sample = self.sample_fn(obs, info)
        if sample is None:
            return obs, reward, terminated, truncated, info
        from ..errors import InvalidSampleError

        info = dict(info)
        try:
            score = self.scorer.score([sample])[0]
        except InvalidSampleError as e:
            info["reward_model_error"] = e.errors.get(0, str(e))
            return obs, reward, terminated, truncated, info
        info["reward_model_score"] = score
        reward = self.coeff * score + (reward if self.combine == "add" else 0.0)
        return obs, reward, terminated, truncated, info
