"""RLlib (new API stack, Ray 2.60): real PPO iterations whose rewards are the reward model's scores.

Every test that starts Ray runs under the shared lock: flock /tmp/team/ray.lock pytest tests/test_rllib.py
"""

import logging
import os
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

pytest.importorskip("ray.rllib")

ROOT = Path(__file__).resolve().parent.parent
for folder in (ROOT / "examples", ROOT / "tests" / "workers"):
    sys.path.insert(0, str(folder))

import rllib_ppo  # noqa: E402
import rllib_recording  # noqa: E402
from ray.rllib.core.columns import Columns  # noqa: E402
from rllib_recording import SEEN, RecordingLearner  # noqa: E402

from rewardplug.errors import InvalidSampleError, ScoringError  # noqa: E402
from rewardplug.integrations.rllib import RewardModelVectorWrapper, RewardModelWrapper, add_reward_model  # noqa: E402
from rewardplug.serving.config import PoolConfig  # noqa: E402


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    # Learner actors unpickle the connector and its sample_fn: the examples and test helpers must import there.
    path = os.pathsep.join([str(ROOT / "examples"), str(ROOT / "tests" / "workers"), os.environ.get("PYTHONPATH", "")])
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, namespace="rewardplug",
             runtime_env={"env_vars": {"PYTHONPATH": path}})  # fmt: skip
    yield ray
    ray.shutdown()


class CountingScorer:
    """The real model, with a record of how many samples each scorer call carried."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def score(self, samples, **kw):
        self.calls.append(len(samples))
        return self.model.score(samples, **kw)


class BrokenDevice:
    """A scorer whose device failed: every call is a system failure."""

    def score(self, samples, **kw):
        raise ScoringError("CUDA error: an illegal memory access was encountered")


def sample_for(obs_row, action) -> dict:
    from PIL import Image

    color = tuple(int(round(c * 255)) for c in obs_row)
    env = rllib_ppo.CaptionEnv()
    image = np.full((env.size, env.size, 3), 245, np.uint8)
    image[12:-12, 12:-12] = color
    return {"prompt": rllib_ppo.QUESTION, "completion": rllib_ppo.ANSWERS[int(action)], "images": [Image.fromarray(image)]}


def merged(records: list[dict]) -> dict:
    """All minibatches the learner trained on, as one batch."""
    keys = [k for k in records[0] if k != "pid"]
    return {k: np.concatenate([np.asarray(r[k]) for r in records]) for k in keys}


def valid_rows(batch) -> np.ndarray:
    mask = batch[Columns.LOSS_MASK].astype(bool) if Columns.LOSS_MASK in batch else np.ones(len(batch[Columns.REWARDS]), bool)
    return np.nonzero(mask)[0]


def expected_rewards(reference, batch, rows, bad_last_answer: float | None = None) -> list[float]:
    out = []
    for i in rows:
        action = int(batch[Columns.ACTIONS][i])
        if bad_last_answer is not None and action == len(rllib_ppo.ANSWERS) - 1:
            out.append(bad_last_answer)
        else:
            out.append(reference.score([sample_for(batch[Columns.OBS][i], action)])[0])
    return out


def all_possible_scores(reference) -> list[float]:
    """The score of every (colour, answer) pair CaptionEnv can produce."""
    return [reference.score([sample_for(np.asarray(c, np.float32) / 255.0, a)])[0]
            for c in rllib_ppo.COLORS for a in range(len(rllib_ppo.ANSWERS))]  # fmt: skip


def test_add_reward_model_sets_the_learners_connector_without_deprecation(caplog):
    from ray.rllib.algorithms.ppo import PPOConfig

    with caplog.at_level(logging.WARNING):
        config = add_reward_model(PPOConfig(), scorer=None, sample_fn=rllib_ppo.to_sample)
    assert config._learner_connector is not None and config._env_to_module_connector is None
    assert not [r for r in caplog.records if "deprecat" in r.getMessage().lower()]
    piece = config._learner_connector(None, None)
    assert piece.on_env_runner is False and piece.on_invalid == "raise"  # the default of every adapter


def test_add_reward_model_takes_a_scorer_or_a_pool_not_both(model):
    from ray.rllib.algorithms.ppo import PPOConfig

    with pytest.raises(TypeError, match="not both"):
        add_reward_model(PPOConfig(), scorer=model, pool=PoolConfig(model="m"), sample_fn=rllib_ppo.to_sample)
    with pytest.raises(TypeError, match="PoolConfig or a running RewardPool"):
        add_reward_model(PPOConfig(), pool={"model": "m"}, sample_fn=rllib_ppo.to_sample)


def test_ppo_learner_batch_rewards_are_scores_and_bad_samples_get_the_fallback(ray_cluster, tiny_path, model):
    """The pool given as one PoolConfig: its options reach the pool the learner's connector scores with."""
    from rewardplug import RewardPool

    SEEN.clear()
    pool_config = PoolConfig(model=str(tiny_path), num_replicas=1, gpus_per_replica=0, part_samples=4,
                             request_timeout_s=77.0, max_ongoing_requests=3, model_options={"image_roots": None})
    config = rllib_ppo.build_config(None, on_invalid=-5.0).learners(learner_class=RecordingLearner)
    config = add_reward_model(config, pool=pool_config, sample_fn=rllib_recording.to_sample_last_answer_bad,
                              on_invalid=-5.0)  # fmt: skip
    pool = config._learner_connector(None, None).scorer
    try:
        assert isinstance(pool, RewardPool) and pool.config == pool_config.with_(name=pool.name)
        assert RewardPool.connect(pool.name).config.max_ongoing_requests == 3
        algo = config.build_algo()
        result = algo.train()
        algo.stop()
    finally:
        pool.shutdown()
    assert SEEN, "the learner saw no batch"
    batch = merged(SEEN)
    rows = valid_rows(batch)
    assert len(rows) >= 8
    actions = batch[Columns.ACTIONS][rows].astype(int)
    assert (actions == len(rllib_ppo.ANSWERS) - 1).any() and (actions != len(rllib_ppo.ANSWERS) - 1).any()
    assert batch[Columns.REWARDS][rows] == pytest.approx(expected_rewards(model, batch, rows, bad_last_answer=-5.0), abs=1e-5)
    learners = result["learners"]
    assert learners["reward_model/invalid"] == int((actions == len(rllib_ppo.ANSWERS) - 1).sum())
    assert learners["reward_model/scored"] == len(rows)
    valid_scores = [r for r, a in zip(batch[Columns.REWARDS][rows], actions) if a != len(rllib_ppo.ANSWERS) - 1]
    assert learners["reward_model/mean_score"] == pytest.approx(float(np.mean(valid_scores)), abs=1e-5)  # plain mean


