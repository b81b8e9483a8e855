"""verl's reward loop: a micro-batcher in the reward manager against run_single going straight to the
scorer (the engine's own batching window, or the pool's content-key routing, gathers the items).

    .venv-verl/bin/python benchmarks/bench_verl.py                 # in-process engine
    .venv-verl/bin/python benchmarks/bench_verl.py --pool          # also through a 1-replica RewardPool (Ray
                                                                   # and Serve log to stderr: 2>/dev/null)

verl's own code runs the reward loop: ``RewardLoopWorker`` built from verl's hydra-composed ppo_trainer
config with ``RewardPlugManager``, ``compute_score_batch`` on the worker's event loop (one task per item
calling the manager's ``run_single``, as verl's Ray actor does). Workload: GRPO-like steps of
``--prompts`` prompts x ``--group`` answers, one fresh picture per prompt (in ``multi_modal_data``),
answers of 16..128 tokens, on the tiny checkpoint in fp32.

Modes, side by side in one run, interleaved, each timed run on a fresh model and engine (no cache carried
from warm-up; the warm-up uses pictures of its own):
  batcher: RewardPlugManager as it is: its ``MicroBatcher`` gathers the items that arrive within
           ``batch_wait_ms`` (default 5) into one request;
  direct:  each run_single sends its one sample straight to the scorer's ``ascore`` (the manager's
           ``score_one`` replaced), leaving the gathering to the engine's window / the pool's router.
Printed: samples/s, engine batches per sample, vision-cache and prefix hits, requests, and the largest
score difference between the modes and against ``RewardModel.score``.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import verl  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from verl import DataProto  # noqa: E402
from verl.experimental.reward_loop.reward_loop import RewardLoopWorker  # noqa: E402

import rewardplug.integrations.verl as rp_verl  # noqa: E402
from rewardplug import RewardEngine, named_models, workload  # noqa: E402

CONFIG_DIR = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
STAT_KEYS = ("samples", "batches", "vision_hits", "vision_misses", "prefix_hits", "requests")


async def score_direct(scorer, sample: dict) -> tuple:
    """One run_single's sample sent alone, as a manager without a batcher would."""
    scores, errors = await rp_verl.ascore_with_errors(scorer, [sample])
    return (None, errors[0]) if 0 in errors else (scores[0], None)


def compose_config(tiny_path: str):
    overrides = [f"actor_rollout_ref.model.path={tiny_path}", "reward.reward_manager.source=importlib",
                 "reward.reward_manager.module.path=pkg://rewardplug.integrations.verl",
                 "reward.reward_manager.name=RewardPlugManager", "+reward.rewardplug.backend=engine",
                 f"+reward.rewardplug.model={tiny_path}"]  # fmt: skip
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return compose("ppo_trainer", overrides=overrides)


def rollout_step(tokenizer, prompts: int, group: int, side: int, seed: int) -> tuple[DataProto, list[dict]]:
    """One GRPO step as verl hands it to the reward loop, and the samples the reward model should see."""
    rng = random.Random(seed)
    im_end, pad = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.pad_token_id or 0
    rows, expected = [], []
    for p in range(prompts):
        image = workload.make_image(side, seed * 7919 + p)
        question = f"Question {seed}-{p}: what does this picture show, and how many objects are there?"
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        for _ in range(group):
            answer = workload.text_of_tokens(tokenizer, rng.randint(16, 128), rng)
            rows.append((messages, image, tokenizer.encode(question, add_special_tokens=False),
                         tokenizer.encode(answer, add_special_tokens=False) + [im_end]))  # fmt: skip
            expected.append({"messages": messages + [{"role": "assistant", "content": answer}], "images": [image]})
    p_len, r_len = max(len(r[2]) for r in rows), max(len(r[3]) for r in rows)
    p_ids = torch.tensor([[pad] * (p_len - len(r[2])) + r[2] for r in rows])
    r_ids = torch.tensor([r[3] + [pad] * (r_len - len(r[3])) for r in rows])
    mask = torch.tensor([[0] * (p_len - len(r[2])) + [1] * (len(r[2]) + len(r[3])) + [0] * (r_len - len(r[3]))
                         for r in rows])  # fmt: skip

    def column(values):
        out = np.empty(len(values), dtype=object)
        out[:] = values
        return out

    non_tensors = {"raw_prompt": column([r[0] for r in rows]), "data_source": column(["vqa"] * len(rows)),
                   "multi_modal_data": column([{"image": [r[1]]} for r in rows]),
                   "reward_model": column([{"ground_truth": ""} for _ in rows]),
                   "extra_info": column([{"index": i} for i in range(len(rows))])}  # fmt: skip
    data = DataProto.from_dict(tensors={"prompts": p_ids, "responses": r_ids, "attention_mask": mask},
                               non_tensors=non_tensors)  # fmt: skip
    return data, expected


def fresh_engine(path: str) -> RewardEngine:
    """A new model (its pixel cache is empty) and engine (its vision cache is empty)."""
    model = named_models.load(path, dtype="float32", device="cpu", image_roots=None)
    return RewardEngine(model, metrics=None)


