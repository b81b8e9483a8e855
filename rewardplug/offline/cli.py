"""Command-line parts for offline uses: ``rewardplug eval``, ``rewardplug pairs`` and the ``--ray``
path of ``rewardplug score``.

Only argparse is imported here: torch, Ray and datasets load when a command runs, so ``--help`` stays
fast. ``rewardplug/cli.py`` calls ``add_commands(subparsers)`` and, for ``score --ray``,
``add_ray_score_arguments(parser)`` and ``run_ray_score(args)``. Standalone:
``python -m rewardplug.offline.cli eval DATA --model M``.

A problem the user can fix is raised as ``rewardplug.cli.CommandError`` (imported when a command runs:
``rewardplug.cli`` imports this module), so it is printed as a message naming the flags, with its exit
code, not as a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

MODEL_HELP = ("hub id or checkpoint folder scored in this process through a RewardEngine; 'tiny' and 'random-7b' "
              "are built-in random-weight models (the scores mean nothing)")  # fmt: skip


def _model_arguments(p: argparse.ArgumentParser, *, pool: bool = True, required: bool = True) -> None:
    """--model (and --pool/--address): with ``required``, exactly one of --model and --pool."""
    if pool:
        source = p.add_mutually_exclusive_group(required=required)
        source.add_argument("--model", help=MODEL_HELP)
        source.add_argument("--pool", help="score through the running RewardPool of this name instead")
        p.add_argument("--address", default=None, help="Ray cluster address for --pool (default: the local one)")
    else:
        p.add_argument("--model", required=required, help=MODEL_HELP)
    p.add_argument("--dtype", default="auto", help="auto, bfloat16, float32, ...")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: a GPU if any)")
    p.add_argument("--max-length", type=int, default=None, help="refuse samples longer than this many tokens")
    p.add_argument("--max-batch-size", type=int, default=64, help="rows per forward pass")
    p.add_argument("--image-root", action="append", default=None,
                   help="folder local image paths may be read from (repeatable; default: the data's folder and .)")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _wrap(text: str) -> str:
    """A description as lines (the ``rewardplug`` help keeps descriptions' line breaks as written)."""
    import textwrap

    return textwrap.fill(text, 100, break_on_hyphens=False)


def _model_options(args) -> dict:
    options = {"dtype": args.dtype, "device": args.device, "max_length": args.max_length}
    if args.image_root:
        options["image_roots"] = args.image_root
    return options


def _source(args) -> dict:
    """model= / pool= for the offline functions (argparse lets at most one through)."""
    if args.pool:
        return {"pool": args.pool, "address": args.address}
    from ..cli import warn_if_random

    warn_if_random(args.model)
    return {"model": args.model, "model_options": _model_options(args),
            "engine_options": {"max_batch_size": args.max_batch_size}}  # fmt: skip


def add_eval_command(sub, formatter_class=argparse.HelpFormatter) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "eval",
        formatter_class=formatter_class,
        help="pairwise preference accuracy (VL-RewardBench protocol) with a report and charts",
        description=_wrap("Score each (chosen, rejected) pair; a pair is right when chosen scores strictly higher "
        "(ties and unscorable pairs count as wrong). Writes pairs.jsonl (resume log), scores.json, report.md "
        "and PNG charts into --out. Defaults fit VL-RewardBench's layout (query, image, response, "
        "human_ranking, query_source); chosen/rejected columns are found too."),
    )
    p.add_argument("data", help="datasets folder (save_to_disk), .parquet or .jsonl")
    p.add_argument("--out", default="eval-out", help="output folder (default: eval-out)")
    p.add_argument("--split", default=None, help="split of a saved DatasetDict (default: test)")
    _model_arguments(p)
    c = p.add_argument_group("columns (default: found from the data)")
    c.add_argument("--prompt-column")
    c.add_argument("--image-column")
    c.add_argument("--chosen-column")
    c.add_argument("--rejected-column")
    c.add_argument("--responses-column", help="list of answers (VL-RewardBench: response)")
    c.add_argument("--ranking-column", help="rank per answer, 0 = best (VL-RewardBench: human_ranking)")
    c.add_argument("--id-column", help="unique key per pair, used to resume (default: id)")
    c.add_argument("--category-column", default="auto",
                   help="'auto' (a category column, else VL-RewardBench's General/Hallucination/Reasoning "
                        "from query_source or id), 'vlrewardbench', 'none', or a column name")  # fmt: skip
    p.add_argument("--pairs-per-request", type=int, default=16, help="pairs per request (2 samples each)")
    p.add_argument("--no-resume", action="store_true", help="start over instead of skipping pairs already in --out")
    p.set_defaults(func=cmd_eval)
    return p