def test_remote_learner_actor_gets_the_pickled_connector_and_trains_on_scores(ray_cluster, tiny_path, model, tmp_path):
    from rewardplug import RewardPool

    pool = RewardPool(tiny_path, num_replicas=1, gpus_per_replica=0, image_roots=None)
    try:
        config = rllib_ppo.build_config(pool, num_learners=1).learners(
            learner_class=RecordingLearner, learner_config_dict={"record_dir": str(tmp_path)})
        algo = config.build_algo()
        result = algo.train()
        algo.stop()
    finally:
        pool.shutdown()
    records = rllib_recording.load(str(tmp_path))
    assert records, "the remote learner saw no batch"
    assert all(int(r["pid"]) != os.getpid() for r in records)  # trained in another process: the learner actor
    batch = merged(records)
    rows = valid_rows(batch)
    assert batch[Columns.REWARDS][rows] == pytest.approx(expected_rewards(model, batch, rows), abs=1e-5)
    assert result["learners"]["reward_model/scored"] == len(rows)


def test_in_returns_env_runner_episode_returns_are_the_scores(ray_cluster, model):
    SEEN.clear()
    scorer = CountingScorer(model)
    config = rllib_ppo.build_config(scorer, in_returns=True, num_envs=4).learners(learner_class=RecordingLearner)
    algo = config.build_algo()
    result = algo.train()
    algo.stop()
    batch = merged(SEEN)
    rows = valid_rows(batch)
    assert batch[Columns.REWARDS][rows] == pytest.approx(expected_rewards(model, batch, rows), abs=1e-5)
    possible = all_possible_scores(model)
    env_runners = result["env_runners"]
    for key in ("episode_return_min", "episode_return_max"):  # one-step episodes: a return is one score
        assert min(abs(env_runners[key] - s) for s in possible) < 1e-5, (key, env_runners[key])
    assert env_runners["reward_model/scored"] > 0
    # The env-to-module piece runs once per vector step: each call scored every sub-env that finished.
    assert scorer.calls and set(scorer.calls) == {4}


