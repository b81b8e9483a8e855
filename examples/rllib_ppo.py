"""Ray RLlib PPO whose rewards come from a multimodal reward model, through a learner connector.

    python examples/rllib_ppo.py --tiny                 # CPU, tiny random reward model, one train() iteration
    python examples/rllib_ppo.py --tiny --in-returns    # score on the env runners: returns show the scores
    python examples/rllib_ppo.py --tiny --num-learners 1  # a remote learner actor (the connector is pickled)
    python examples/rllib_ppo.py --reward Skywork/Skywork-VL-Reward-7B --iterations 20

The environment is a toy "captioning" task: each episode shows an image and a question; the agent
picks one of a few candidate answers (its action) and the episode ends. The environment's own reward
is 0; RewardModelConnector replaces it with the reward model's score of (image, question, answer), on
a RewardPool: by default in the learner (batched over all finished episodes of the train batch), with
--in-returns on the env runners (batched over the sub-environments of each vector step; the episode
returns RLlib reports are then the scores). ``make_vector_env`` shows the gymnasium-side alternative,
RewardModelVectorWrapper, as an RLlib vector env creator.
"""

from __future__ import annotations

import argparse
import os

import gymnasium as gym
import numpy as np

QUESTION = "What is in the picture?"
ANSWERS = ["A red circle.", "A blue square.", "A green triangle.", "Nothing at all."]
COLORS = [(220, 30, 30), (30, 60, 200), (20, 150, 40)]


class CaptionEnv(gym.Env):
    """One-step episodes: observe an image's colour features, answer with one of ANSWERS.

    info["image"] holds the picture (an RGB uint8 array), info["prompt"] the question and, after the
    step, info["response"] the chosen answer: what the reward model scores.
    """

    def __init__(self, config: dict | None = None):
        self.size = (config or {}).get("size", 56)
        self.observation_space = gym.spaces.Box(0.0, 1.0, (3,), np.float32)
        self.action_space = gym.spaces.Discrete(len(ANSWERS))
        self._image = None

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        color = COLORS[self.np_random.integers(len(COLORS))]
        image = np.full((self.size, self.size, 3), 245, np.uint8)
        image[12:-12, 12:-12] = color
        self._image = image
        return np.asarray(color, np.float32) / 255.0, {"image": image, "prompt": QUESTION}

    def step(self, action):
        info = {"image": self._image, "prompt": QUESTION, "response": ANSWERS[int(action)]}
        return np.zeros(3, np.float32), 0.0, True, False, info


def to_sample(episode, t: int) -> dict:
    """The connector's sample_fn: the infos step t returned carry what the reward model scores."""
    from PIL import Image

    info = episode.get_infos(t + 1)
    return {"prompt": info["prompt"], "completion": info["response"], "images": [Image.fromarray(info["image"])]}


def build_config(scorer, train_batch: int = 32, *, in_returns: bool = False, num_learners: int = 0,
                 num_envs: int = 1, **options):  # fmt: skip
    """PPO on CaptionEnv with the reward model's scores as rewards (options: RewardModelConnector's)."""
    from ray.rllib.algorithms.ppo import PPOConfig

    from rewardplug.integrations.rllib import add_reward_model

    config = (
        PPOConfig()
        .environment(CaptionEnv)
        .env_runners(num_env_runners=0, num_envs_per_env_runner=num_envs)
        .learners(num_learners=num_learners)
        .training(train_batch_size_per_learner=train_batch, minibatch_size=train_batch, num_epochs=1)
    )
    return add_reward_model(config, scorer=scorer, sample_fn=to_sample, in_returns=in_returns, **options)


def make_vector_env(env_config: dict, scorer) -> gym.Env:
    """An RLlib env creator: with "num_envs" in the config (gym_env_vectorize_mode="vector_entry_point"),
    a vector env whose rewards are scores, one scorer call per vector step for all sub-environments."""
    from PIL import Image

    from rewardplug.integrations.rllib import RewardModelVectorWrapper, RewardModelWrapper

    def sample(obs, info):
        return {"prompt": info["prompt"], "completion": info["response"], "images": [Image.fromarray(info["image"])]}

    if "num_envs" not in env_config:
        return RewardModelWrapper(CaptionEnv(env_config), scorer=scorer, sample_fn=sample)
    envs = gym.vector.SyncVectorEnv([lambda: CaptionEnv(env_config) for _ in range(env_config["num_envs"])])
    return RewardModelVectorWrapper(envs, scorer=scorer, sample_fn=sample)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--reward")
    p.add_argument("--iterations", type=int, default=1)
    p.add_argument("--in-returns", action="store_true", help="score on the env runners (returns show scores)")
    p.add_argument("--num-learners", type=int, default=0)
    args = p.parse_args(argv)

    import ray
    import torch

    from rewardplug import RewardPool
    from rewardplug.testing import cached_tiny_checkpoint

    reward = args.reward or (str(cached_tiny_checkpoint()) if args.tiny else None)
    if reward is None:
        p.error("pass --tiny or --reward")
    if not ray.is_initialized():
        # Remote learners unpickle the connector, whose sample_fn lives in this file: make it importable there.
        here = os.path.dirname(os.path.abspath(__file__))
        path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": path}})
    pool = RewardPool(reward, num_replicas=1, gpus_per_replica=0 if not torch.cuda.is_available() else 1)
    algo = build_config(pool, in_returns=args.in_returns, num_learners=args.num_learners).build_algo()
    results = [algo.train() for _ in range(args.iterations)]
    where = "env_runners" if args.in_returns else "learners"
    for i, r in enumerate(results):
        score = r.get(where, {}).get("reward_model/mean_score", float("nan"))
        returns = r.get("env_runners", {}).get("episode_return_mean", float("nan"))
        print(f"iteration {i}: mean reward-model score {float(score):.4f}, episode_return_mean {float(returns):.4f}")
    return {"algo": algo, "pool": pool, "results": results}


if __name__ == "__main__":
    main()
