"""One rank of a real GRPOTrainer whose reward is RewardFunction(<checkpoint>, pool options): run with
``torchrun --nproc_per_node 2 tests/workers/trl_rank.py --policy P --reward R --pool-name N --out DIR``
(RAY_ADDRESS in the environment points every rank at one Ray cluster). Each rank writes what its
reward function was asked and returned, and TRL's log history, to DIR/rank<k>.pkl."""

from __future__ import annotations

import argparse
import os
import pickle
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

import common  # noqa: E402  (examples/common.py: the image dataset)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--policy", required=True)
    p.add_argument("--reward", required=True)
    p.add_argument("--pool-name", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--max-wait-ms", type=float, default=3000.0)
    args = p.parse_args()

    import trl

    from rewardplug.integrations.trl import RewardFunction

    calls = []

    class Recorded(RewardFunction):
        def __call__(self, prompts, completions, completion_ids=None, **kwargs):
            out = super().__call__(prompts, completions, completion_ids, **kwargs)
            calls.append((self.samples(prompts, completions, **kwargs), list(out)))
            return out

    # A long max_wait_ms lets the replica's engine put both ranks' samples in one batch.
    reward = Recorded(args.reward, name="skywork_vl_reward", pool_name=args.pool_name, num_replicas=1,
                      gpus_per_replica=0, image_roots=None, max_wait_ms=args.max_wait_ms)  # fmt: skip
    config = trl.GRPOConfig(
        output_dir=os.path.join(args.out, "trainer"), per_device_train_batch_size=4, num_generations=4,
        max_completion_length=10, max_steps=args.steps, learning_rate=1e-4, logging_steps=1, report_to="none",
        use_cpu=True, bf16=False, save_strategy="no", seed=0,
    )  # fmt: skip
    dataset = common.image_dataset()
    trainer = trl.GRPOTrainer(model=args.policy, reward_funcs=[reward], args=config, train_dataset=dataset)
    trainer.train()
    rank = trainer.accelerator.process_index
    record = {"rank": rank, "world": trainer.accelerator.num_processes, "pool": reward.scorer.name, "calls": calls,
              "log_history": trainer.state.log_history}  # fmt: skip
    with open(os.path.join(args.out, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(record, f)
    reward.close()  # detach; the named pool keeps running for the test to inspect


if __name__ == "__main__":
    main()
