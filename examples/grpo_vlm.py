"""GRPO on a vision-language policy, scored by a multimodal reward model through rewardplug.

    python examples/grpo_vlm.py --tiny                    # CPU: tiny random policy and reward model
    python examples/grpo_vlm.py --tiny --pool             # the reward model on a Ray pool (CPU replica)
    python examples/grpo_vlm.py --policy Qwen/Qwen2.5-VL-3B-Instruct \\
        --reward Skywork/Skywork-VL-Reward-7B --pool      # real run: the reward model on its own GPUs

With --tiny the weights are random: the run exercises every piece (TRL's generation, the reward
calls, the optimizer steps) in well under a minute on a CPU, and its rewards mean nothing.
"""

from __future__ import annotations

import argparse

from common import add_model_args, build_reward, image_dataset, model_paths, text_dataset, train


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--text-only", action="store_true", help="a text-only policy and prompts (with --tiny)")
    p.add_argument("--pool", action="store_true", help="score on a Ray pool instead of in process")
    p.add_argument("--async-reward", action="store_true", help="use the async reward function")
    p.add_argument("--steps", type=int, default=2)
    args = p.parse_args(argv)

    work, policy, reward_path = model_paths(p, args, "grpo-vlm-", text_policy=args.text_only)

    reward = build_reward(reward_path, args.pool, args.async_reward)
    return train("GRPO", policy, reward, text_dataset() if args.text_only else image_dataset(), work, args.steps)


if __name__ == "__main__":
    main()