def timed_steps(worker, scorer, mode: str, steps: list, warm: DataProto, stats) -> dict:
    manager = worker.reward_manager
    manager.scorer = scorer
    manager._batchers.clear()  # a batcher over this run's scorer, on first use
    manager.__dict__.pop("score_one", None)
    if mode == "direct":
        manager.score_one = lambda sample: score_direct(scorer, sample)
    worker.loop.run_until_complete(worker.compute_score_batch(warm))
    before = stats()
    t0 = time.perf_counter()
    rewards = []
    for data in steps:
        rewards += [o["reward_score"] for o in worker.loop.run_until_complete(worker.compute_score_batch(data))]
    seconds = time.perf_counter() - t0
    after = stats()
    out = {k: after.get(k, 0) - before.get(k, 0) for k in STAT_KEYS}
    return dict(out, seconds=seconds, rewards=rewards)


def report(name: str, results: dict, n: int) -> None:
    print(f"\n{name}: median of {len(results['direct'])} interleaved runs, {n} samples each")
    print(f"{'mode':8} {'samples/s':>10} {'batches/sample':>15} {'vision hits':>12} {'vision misses':>14} "
          f"{'prefix hits':>12} {'requests':>9}")  # fmt: skip
    for mode, runs in results.items():
        med = lambda k: statistics.median(r[k] for r in runs)  # noqa: E731
        print(f"{mode:8} {statistics.median(n / r['seconds'] for r in runs):10.1f} {med('batches') / n:15.3f} "
              f"{med('vision_hits'):12.0f} {med('vision_misses'):14.0f} {med('prefix_hits'):12.0f} "
              f"{med('requests'):9.0f}")  # fmt: skip
    ratio = statistics.median(r["seconds"] for r in results["batcher"]) / statistics.median(
        r["seconds"] for r in results["direct"])
    diff = max(abs(a - b) for ra, rb in zip(results["batcher"], results["direct"])
               for a, b in zip(ra["rewards"], rb["rewards"]))  # fmt: skip
    print(f"direct / batcher throughput: {ratio:.3f}; largest reward difference between modes: {diff:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="GRPO steps per timed run")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timed runs per mode")
    parser.add_argument("--side", type=int, default=224)
    parser.add_argument("--pool", action="store_true", help="also through a 1-replica RewardPool (starts Ray)")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"load: {os.getloadavg()}, {torch.get_num_threads()} torch threads, {os.cpu_count()} cpus")

    path = named_models.checkpoint_path(named_models.TINY)
    worker = RewardLoopWorker(compose_config(path))
    tok = worker.input_tokenizer
    steps, expected = [], []
    for s in range(args.steps):
        data, want = rollout_step(tok, args.prompts, args.group, args.side, seed=1 + s)
        steps.append(data)
        expected += want
    n = len(expected)
    reference = named_models.load(path, dtype="float32", device="cpu", image_roots=None).score(expected)

    results: dict = {"batcher": [], "direct": []}
    for r in range(args.repeats):
        for mode in (("batcher", "direct") if r % 2 == 0 else ("direct", "batcher")):
            warm, _ = rollout_step(tok, args.prompts, args.group, args.side, seed=1000 + r)  # pictures of its own
            with fresh_engine(path) as engine:
                results[mode].append(timed_steps(worker, engine, mode, steps, warm, engine.stats))
    report("in-process RewardEngine", results, n)
    worst = max(abs(a - b) for runs in results.values() for run in runs for a, b in zip(run["rewards"], reference))
    print(f"largest difference from RewardModel.score: {worst:.2e}")

    if args.pool:
        run_pool(args, worker, path, steps, reference, n)


def run_pool(args, worker, path: str, steps: list, reference: list, n: int) -> None:
    import ray

    from rewardplug import RewardPool

    ray.init(address="local", num_cpus=2, include_dashboard=False, namespace="rewardplug-bench-verl")
    try:
        results: dict = {"batcher": [], "direct": []}
        for r in range(args.repeats):
            for mode in (("batcher", "direct") if r % 2 == 0 else ("direct", "batcher")):
                warm, _ = rollout_step(worker.input_tokenizer, args.prompts, args.group, args.side, seed=2000 + r)
                pool = RewardPool(path, name=f"bench-verl-{mode}-{r}", num_replicas=1, gpus_per_replica=0,
                                  dtype="float32", device="cpu")  # fmt: skip
                try:
                    stats = lambda: {k.removeprefix("engine_"): v for k, v in pool.stats().items()}  # noqa: E731
                    results[mode].append(timed_steps(worker, pool, mode, steps, warm,
                                                     lambda: (time.sleep(1.5), stats())[1]))  # fmt: skip
                finally:
                    pool.shutdown()
        report("1-replica RewardPool", results, n)
        worst = max(abs(a - b) for runs in results.values() for run in runs for a, b in zip(run["rewards"], reference))
        print(f"largest difference from RewardModel.score: {worst:.2e}")
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