def test_vector_wrapper_in_rllib_one_scorer_call_per_vector_step(ray_cluster, model):
    SEEN.clear()
    scorer = CountingScorer(model)
    # A gymnasium id whose vector entry point is RewardModelVectorWrapper over 4 sub-envs (in-process:
    # the local env runner builds it with gym.make_vec, so the counting scorer is this one).
    gym.register(
        "rewardplug/CaptionRM-v0",
        entry_point=lambda **kw: rllib_ppo.make_vector_env({}, scorer),
        vector_entry_point=lambda num_envs, **kw: rllib_ppo.make_vector_env({"num_envs": num_envs}, scorer),
    )
    config = (
        rllib_ppo.build_config(scorer)
        .environment("rewardplug/CaptionRM-v0")
        .env_runners(num_envs_per_env_runner=4, gym_env_vectorize_mode="vector_entry_point")
        .learners(learner_class=RecordingLearner, learner_connector=None)
    )
    algo = config.build_algo()
    result = algo.train()
    algo.stop()
    batch = merged(SEEN)
    rows = valid_rows(batch)
    assert batch[Columns.REWARDS][rows] == pytest.approx(expected_rewards(model, batch, rows), abs=1e-5)
    assert scorer.calls and set(scorer.calls) == {4}  # all 4 sub-envs in one call, every scored vector step
    assert sum(scorer.calls) >= len(rows)
    assert result["learners"].get("reward_model/scored") is None  # the learner did not score again


def test_a_scorer_system_failure_fails_the_training_step(ray_cluster):
    algo = rllib_ppo.build_config(BrokenDevice()).build_algo()
    try:
        with pytest.raises(Exception) as caught:
            algo.train()
    finally:
        algo.stop()
    chain, error = [], caught.value
    while error is not None:
        chain.append(error)
        error = error.__cause__ or error.__context__
    assert any(isinstance(e, ScoringError) or "ScoringError" in repr(e) for e in chain), repr(caught.value)


def to_sample(obs, info):
    return {"prompt": info["prompt"], "completion": info["response"], "images": [info["image"]]}


def test_wrapper_in_a_plain_gymnasium_loop(model):
    env = RewardModelWrapper(rllib_ppo.CaptionEnv(), scorer=model, sample_fn=to_sample)
    for seed in range(3):
        obs, info = env.reset(seed=seed)
        obs, reward, terminated, truncated, info = env.step(seed % 4)
        assert terminated
        expected = model.score([{"prompt": info["prompt"], "completion": info["response"], "images": [info["image"]]}])[0]
        assert reward == pytest.approx(expected, abs=1e-6) and info["reward_model_score"] == reward


def bad_sample(obs, info):
    return {"prompt": "q", "completion": "a", "images": [b"not an image"]}


def test_wrapper_bad_sample_raises_by_default_or_keeps_the_env_reward_or_gets_the_fallback(model, caplog):
    env = RewardModelWrapper(rllib_ppo.CaptionEnv(), scorer=model, sample_fn=bad_sample)  # default "raise"
    env.reset(seed=0)
    with caplog.at_level(logging.ERROR, logger="rewardplug.integrations.rllib"):
        with pytest.raises(InvalidSampleError, match="sample 0: image 0"):
            env.step(0)
    assert "on_invalid=<float>" in caplog.text
    env = RewardModelWrapper(rllib_ppo.CaptionEnv(), scorer=model, sample_fn=bad_sample, on_invalid="none")
    env.reset(seed=0)
    _, reward, _, _, info = env.step(0)
    assert reward == 0.0 and "image 0" in info["reward_model_error"]
    env = RewardModelWrapper(rllib_ppo.CaptionEnv(), scorer=model, sample_fn=bad_sample, on_invalid=-3.0)
    env.reset(seed=0)
    assert env.step(0)[1] == -3.0


