"""GRPO on a vision-language policy, scored by a multimodal reward model through rewardplug.

    python examples/grpo_vlm.py --tiny                    # CPU: tiny random policy and reward model
    python examples/grpo_vlm.py --tiny --pool             # the reward model on a Ray pool (CPU replica)
    python examples/grpo_vlm.py --tiny --mix              # plus a rule-based reward (reward_weights)
    python examples/grpo_vlm.py --tiny --pool --colocate  # offload the pool during the optimizer step
    python examples/grpo_vlm.py --policy Qwen/Qwen2.5-VL-3B-Instruct \\
        --reward Skywork/Skywork-VL-Reward-7B --pool      # real run: the reward model on its own GPUs

With --tiny the weights are random: the run exercises every piece (TRL's generation, the reward
calls, the optimizer steps) in well under a minute on a CPU, and its rewards mean nothing.

On several ranks (``torchrun --nproc_per_node 2 examples/grpo_vlm.py --tiny --pool`` after
``ray start --head``) every rank finds the same named pool: one set of reward replicas for the job.
--mix adds a rule-based reward next to the reward model, whose scores are then normalized (running
mean and std) so that ``reward_weights`` mean what they say, and unscorable samples get -1.0 instead
of None (TRL would count None as 0 next to another reward).
"""

from __future__ import annotations

import argparse

from common import add_model_args, build_reward, image_dataset, model_paths, names_a_color, text_dataset, train


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--text-only", action="store_true", help="a text-only policy and prompts (with --tiny)")
    p.add_argument("--pool", action="store_true", help="score on a Ray pool instead of in process")
    p.add_argument("--async-reward", action="store_true", help="use the async reward function")
    p.add_argument("--mix", action="store_true", help="add a rule-based reward (weights 1.0 and 0.5)")
    p.add_argument("--colocate", action="store_true", help="with --pool: offload it during the optimizer step")
    p.add_argument("--steps", type=int, default=2)
    args = p.parse_args(argv)
    if args.colocate and not args.pool:
        p.error("--colocate needs --pool")

    work, policy, reward_path = model_paths(p, args, "grpo-vlm-", text_policy=args.text_only)

    mixing = dict(normalize="running", on_invalid=-1.0) if args.mix else {}
    reward = build_reward(reward_path, args.pool, args.async_reward, **mixing)
    callbacks = None
    if args.colocate:
        from rewardplug.integrations.trl import PoolColocationCallback

        callbacks = [PoolColocationCallback(reward.scorer)]
    dataset = text_dataset() if args.text_only else image_dataset()
    result = train("GRPO", policy, reward, dataset, work, args.steps, rules=[names_a_color] if args.mix else (),
                   reward_weights=[1.0, 0.5] if args.mix else None, callbacks=callbacks)  # fmt: skip
    if args.pool:  # a named pool outlives the trainer on a cluster started with `ray start`
        print(f"reward pool {reward.scorer.name!r}; remove it with: rewardplug pool stop {reward.scorer.name}")
    return result


if __name__ == "__main__":
    main()
