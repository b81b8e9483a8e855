"""RLOO on a vision-language policy with rewardplug as the reward (same reward function as GRPO).

    python examples/rloo.py --tiny
    python examples/rloo.py --policy Qwen/Qwen2.5-VL-3B-Instruct --reward Skywork/Skywork-VL-Reward-7B --pool
"""

from __future__ import annotations

import argparse

from common import add_model_args, build_reward, image_dataset, model_paths, train


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--pool", action="store_true")
    p.add_argument("--steps", type=int, default=2)
    args = p.parse_args(argv)

    work, policy, reward_path = model_paths(p, args, "rloo-")

    reward = build_reward(reward_path, args.pool)
    return train("RLOO", policy, reward, image_dataset(), work, args.steps)


if __name__ == "__main__":
    main()
