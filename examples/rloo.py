"""RLOO on a vision-language policy with rewardplug as the reward (same reward function as GRPO).

    python examples/rloo.py --tiny
    python examples/rloo.py --policy Qwen/Qwen2.5-VL-3B-Instruct --reward Skywork/Skywork-VL-Reward-7B --pool
"""

from __future__ import annotations

import argparse

from common import add_model_args, build_reward, image_dataset, model_paths, on_cpu


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--pool", action="store_true")
    p.add_argument("--steps", type=int, default=2)
    args = p.parse_args(argv)

    from trl import RLOOConfig, RLOOTrainer

    work, policy, reward_path = model_paths(p, args, "rloo-")

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
