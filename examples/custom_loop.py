"""A custom RL loop that overlaps generating step k+1 with scoring step k, through futures.

    python examples/custom_loop.py --tiny                 # CPU, tiny random policy and reward model
    python examples/custom_loop.py --tiny --tokens        # PPO-style: score the policy's token ids
    python examples/custom_loop.py --policy Qwen/Qwen2.5-VL-3B-Instruct --reward Skywork/Skywork-VL-Reward-7B --pool

Each step generates G completions per prompt, submits them for scoring (the future returns at once)
and, while the reward model works, generates the next step; the policy update then waits only for
what is left. The loop runs twice, with and without overlap, and prints how long it waited for rewards.

--tokens scores the token ids the policy produced (prompt ids + completion ids) with
``score_tokens`` / {"input_ids": ..., "images": ...} samples: nothing is decoded and tokenized again.
That is the route for PPO-style loops, since TRL 1.16 has no PPOTrainer (it was removed in TRL 1.13).
"""

from __future__ import annotations

import argparse
import time

import torch

from common import add_model_args, image_dataset, model_paths


class Policy:
    """A Qwen2.5-VL policy that samples G completions per prompt."""

    def __init__(self, path: str, group: int, max_new_tokens: int):
        from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

        self.model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
        self.processor = AutoProcessor.from_pretrained(path)
        self.group, self.max_new_tokens = group, max_new_tokens
        self.eos = {self.processor.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}

    @torch.inference_mode()
    def generate(self, rows: list[dict], seed: int) -> tuple[list[dict], list[dict]]:
        """Text samples and token samples for G completions of each row's prompt."""
        text_samples, token_samples = [], []
        torch.manual_seed(seed)
        for row in rows:
            messages = [{"role": "user", "content": [{"type": "image", "image": row["image"]},
                                                     {"type": "text", "text": row["prompt"][0]["content"]}]}]  # fmt: skip
            text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            inputs = self.processor(text=[text] * self.group, images=[row["image"]] * self.group, return_tensors="pt")
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=True, top_k=0,
                                      pad_token_id=self.processor.tokenizer.pad_token_id)  # fmt: skip
            prompt_ids = inputs["input_ids"][0].tolist()
            for completion in out[:, inputs["input_ids"].shape[1] :].tolist():
                ended = next((i for i, t in enumerate(completion) if t in self.eos), None)
                completion = completion if ended is None else completion[: ended + 1]
                answer = self.processor.tokenizer.decode(completion, skip_special_tokens=True)
                text_samples.append({"prompt": row["prompt"], "completion": answer, "images": [row["image"]]})
                token_samples.append({"input_ids": prompt_ids + completion, "images": [row["image"]]})
        return text_samples, token_samples


def run_loop(policy: Policy, scorer, rows: list[dict], steps: int, batch: int, overlap: bool, tokens: bool):
    """Returns (seconds waited for rewards, wall seconds, rewards per step)."""
    def batch_of(step):
        return [rows[(step * batch + i) % len(rows)] for i in range(batch)]

    def submit(step):
        text, toks = policy.generate(batch_of(step), seed=step)
        # A random policy can emit special tokens (an <|image_pad|> in its answer): None, not a failed step.
        return (toks if tokens else text), scorer.submit(toks if tokens else text, on_invalid="none")

    waited, rewards, start = 0.0, [], time.perf_counter()
    pending = submit(0)
    for step in range(steps):
        if overlap and step + 1 < steps:
            following = submit(step + 1)  # generate the next step while this one is scored
        t0 = time.perf_counter()
        samples, future = pending
        rewards.append(future.result())
        waited += time.perf_counter() - t0
        time.sleep(0.05)  # stands for the policy update
        if step + 1 < steps:
            pending = following if overlap else submit(step + 1)
    return waited, time.perf_counter() - start, rewards


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--pool", action="store_true", help="score on a Ray pool instead of an in-process engine")
    p.add_argument("--tokens", action="store_true", help="score token ids (no decode and re-tokenize)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=2, help="prompts per step")
    p.add_argument("--group", type=int, default=4, help="completions per prompt")
    p.add_argument("--max-new-tokens", type=int, default=24)
    args = p.parse_args(argv)

    from rewardplug import RewardEngine, RewardModel, RewardPool

    work, policy_path, reward_path = model_paths(p, args, "custom-loop-")

    policy = Policy(policy_path, args.group, args.max_new_tokens)
    rows = list(image_dataset())
    if args.pool:
        scorer = RewardPool(reward_path, num_replicas=1, gpus_per_replica=0 if not torch.cuda.is_available() else 1,
                            image_roots=None)  # fmt: skip
    else:
        scorer = RewardEngine(RewardModel.from_pretrained(reward_path, image_roots=None))
    run_loop(policy, scorer, rows, 1, args.batch, False, args.tokens)  # warm up
    results = {}
    for overlap in (False, True):
        waited, wall, rewards = run_loop(policy, scorer, rows, args.steps, args.batch, overlap, args.tokens)
        results["overlap" if overlap else "sequential"] = {"waited_s": waited, "wall_s": wall, "rewards": rewards}
        print(f"{'overlapped' if overlap else 'sequential':>10}: waited {waited:.2f}s for rewards "
              f"over {args.steps} steps ({wall:.2f}s wall)")  # fmt: skip
    seq, ovl = results["sequential"], results["overlap"]
    print(f"waiting for rewards cut by {1 - ovl['waited_s'] / max(seq['waited_s'], 1e-9):.0%} with overlap")
    return {"results": results, "scorer": scorer, "policy": policy, "rows": rows}


if __name__ == "__main__":
    main()
