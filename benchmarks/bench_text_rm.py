"""GRPO with a text reward model: RewardEngine against TRL's own model-id reward path and naive batches.

    python benchmarks/bench_text_rm.py             # 2 prompts x G=8, hidden 1024 (minutes on 2 cores)
    python benchmarks/bench_text_rm.py --quick     # 2 prompts, smaller model

Workload: prompts of 200-800 tokens, G=8 answers of 16-512 tokens each, conversational (as TRL passes
them), on a random-weight ``Qwen3ForSequenceClassification`` (``--family``) sized for this CPU, fp32.

(a) TRL: a real ``trl.GRPOTrainer`` built with ``reward_funcs=[<checkpoint folder>]`` (so TRL loads the
    model with ``AutoModelForSequenceClassification`` itself) and its own ``_calculate_rewards`` called
    on the step's samples: the chat template per sample, one right-padded batch of all B*G samples,
    ``logits[:, 0]`` of the class;
(b) naive batches: the same class object, one right-padded batch per group of G, in order;
(c) RewardEngine over ``RewardModel.from_pretrained`` of the same folder: one call with all samples
    (each group's prompt computed once as a cached prefix, answers in length-sorted passes);
(d) the same encoding, plan and runner as (c), called batch after batch from this thread without the
    engine's threads (no encoding overlapped with the model): what the engine's pipeline adds to the
    passes themselves.

All three run in this process on the same samples, alternated per repeat; every repeat uses fresh
samples (its own seed) and a new engine, so nothing cached carries into a timed run. Scores of (b) and
(c) are compared with (a). Prints medians, the ratios and the machine's load.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from rewardplug import RewardEngine, RewardModel
from rewardplug.testing import make_tiny_seq_cls_checkpoint, make_tiny_text_policy

WORDS = ["the", "reward", "model", "scores", "an", "answer", "to", "a", "question", "about", "light", "and", "sky"]


def text(n: int, rng: random.Random) -> str:
    """n characters of words: n tokens for the byte-level test tokenizers (no merges)."""
    out = ""
    while len(out) < n:
        out += rng.choice(WORDS) + " "
    return out[:n].strip() or "x"


def workload(prompts: int, group: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(prompts):
        prompt = [{"role": "user", "content": text(rng.randint(200, 800), rng)}]
        for _ in range(group):
            rows.append({"prompt": prompt, "completion": [{"role": "assistant", "content": text(rng.randint(16, 512), rng)}]})
    return rows


def trl_trainer(reward_path: Path, policy_path: Path, group: int, batch: int, out: Path):
    """A GRPOTrainer whose only reward function is the model id (a folder): TRL loads it itself."""
    import datasets
    import trl

    config = trl.GRPOConfig(
        output_dir=str(out), per_device_train_batch_size=batch, num_generations=group, max_completion_length=8,
        report_to="none", use_cpu=True, bf16=False, save_strategy="no", seed=0, logging_steps=1,
    )  # fmt: skip
    dataset = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": "hi"}]}] * batch)
    return trl.GRPOTrainer(model=str(policy_path), reward_funcs=[str(reward_path)], args=config, train_dataset=dataset)


def trl_path(trainer, rows: list[dict]) -> list[float]:
    """TRL's own reward computation for one step's samples (GRPOTrainer._calculate_rewards)."""
    prompts = [r["prompt"] for r in rows]
    completions = [r["completion"] for r in rows]
    inputs = [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows]
    ids = [[0] for _ in rows]  # the model path never reads completion ids
    return trainer._calculate_rewards(inputs, prompts, completions, ids)[:, 0].tolist()


@torch.inference_mode()
def naive_path(model, tokenizer, rows: list[dict], group: int) -> list[float]:
    """The class on one right-padded batch per group, in order."""
    out = []
    for k in range(0, len(rows), group):
        texts = [tokenizer.apply_chat_template(r["prompt"] + r["completion"], tokenize=False) for r in rows[k : k + group]]
        inputs = tokenizer(texts, return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False)
        out += model(**inputs).logits[:, 0].tolist()
    return out


def engine_path(model: RewardModel, rows: list[dict]) -> tuple[list[float], dict]:
    engine = RewardEngine(model, metrics=None)
    try:
        scores = engine.score(rows)
        stats = engine._stats.snapshot()  # the public stats() needs the engine's text-config fix (issue 23)
    finally:
        engine.close(timeout=60)
    return scores, stats


def direct_path(model: RewardModel, rows: list[dict]) -> list[float]:
    """The engine's encoding, plan and runner, in this thread (no engine threads, queues or futures)."""
    from rewardplug.engine.caches import VisionCache
    from rewardplug.engine.runner import ModelRunner
    from rewardplug.engine.scheduler import make_item, make_units, plan_batches
    from rewardplug.engine.stats import Stats

    encoded, _ = model.encode_many(rows)
    items = [make_item(e, model.turn_start_token_id, None, i) for i, e in enumerate(encoded)]
    runner = ModelRunner(model, VisionCache(0), Stats())
    results = [r for plan in plan_batches(make_units(items, True), 16384, 64) for r in runner.run(plan.units)]
    return [score for _, score in sorted(results, key=lambda r: r[0].index)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # llama and gemma2 need the engine to take model.turn_start_token_id (issue 23 report)
    parser.add_argument("--family", default="qwen3", choices=["qwen3", "qwen2", "llama", "gemma2"])
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="2 prompts, hidden 256, 4 layers, 2 repeats")
    args = parser.parse_args()
    if args.quick:
        args.prompts, args.hidden, args.layers, args.repeats = 2, 256, 4, 2
    torch.manual_seed(0)
    root = Path(tempfile.mkdtemp(prefix="rp-text-rm-"))
    shape = dict(hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
                 num_attention_heads=args.hidden // 64, num_key_value_heads=max(1, args.hidden // 256))  # fmt: skip
    if args.family in ("qwen3", "gemma2"):
        shape["head_dim"] = 64
    if args.family == "gemma2":
        shape["sliding_window"] = 4096
    reward_path = make_tiny_seq_cls_checkpoint(root / "rm", args.family, seed=0, config=shape)
    policy_path = make_tiny_text_policy(root / "policy")
    batch = args.prompts * args.group
    trainer = trl_trainer(reward_path, policy_path, args.group, batch, root / "trainer")
    hf_model = trainer.reward_funcs[0]
    tokenizer = trainer.reward_processing_classes[0]
    rm = RewardModel.from_pretrained(reward_path, dtype="float32", device="cpu")
    params = sum(p.numel() for p in hf_model.parameters())

    warm = workload(1, args.group, seed=999)
    trl_path(trainer, warm), naive_path(hf_model, tokenizer, warm, args.group), engine_path(rm, warm)
    direct_path(rm, warm)

    times: dict[str, list[float]] = {"trl": [], "naive": [], "engine": [], "direct": []}
    worst = {"naive": 0.0, "engine": 0.0, "direct": 0.0}
    tokens = 0
    for r in range(args.repeats):
        rows = workload(args.prompts, args.group, seed=r)
        t = time.perf_counter()
        ref = trl_path(trainer, rows)
        times["trl"].append(time.perf_counter() - t)
        t = time.perf_counter()
        naive = naive_path(hf_model, tokenizer, rows, args.group)
        times["naive"].append(time.perf_counter() - t)
        t = time.perf_counter()
        ours, stats = engine_path(rm, rows)
        times["engine"].append(time.perf_counter() - t)
        t = time.perf_counter()
        direct = direct_path(rm, rows)
        times["direct"].append(time.perf_counter() - t)
        worst["direct"] = max(worst["direct"], max(abs(a - b) for a, b in zip(direct, ref)))
        worst["naive"] = max(worst["naive"], max(abs(a - b) for a, b in zip(naive, ref)))
        worst["engine"] = max(worst["engine"], max(abs(a - b) for a, b in zip(ours, ref)))
        tokens = sum(e.num_tokens for e in rm.encode_many(rows)[0])
        print(f"repeat {r}: trl {times['trl'][-1]:.2f}s  naive {times['naive'][-1]:.2f}s  engine "
              f"{times['engine'][-1]:.2f}s  direct {times['direct'][-1]:.2f}s  prefix hits {stats.get('prefix_hits')}", flush=True)  # fmt: skip

    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\n{args.family} reward model, {params / 1e6:.1f}M parameters, fp32, torch threads {torch.get_num_threads()}")
    print(f"workload: {args.prompts} prompts x G={args.group}, prompts 200-800 tokens, answers 16-512 "
          f"(about {tokens} tokens per step), {args.repeats} repeats")  # fmt: skip
    for name in ("trl", "naive", "engine", "direct"):
        print(f"  {name:7s} median {med[name]:7.2f} s   {batch / med[name]:7.1f} samples/s")
    print(f"  engine vs TRL's path: {med['trl'] / med['engine']:.2f}x   engine vs naive batches: "
          f"{med['naive'] / med['engine']:.2f}x")  # fmt: skip
    print(f"  the engine's passes without its threads (d) vs TRL's path: {med['trl'] / med['direct']:.2f}x, vs naive: "
          f"{med['naive'] / med['direct']:.2f}x")  # fmt: skip
    print(f"  max |score - TRL's|: naive {worst['naive']:.2e}, engine {worst['engine']:.2e}, direct {worst['direct']:.2e}")
    print(f"  load average (1, 5, 15 min): {os.getloadavg()}")


if __name__ == "__main__":
    main()
