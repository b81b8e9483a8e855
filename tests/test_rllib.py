"""RLlib (new API stack): a real PPO iteration whose learner batch carries the reward model's scores."""

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray.rllib")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

import rllib_ppo  # noqa: E402
from ray.rllib.algorithms.ppo.torch.ppo_torch_learner import PPOTorchLearner  # noqa: E402
from ray.rllib.core.columns import Columns  # noqa: E402

from rewardplug import RewardModel  # noqa: E402
from rewardplug.integrations.rllib import RewardModelWrapper  # noqa: E402

SEEN: list[dict] = []  # what the learner trained on (the learner runs in this process: num_learners=0)


class RecordingLearner(PPOTorchLearner):
    def compute_losses(self, *, fwd_out, batch):
        for module_batch in batch.values():
            SEEN.append({k: np.asarray(module_batch[k].detach().cpu())
                         for k in (Columns.OBS, Columns.ACTIONS, Columns.REWARDS, Columns.LOSS_MASK) if k in module_batch})  # fmt: skip
        return super().compute_losses(fwd_out=fwd_out, batch=batch)


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, namespace="rewardplug")
    yield ray
    ray.shutdown()


def sample_for(obs_row, action) -> dict:
    from PIL import Image

    color = tuple(int(round(c * 255)) for c in obs_row)
    env = rllib_ppo.CaptionEnv()
    image = np.full((env.size, env.size, 3), 245, np.uint8)
    image[12:-12, 12:-12] = color
    return {"prompt": rllib_ppo.QUESTION, "completion": rllib_ppo.ANSWERS[int(action)], "images": [Image.fromarray(image)]}


def test_ppo_learner_batch_rewards_are_reward_model_scores(ray_cluster, tiny_path):
    from rewardplug import RewardPool

    pool = RewardPool(tiny_path, num_replicas=1, gpus_per_replica=0, image_roots=None)
    try:
        algo = rllib_ppo.build_config(pool).training(learner_class=RecordingLearner).build_algo()
        result = algo.train()
        algo.stop()
    finally:
        pool.shutdown()
    assert SEEN, "the learner saw no batch"
    reference = RewardModel.from_pretrained(tiny_path, image_roots=None)
    batch = SEEN[0]
    mask = batch[Columns.LOSS_MASK].astype(bool) if Columns.LOSS_MASK in batch else np.ones(len(batch[Columns.REWARDS]), bool)
    rows = np.nonzero(mask)[0]
    assert len(rows) >= 8
    expected = reference.score([sample_for(batch[Columns.OBS][i], batch[Columns.ACTIONS][i]) for i in rows])
    assert batch[Columns.REWARDS][rows] == pytest.approx(expected, abs=1e-4)
    assert result["learners"]["reward_model/scored"] > 0
    assert result["learners"]["reward_model/invalid"] == 0


def test_wrapper_in_a_plain_gymnasium_loop(model):
    def to_sample(obs, info):
        return {"prompt": info["prompt"], "completion": info["response"], "images": [info["image"]]}

    env = RewardModelWrapper(rllib_ppo.CaptionEnv(), scorer=model, sample_fn=to_sample)
    for seed in range(3):
        obs, info = env.reset(seed=seed)
        obs, reward, terminated, truncated, info = env.step(seed % 4)
        assert terminated
        expected = model.score([{"prompt": info["prompt"], "completion": info["response"], "images": [info["image"]]}])[0]
        assert reward == pytest.approx(expected, abs=1e-6) and info["reward_model_score"] == reward


def test_wrapper_reports_a_bad_sample_and_keeps_the_env_reward(model):
    env = RewardModelWrapper(rllib_ppo.CaptionEnv(), scorer=model,
                             sample_fn=lambda obs, info: {"prompt": "q", "completion": "a", "images": [b"not an image"]})  # fmt: skip
    env.reset(seed=0)
    _, reward, _, _, info = env.step(0)
    assert reward == 0.0 and "image 0" in info["reward_model_error"]