def cmd_eval(args) -> int:
    """Exit 0 when every pair was scored, 3 when some were left unscored (they count as wrong)."""
    from ..cli import EXIT_INVALID, EXIT_OK, CommandError
    from .data import PreferenceColumns
    from .evaluation import OtherRunError, evaluate

    columns = PreferenceColumns(
        prompt=args.prompt_column, image=args.image_column, chosen=args.chosen_column, rejected=args.rejected_column,
        responses=args.responses_column, ranking=args.ranking_column, id=args.id_column, category=args.category_column,
    )  # fmt: skip
    try:
        summary = evaluate(args.data, args.out, columns=columns, split=args.split, pairs_per_request=args.pairs_per_request,
                           resume=not args.no_resume, progress=not args.no_progress, **_source(args))  # fmt: skip
    except OtherRunError as e:
        raise CommandError(f"--out {args.out} holds results of another run ({e.differences()}); give another --out, "
                           "or add --no-resume to start over there") from e  # fmt: skip
    print(f"accuracy {100 * summary.accuracy:.1f}% ({summary.correct}/{summary.pairs}), "
          f"macro average {100 * summary.macro_average:.1f}%, ties {summary.ties}, unscored {summary.unscored}")  # fmt: skip
    for name, c in summary.categories.items():
        print(f"  {name:<20} {100 * c.accuracy:6.1f}%  ({c.correct}/{c.pairs}, ties {c.ties})")
    print(f"report: {args.out}/report.md", file=sys.stderr)
    if summary.unscored:
        print(f"{summary.unscored} of {summary.pairs} pairs could not be scored (counted wrong; reasons in "
              f"{args.out}/scores.json)", file=sys.stderr)  # fmt: skip
        return EXIT_INVALID
    return EXIT_OK


def _at_least(kind, low):
    """An argparse type: a number of ``kind`` no smaller than ``low`` (else a usage error naming the flag)."""

    def parse(text: str):
        value = kind(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def add_pairs_command(sub, formatter_class=argparse.HelpFormatter) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "pairs",
        formatter_class=formatter_class,
        help="preference pairs from N scored completions per prompt, as a TRL DPO dataset",
        description=_wrap("Group completions by prompt and images (or --group-column); per prompt keep best vs worst, "
        "or with --mode all every pair whose score gap is above --min-margin, largest first, at most "
        "--max-pairs-per-prompt. Rows without a score are scored with --model or --pool. OUT: .jsonl, "
        ".parquet, or a folder (datasets.save_to_disk, images embedded). The rule goes to OUT.meta.json "
        "(or OUT/rewardplug_pairs.json)."),
    )
    p.add_argument("input", help=".jsonl, .parquet or datasets folder with prompt, completion, images[, score]")
    p.add_argument("output")
    p.add_argument("--mode", choices=["best-worst", "all"], default="best-worst",
                   help="best-worst: one pair per prompt; all: every pair above --min-margin")  # fmt: skip
    p.add_argument("--min-margin", type=_at_least(float, 0), default=0.0, help="chosen - rejected must exceed this (default 0)")
    p.add_argument("--max-pairs-per-prompt", type=_at_least(int, 1), default=None, help="cap for --mode all")
    p.add_argument("--score-column", default="score", help="column holding each completion's score")
    p.add_argument("--group-column", default=None, help="column naming the prompt group (default: prompt + images)")
    p.add_argument("--rescore", action="store_true", help="score every row even when it has a score")
    _model_arguments(p, required=False)  # rows that all have a score need no model
    p.set_defaults(func=cmd_pairs)
    return p


def cmd_pairs(args) -> int:
    """Exit 0, or 3 when some completions could not be scored (they make no pairs; reasons in the metadata)."""
    from ..cli import EXIT_INVALID, EXIT_OK, EXIT_USAGE, CommandError
    from .pairs import MissingScoresError, PairRule, make_pairs

    if args.rescore and not (args.model or args.pool):
        raise CommandError("--rescore scores every row: give --model (a hub id or folder) or --pool NAME", EXIT_USAGE)
    source = _source(args) if (args.model or args.pool) else {}  # without: every row needs its score
    rule = PairRule(args.mode, args.min_margin, args.max_pairs_per_prompt)
    try:
        meta = make_pairs(args.input, args.output, rule=rule, score_column=args.score_column,
                          group_column=args.group_column, rescore=args.rescore, progress=not args.no_progress, **source)  # fmt: skip
    except MissingScoresError as e:
        raise CommandError(f"{e.count} rows of {args.input} have no {e.score_column!r}: give --model (a hub id or "
                           "folder) or --pool NAME to score them, or --score-column for the column that holds "
                           "their scores", EXIT_USAGE) from e  # fmt: skip
    print(f"{meta['pairs']} pairs from {meta['prompts']} prompts ({meta['completions']} completions, "
          f"{meta['scored_here']} scored here, {len(meta['unscorable'])} unscorable) -> {args.output}")  # fmt: skip
    if meta["unscorable"]:
        where = Path(args.output).name + ".meta.json" if Path(args.output).suffix in (".jsonl", ".parquet") else "rewardplug_pairs.json"
        print(f"{len(meta['unscorable'])} completions could not be scored and make no pairs (reasons in {where})",
              file=sys.stderr)  # fmt: skip
        return EXIT_INVALID
    return EXIT_OK


