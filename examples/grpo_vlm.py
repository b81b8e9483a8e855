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

from common import build_reward, image_dataset, on_cpu, text_dataset, tiny_paths, workdir


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny random policy and reward model, on the CPU")
    p.add_argument("--text-only", action="store_true", help="a text-only policy and prompts (with --tiny)")
    p.add_argument("--policy", help="policy model id or folder")
    p.add_argument("--reward", help="reward model id or folder")
    p.add_argument("--pool", action="store_true", help="score on a Ray pool instead of in process")
    p.add_argument("--async-reward", action="store_true", help="use the async reward function")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--output-dir")
    args = p.parse_args(argv)

    from trl import GRPOConfig, GRPOTrainer

    work = workdir(args.output_dir, "grpo-vlm-")
    policy, reward_path = args.policy, args.reward
    if args.tiny:
        tiny_policy, tiny_reward = tiny_paths(work, text_policy=args.text_only)
        policy, reward_path = policy or tiny_policy, reward_path or tiny_reward
    if not policy or not reward_path:
        p.error("pass --tiny, or --policy and --reward")

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
