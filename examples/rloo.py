"""RLOO on a vision-language policy with rewardplug as the reward (same reward function as GRPO).

    python examples/rloo.py --tiny
    python examples/rloo.py --policy Qwen/Qwen2.5-VL-3B-Instruct --reward Skywork/Skywork-VL-Reward-7B --pool
"""

from __future__ import annotations

import argparse

from common import build_reward, image_dataset, on_cpu, tiny_paths, workdir


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny random policy and reward model, on the CPU")
    p.add_argument("--policy")
    p.add_argument("--reward")
    p.add_argument("--pool", action="store_true")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--output-dir")
    args = p.parse_args(argv)

    from trl import RLOOConfig, RLOOTrainer

    work = workdir(args.output_dir, "rloo-")
    policy, reward_path = args.policy, args.reward
    if args.tiny:
        tiny_policy, tiny_reward = tiny_paths(work)
        policy, reward_path = policy or tiny_policy, reward_path or tiny_reward
    if not policy or not reward_path:
        p.error("pass --tiny, or --policy and --reward")

    reward = build_reward(reward_path, args.pool)
    config = RLOOConfig(
        output_dir=str(work / "out"), per_device_train_batch_size=4, num_generations=4,
        max_completion_length=12, max_steps=args.steps, learning_rate=1e-4, logging_steps=1,
        report_to="none", use_cpu=on_cpu(), bf16=not on_cpu(), save_strategy="no", seed=0,
    )  # fmt: skip
    trainer = RLOOTrainer(model=policy, reward_funcs=[reward], args=config, train_dataset=image_dataset())
    trainer.train()
    history = [h for h in trainer.state.log_history if "reward" in h]
    for h in history:
        print(f"step {h['step']}: reward {h['reward']:.4f}")
    return {"trainer": trainer, "reward": reward, "history": history}


if __name__ == "__main__":
    main()
