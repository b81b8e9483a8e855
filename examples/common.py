"""Pieces the examples share: a small image dataset and the reward function."""

from __future__ import annotations

import tempfile
from pathlib import Path


def image_dataset(n: int = 8):
    """Synthetic pictures with conversational prompts (what TRL's VLM path needs)."""
    from datasets import Dataset
    from PIL import Image, ImageDraw

    colors = [("red", (220, 30, 30)), ("blue", (30, 60, 200)), ("green", (20, 150, 40)), ("yellow", (230, 200, 20))]
    rows = {"prompt": [], "image": [], "data_source": []}
    for i in range(n):
        _, rgb = colors[i % len(colors)]
        im = Image.new("RGB", (84, 56), (245, 245, 245))
        ImageDraw.Draw(im).ellipse([20 + i, 8, 64, 48], fill=rgb)
        rows["prompt"].append([{"role": "user", "content": "What color is the shape?"}])
        rows["image"].append(im)
        rows["data_source"].append("shapes" if i % 2 else "colors")
    return Dataset.from_dict(rows)


def text_dataset(n: int = 8):
    from datasets import Dataset

    topics = ["the sea", "a mountain", "a city", "the sky"]
    return Dataset.from_dict({"prompt": [[{"role": "user", "content": f"Write a line about {topics[i % 4]}."}]
                                         for i in range(n)]})  # fmt: skip


def on_cpu() -> bool:
    import torch

    return not torch.cuda.is_available()


def tiny_paths(work: Path, text_policy: bool = False) -> tuple[str, str]:
    """A tiny random policy (vision-language, or text-only) and a tiny reward model."""
    from rewardplug.testing import make_tiny_checkpoint, make_tiny_text_policy

    if text_policy:
        policy = make_tiny_text_policy(work / "tiny-text-policy")
    else:
        policy = make_tiny_checkpoint(work / "tiny-policy", seed=1)
    return str(policy), str(make_tiny_checkpoint(work / "tiny-reward", seed=0))


def build_reward(reward_path: str, use_pool: bool = False, async_reward: bool = False, **options):
    """The reward function: on a named Ray pool that every rank shares (its own GPUs, or the CPU here),
    or on an in-process engine on this rank's device."""
    from rewardplug.integrations.trl import AsyncRewardFunction, RewardFunction

    cls = AsyncRewardFunction if async_reward else RewardFunction
    if use_pool:  # pool name: rewardplug-<hash of the model and options>, the same on every rank
        return cls(reward_path, name="skywork_vl_reward", num_replicas=1, gpus_per_replica=0 if on_cpu() else 1,
                   image_roots=None, **options)  # fmt: skip
    return cls(reward_path, name="skywork_vl_reward", pool_name=None, image_roots=None, **options)


def names_a_color(completions, **kwargs):
    """A rule-based reward: 1.0 when the answer names a colour (to mix with the reward model)."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [1.0 if any(w in t.lower() for w in ("red", "blue", "green", "yellow")) else 0.0 for t in texts]


def workdir(path: str | None, prefix: str) -> Path:
    return Path(path or tempfile.mkdtemp(prefix=prefix))


def add_model_args(parser) -> None:
    parser.add_argument("--tiny", action="store_true", help="tiny random policy and reward model, on the CPU")
    parser.add_argument("--policy", help="policy model id or folder")
    parser.add_argument("--reward", help="reward model id or folder")
    parser.add_argument("--output-dir")


def model_paths(parser, args, prefix: str, text_policy: bool = False) -> tuple[Path, str, str]:
    """(work folder, policy, reward model): the tiny ones with --tiny, unless given."""
    work = workdir(args.output_dir, prefix)
    policy, reward = args.policy, args.reward
    if args.tiny:
        tiny_policy, tiny_reward = tiny_paths(work, text_policy=text_policy)
        policy, reward = policy or tiny_policy, reward or tiny_reward
    if not policy or not reward:
        parser.error("pass --tiny, or --policy and --reward")
    return work, policy, reward


def train(kind: str, policy: str, reward, dataset, work: Path, steps: int, *, rules=(), reward_weights=None,
          callbacks=None) -> dict:  # fmt: skip
    """A short TRL run ("GRPO" or "RLOO") with rewardplug as the reward (plus rule-based ``rules``,
    weighted by ``reward_weights`` in the order [reward, *rules]); prints the reward per step."""
    import trl

    config = getattr(trl, f"{kind}Config")(
        output_dir=str(work / "out"), per_device_train_batch_size=4, num_generations=4,
        max_completion_length=12, max_steps=steps, learning_rate=1e-4, logging_steps=1,
        report_to="none", use_cpu=on_cpu(), bf16=not on_cpu(), save_strategy="no", seed=0,
        reward_weights=reward_weights,
    )  # fmt: skip
    trainer = getattr(trl, f"{kind}Trainer")(model=policy, reward_funcs=[reward, *rules], args=config,
                                             train_dataset=dataset, callbacks=callbacks)  # fmt: skip
    trainer.train()
    history = [h for h in trainer.state.log_history if "reward" in h]
    for h in history:
        print(f"step {h['step']}: reward {h['reward']:.4f}")
    return {"trainer": trainer, "reward": reward, "history": history}
