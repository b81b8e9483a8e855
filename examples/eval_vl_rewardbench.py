"""Evaluate a reward model on VL-RewardBench (or any preference set): accuracy, macro average, report.

With the real benchmark (save it once where the hub is reachable):
    python -c "import datasets; datasets.load_dataset('MMInstruction/VL-RewardBench', split='test').save_to_disk('vl_rewardbench')"
    python examples/eval_vl_rewardbench.py --data vl_rewardbench --model Skywork/Skywork-VL-Reward-7B
Offline smoke run (a generated 20-pair set in VL-RewardBench's layout, the random tiny checkpoint):
    python examples/eval_vl_rewardbench.py --tiny
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="saved VL-RewardBench folder, parquet or JSONL")
    p.add_argument("--model", help="hub id or checkpoint folder (Skywork/Skywork-VL-Reward-7B)")
    p.add_argument("--pool", help="score through this running RewardPool instead of loading --model")
    p.add_argument("--out", default="eval-out")
    p.add_argument("--tiny", action="store_true", help="generated data and the tiny random checkpoint")
    args = p.parse_args()
    if not args.tiny and (args.data is None or not (args.model or args.pool)):
        p.error("give --data and --model (or --pool NAME), or --tiny for a smoke run")

    from rewardplug import named_models
    from rewardplug.offline import evaluate

    data = args.data
    if args.tiny:
        from rewardplug.testing import make_preference_set

        data = make_preference_set(Path(tempfile.mkdtemp()) / "bench.jsonl", n_pairs=20)
        args.model, args.pool = named_models.TINY, None
    if args.model and named_models.is_random(args.model):
        print(named_models.banner(args.model))
    source = {"pool": args.pool} if args.pool else {"model": args.model}
    summary = evaluate(data, args.out, **source)
    print(f"overall accuracy {100 * summary.accuracy:.1f}%, macro average {100 * summary.macro_average:.1f}% "
          f"({summary.pairs} pairs, {summary.ties} ties, {summary.unscored} unscored)")  # fmt: skip
    for name, c in summary.categories.items():
        print(f"  {name:<16} {100 * c.accuracy:5.1f}%  ({c.correct}/{c.pairs})")
    print(f"report: {Path(args.out) / 'report.md'}")


if __name__ == "__main__":
    main()
