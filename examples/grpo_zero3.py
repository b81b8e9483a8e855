"""GRPO with the reward model sharded inside the trainer's own DeepSpeed ZeRO-3 processes.

    accelerate launch --config_file examples/zero3.yaml examples/grpo_zero3.py --tiny
    accelerate launch --config_file examples/zero3.yaml examples/grpo_zero3.py \\
        --policy Qwen/Qwen2.5-VL-3B-Instruct --reward Skywork/Skywork-VL-Reward-7B

Each rank holds 1/N of the reward model (reusing the trainer's ZeRO-3 config); TRL calls the reward
function on every rank with that rank's completions, so scoring is collective, as ZeRO-3 needs.

For GPUs. On a CPU-only machine TRL's own ZeRO-3 policy training does not run (transformers 5.23 /
TRL 1.16 / DeepSpeed 0.19: the policy's embedding weight is used while still partitioned), so the tests
check the reward side of this set-up directly: tests/test_deepspeed.py launches 2 ranks that build
accelerate's DeepSpeed plugin and call the RewardFunction exactly as GRPOTrainer does.
"""

from __future__ import annotations

import argparse
import json
import os

from common import add_model_args, image_dataset, model_paths, on_cpu


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--steps", type=int, default=2)
    args = p.parse_args(argv)

    import torch.distributed as dist
    from trl import GRPOConfig, GRPOTrainer

    from rewardplug.integrations.deepspeed import ShardedRewardModel
    from rewardplug.integrations.trl import RewardFunction

    work, policy, reward_path = model_paths(p, args, "grpo-zero3-")  # each rank writes its own tiny copies
    config = GRPOConfig(
        output_dir=str(work / "out"), per_device_train_batch_size=4, num_generations=4,
        max_completion_length=8, max_steps=args.steps, learning_rate=1e-4, logging_steps=1,
        report_to="none", bf16=not on_cpu(), save_strategy="no", seed=0,
    )  # fmt: skip
    # The trainer's arguments set up accelerate's DeepSpeed plugin: the reward model reuses its config.
    scorer = ShardedRewardModel.from_pretrained(reward_path, image_roots=None, dtype="float32" if on_cpu() else "auto")
    reward = RewardFunction(scorer, name="skywork_vl_reward")
    trainer = GRPOTrainer(model=policy, reward_funcs=[reward], args=config, train_dataset=image_dataset())
    trainer.train()
    history = [h for h in trainer.state.log_history if "reward" in h]
    result = {"rank": dist.get_rank(), "rewards": [h["reward"] for h in history],
              "local": scorer.local_parameters(), "total": scorer.total_parameters()}  # fmt: skip
    print(json.dumps(result))
    if os.environ.get("REWARDPLUG_RESULT_DIR"):
        with open(os.path.join(os.environ["REWARDPLUG_RESULT_DIR"], f"rank{result['rank']}.json"), "w") as f:
            json.dump(result, f)
    return result


if __name__ == "__main__":
    main()