@pytest.mark.parametrize("vector", [False, True], ids=["wrapper", "vector_wrapper"])
def test_wrapper_system_failure_propagates_never_a_reward(vector):
    if vector:
        envs = gym.vector.SyncVectorEnv([rllib_ppo.CaptionEnv for _ in range(2)])
        env = RewardModelVectorWrapper(envs, scorer=BrokenDevice(), sample_fn=to_sample, on_invalid=-2.0)
        action = np.array([0, 1])
    else:
        env = RewardModelWrapper(rllib_ppo.CaptionEnv(), scorer=BrokenDevice(), sample_fn=to_sample, on_invalid=-3.0)
        action = 0
    env.reset(seed=0)
    with pytest.raises(ScoringError):
        env.step(action)


def test_vector_wrapper_scores_sub_envs_together_and_handles_bad_ones_per_sub_env(model):
    scorer = CountingScorer(model)

    def sample(obs, info):  # sub-env answering "Nothing at all." sends a broken image
        image = b"not an image" if info["response"] == rllib_ppo.ANSWERS[3] else info["image"]
        return {"prompt": info["prompt"], "completion": info["response"], "images": [image]}

    envs = gym.vector.SyncVectorEnv([rllib_ppo.CaptionEnv for _ in range(3)])
    env = RewardModelVectorWrapper(envs, scorer=scorer, sample_fn=sample, on_invalid=-2.0)
    obs, infos = env.reset(seed=0)
    actions = np.array([0, 3, 2])
    _, rewards, terminated, _, infos = env.step(actions)
    # The 3 sub-envs go to the scorer together (an in-process RewardModel refuses a list with a bad sample
    # before computing, so the wrapper asks again for the others: still all 3 in one call).
    assert terminated.all() and scorer.calls in ([3], [3, 3])
    calls = list(scorer.calls)
    images = infos["image"]
    for i in (0, 2):
        expected = model.score([{"prompt": rllib_ppo.QUESTION, "completion": rllib_ppo.ANSWERS[actions[i]], "images": [images[i]]}])[0]
        assert rewards[i] == pytest.approx(expected, abs=1e-6) and infos["reward_model_score"][i] == rewards[i]
    assert rewards[1] == -2.0 and "image 0" in infos["reward_model_error"][1]
    _, rewards, terminated, _, _ = env.step(actions)  # next-step autoreset: nothing to score
    assert scorer.calls == calls and not terminated.any() and (rewards == 0).all()


def test_env_runner_piece_scores_each_new_step_once_in_per_step_mode(model):
    """RLlib's own SingleAgentEpisode, driven as the env runner drives it: the piece is called after every
    env step (and may be called again with nothing new); each step is scored exactly once."""
    from ray.rllib.env.single_agent_episode import SingleAgentEpisode

    from rewardplug.integrations.rllib import RewardModelConnector

    env = rllib_ppo.CaptionEnv()
    scorer = CountingScorer(model)
    piece = RewardModelConnector(scorer=scorer, sample_fn=rllib_ppo.to_sample, mode="per_step", on_env_runner=True)
    obs, info = env.reset(seed=0)
    episode = SingleAgentEpisode(observation_space=env.observation_space, action_space=env.action_space)
    episode.add_env_reset(observation=obs, infos=info)
    piece(rl_module=None, batch={}, episodes=[episode])  # just reset: nothing to score
    expected = []
    for action in (0, 2, 1):
        step_info = {"image": info["image"], "prompt": rllib_ppo.QUESTION, "response": rllib_ppo.ANSWERS[action]}
        episode.add_env_step(observation=obs, action=action, reward=0.0, infos=step_info, terminated=action == 1)
        piece(rl_module=None, batch={}, episodes=[episode])
        piece(rl_module=None, batch={}, episodes=[episode])  # called again: nothing new
        expected.append(model.score([rllib_ppo.to_sample(episode, len(episode) - 1)])[0])
    assert scorer.calls == [1, 1, 1]
    assert list(episode.get_rewards()) == pytest.approx(expected, abs=1e-6)
    assert episode.get_return() == pytest.approx(sum(expected), abs=1e-5)