def add_ray_score_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``rewardplug score --ray`` (add them to the score parser; --model is the score's own)."""
    g = p.add_argument_group("cluster scoring over Ray Data (with --ray; OUTPUT is a folder of part files)")
    g.add_argument("--ray", action="store_true", help="score on a Ray cluster with Ray Data, resumably")
    g.add_argument("--ray-address", default=None, help="cluster to join (default: the running one, else a local one)")
    g.add_argument("--actors", type=int, default=1, help="reward-model actors (Ray Data actor pool size)")
    g.add_argument("--gpus-per-actor", type=float, default=None, help="default: 1 when the cluster has GPUs, else 0")
    g.add_argument("--cpus-per-actor", type=float, default=1)
    g.add_argument("--rows-per-block", type=int, default=1024, help="rows per block: the unit of resume")
    g.add_argument("--format", choices=["parquet", "jsonl"], default="parquet", help="part file format")
    g.add_argument("--keep-column", action="append", default=[], help="input column copied to the output (repeatable)")
    g.add_argument("--no-resume", action="store_true", help="delete existing part files and start over")


def run_ray_score(args) -> int:
    """``rewardplug score IN OUT --ray``: score_dataset with the parsed flags. Also reads --model, --dtype,
    --device, --max-length, --batch-size (or --max-batch-size), --max-batch-tokens, --image-root and
    --allow-url-host when the parser has them."""
    from ..cli import warn_if_random
    from .dataset import score_dataset

    warn_if_random(args.model)
    options = {k: v for k, v in (("dtype", getattr(args, "dtype", None)), ("device", getattr(args, "device", None)),
                                 ("max_length", getattr(args, "max_length", None))) if v is not None}  # fmt: skip
    if getattr(args, "image_root", None):
        options["image_roots"] = list(args.image_root)
    if getattr(args, "allow_url_host", None):
        options["image_url_hosts"] = list(args.allow_url_host)
    engine_options = {"max_batch_size": getattr(args, "max_batch_size", None) or getattr(args, "batch_size", None) or 64}
    if getattr(args, "max_batch_tokens", None):
        engine_options["max_batch_tokens"] = args.max_batch_tokens
    result = score_dataset(
        args.input, args.output, model=args.model, format=args.format,
        rows_per_block=args.rows_per_block, concurrency=args.actors, num_gpus=args.gpus_per_actor,
        num_cpus=args.cpus_per_actor, keep_columns=args.keep_column, address=args.ray_address,
        resume=not args.no_resume, progress=not getattr(args, "no_progress", False), model_options=options,
        engine_options=engine_options,
    )  # fmt: skip
    print(f"{result.blocks} blocks ({result.blocks_skipped} already done), {result.rows_scored} rows scored now, "
          f"{result.errors} could not be scored -> {result.output}", file=sys.stderr)  # fmt: skip
    return 0 if result.errors == 0 else 3  # exit code 3: some rows could not be scored (docs/cli.md)


def add_commands(subparsers, formatter_class=argparse.HelpFormatter) -> None:
    """Add ``eval`` and ``pairs`` to a ``rewardplug`` subparsers object (``formatter_class``: the
    ``rewardplug`` command's, which shows each flag's default)."""
    add_eval_command(subparsers, formatter_class)
    add_pairs_command(subparsers, formatter_class)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rewardplug.offline.cli", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)
    add_commands(sub)
    s = sub.add_parser("score", help="score JSONL/parquet rows on a Ray cluster (Ray Data), resumably")
    s.add_argument("input", nargs="+", help=".jsonl / .parquet files or folders of them")
    s.add_argument("output", help="output folder of part files")
    _model_arguments(s, pool=False)
    add_ray_score_arguments(s)
    s.set_defaults(func=run_ray_score)
    return p


def main(argv: list[str] | None = None) -> int:
    from ..cli import run_command

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")  # fmt: skip
    return run_command(args)


if __name__ == "__main__":
    sys.exit(main())
