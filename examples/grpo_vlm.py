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

from common import add_model_args, build_reward, image_dataset, model_paths, on_cpu, text_dataset


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--text-only", action="store_true", help="a text-only policy and prompts (with --tiny)")
    p.add_argument("--pool", action="store_true", help="score on a Ray pool instead of in process")
    p.add_argument("--async-reward", action="store_true", help="use the async reward function")
    p.add_argument("--steps", type=int, default=2)
    args = p.parse_args(argv)

    from trl import GRPOConfig, GRPOTrainer

    work, policy, reward_path = model_paths(p, args, "grpo-vlm-", text_policy=args.text_only)

    reward = build_reward(reward_path, args.pool, args.async_reward)
    config = GRPOConfig(
        output_dir=str(work / "out"), per_device_train_batch_size=4, num_generations=4,
        max_completion_length=12, max_steps=args.steps, learning_rate=1e-4, logging_steps=1,
        report_to="none", use_cpu=on_cpu(), bf16=not on_cpu(), save_strategy="no", seed=0,
    )  # fmt: skip
    dataset = text_dataset() if args.text_only else image_dataset()
    trainer = GRPOTrainer(model=policy, reward_funcs=[reward], args=config, train_dataset=dataset)
    trainer.train()
    history = [h for h in trainer.state.log_history if "reward" in h]
    for h in history:
        print(f"step {h['step']}: reward {h['reward']:.4f}")
    return {"trainer": trainer, "reward": reward, "history": history}


if __name__ == "__main__":
    main()
