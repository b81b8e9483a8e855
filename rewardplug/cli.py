"""rewardplug's command line (the ``rewardplug`` command): see ``DESCRIPTION`` and ``EXIT_CODES``.

No torch, transformers or Ray import happens at import time or while the parser is built, so
``rewardplug --help`` is fast; each command imports what it needs when it runs. The subcommands of
other packages are added by their own ``add_command(s)`` functions, which keep to the same rule.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import IO, Iterator

from .bench import add_command as add_bench_command
from .serving.cli import add_commands as add_serving_commands
from .offline.cli import add_commands as add_offline_commands
from .offline.cli import add_ray_score_arguments

logger = logging.getLogger("rewardplug")

EXIT_OK, EXIT_IO, EXIT_USAGE, EXIT_INVALID, EXIT_FAILURE = 0, 1, 2, 3, 4
EXIT_NO_POOL, EXIT_UNPLACEABLE, EXIT_INTERRUPTED, EXIT_TERMINATED = 5, 6, 130, 143

# The same table as docs/cli.md (tests/test_exit_codes.py holds them to each other and drives each code).
EXIT_CODES = """\
exit codes:
  0    done; for score, eval and pairs: every sample scored
  1    input/output or configuration error: a missing or unwritable file or folder, a model that cannot
       be loaded, an eval --out folder holding another run (nothing was scored)
  2    usage error: unknown command or flag, a missing or bad value
  3    score, eval, pairs: some samples could not be scored (each one's error says why; the others are
       scored)
  4    system failure while scoring (device error, a bug, a lost replica): the run stopped with the
       cause; the rows written before it are kept
  5    pool status/stop: no pool of that name on the cluster
  6    pool start/serve: the pool cannot be placed on the cluster (not enough GPUs or CPUs)
  130  interrupted (Ctrl-C)
  143  terminated (SIGTERM)"""

DESCRIPTION = "Score (images, question, answer) samples with a multimodal reward model; try it, serve it, measure it.\n\n" + EXIT_CODES

DEMO_MODEL = "tiny"  # the demo alone has a default model; every other command needs --model

SCORE_FORMATS = """\
input: JSON Lines, one sample per line (blank lines skipped), "-" for stdin. A sample is
  {"prompt": ..., "completion": ..., "images": [...]}   (TRL style; prompt/completion strings or messages)
  {"messages": [...]}                                  (a whole conversation ending with the answer)
  {"input_ids": [...], "images": [...]}                (token ids in the reward model's chat format)
  An "id" field, if present, is copied to the output row. Images: local paths (relative to the input
  file's folder; readable only under the file's folder, the current folder and --image-root),
  data:image/...;base64 URIs, and http(s) URLs only for hosts given with --allow-url-host.
output: JSON Lines, "-" for stdout; one row per input sample, in input order:
  {"id": ..., "index": 0, "score": 1.23, "error": null}   (score null and error set for a bad sample)
A summary table (count, mean/min/max, errors by reason) goes to stderr at the end."""


class CommandError(Exception):
    """A problem the user can fix (a path, a flag value); printed without a traceback."""

    def __init__(self, message: str, code: int = EXIT_IO):
        super().__init__(message)
        self.code = code


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM, so that files are closed and engines stopped on the way out."""


def warn_if_random(model, file=None) -> None:
    """Print the random-weights banner when ``model`` is a built-in random-weight name."""
    from .named_models import banner, is_random

    if is_random(model):
        print(banner(str(model)), file=file or sys.stderr, flush=True)


def _load(args, **extra):
    from . import named_models
    from .errors import CheckpointError

    try:
        if args.layers is not None:
            extra["layers"] = args.layers  # random-7b only: load() refuses it for any other model
        return named_models.load(args.model, dtype=args.dtype, device=args.device, max_length=args.max_length, **extra)
    except (CheckpointError, OSError, NotImplementedError) as e:
        raise CommandError(f"--model {args.model}: {e}") from e
    except ValueError as e:  # --layers with a model other than random-7b, or out of range
        raise CommandError(f"--model {args.model} --layers {args.layers}: {e}", EXIT_USAGE) from e


def demo_images():
    """Three small synthetic pictures (shapes on colored backgrounds)."""
    from PIL import Image, ImageDraw

    specs = [("red circle", (230, 230, 250), (220, 30, 30), "ellipse"),
             ("blue square", (250, 245, 220), (30, 60, 200), "rectangle"),
             ("green triangle", (235, 250, 235), (20, 150, 40), "polygon")]  # fmt: skip
    images = []
    for name, bg, fg, shape in specs:
        im = Image.new("RGB", (224, 168), bg)
        d = ImageDraw.Draw(im)
        if shape == "polygon":
            d.polygon([(112, 20), (40, 150), (184, 150)], fill=fg)
        else:
            getattr(d, shape)([60, 30, 164, 134], fill=fg)
        images.append((name, im))
    return images


def cmd_demo(args) -> int:
    warn_if_random(args.model, file=sys.stdout)
    t0 = time.perf_counter()
    rm = _load(args)
    print(f"loaded {rm.name_or_path} ({rm.num_parameters() / 1e6:.2f}M parameters, {rm.dtype}, {rm.device}) "
          f"in {time.perf_counter() - t0:.1f}s")  # fmt: skip
    completions = ["It is a {}.", "I see a {} on a plain background.", "There is nothing in the picture.",
                   "A photo of a cat."]  # fmt: skip
    samples, rows = [], []
    for name, image in demo_images():
        for c in completions[: args.group_size]:
            text = c.format(name) if "{}" in c else c
            samples.append({"prompt": "What is in the picture?", "completion": text, "images": [image]})
            rows.append((name, text))
    from .engine import RewardEngine

    t0 = time.perf_counter()
    with RewardEngine(rm, max_batch_size=args.batch_size) as engine:  # shares pictures and prompts in a group
        scores = engine.score(samples)
        stats = engine.stats()
    dt = time.perf_counter() - t0
    print(f"\n{'image':<16} {'completion':<46} {'score':>9}")
    for (name, text), s in zip(rows, scores):
        print(f"{name:<16} {text:<46} {s:>9.4f}")
    print(f"\nscored {len(samples)} samples ({len(rows) // max(args.group_size, 1)} prompts x "
          f"{args.group_size} completions) in {dt:.2f}s: the vision tower ran {stats['vision_misses']} times, "
          f"{stats['prefix_hits']} completions reused their prompt's encoding")  # fmt: skip
    return EXIT_OK


# ---- score ------------------------------------------------------------------------------------------


def check_score_paths(input_path: str, output_path: str) -> None:
    """Fail before any model is loaded if the input cannot be read or the output cannot be written."""
    if input_path != "-":
        src = Path(input_path)
        if not src.is_file():
            raise CommandError(f"INPUT {input_path!r} is not a file")
        if not os.access(src, os.R_OK):
            raise CommandError(f"INPUT {input_path!r} is not readable")
    if output_path == "-":
        return
    dst = Path(output_path)
    folder = dst.parent if str(dst.parent) else Path(".")
    if dst.is_dir():
        raise CommandError(f"OUTPUT {output_path!r} is a folder; give a file name, e.g. {str(dst / 'scores.jsonl')!r}")
    if folder.exists() and not folder.is_dir():
        raise CommandError(f"OUTPUT {output_path!r}: {str(folder)!r} is a file, not a folder")
    if not folder.is_dir():
        raise CommandError(f"OUTPUT {output_path!r}: folder {str(folder)!r} does not exist (create it first)")
    if not os.access(folder, os.W_OK | os.X_OK) or (dst.exists() and not os.access(dst, os.W_OK)):
        raise CommandError(f"OUTPUT {output_path!r} is not writable")
    if input_path != "-" and dst.exists() and dst.resolve() == Path(input_path).resolve():
        raise CommandError(f"OUTPUT {output_path!r} is the INPUT file; scoring would overwrite it")


def read_chunks(lines: IO[str], size: int) -> Iterator[list[tuple[int, object, str | None]]]:
    """(line number, sample or None, parse error or None) for each non-blank line, ``size`` at a time."""
    chunk = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            chunk.append((n, json.loads(line), None))
        except json.JSONDecodeError as e:
            chunk.append((n, None, f"line {n} is not valid JSON ({e.msg})"))
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def cmd_score(args) -> int:
    if args.ray:
        return cmd_score_on_ray(args)
    check_score_paths(args.input, args.output)  # before the model: a typo must not cost a load
    if args.chunk < 1 or args.inflight < 1:
        raise CommandError("--chunk and --inflight must be at least 1", EXIT_USAGE)
    from tqdm.auto import tqdm

    from .engine import RewardEngine
    from .errors import InvalidSampleError
    from .tables import score_summary

    base = Path(args.input).resolve().parent if args.input != "-" else Path.cwd()
    roots = [str(base), "."] + list(args.image_root or [])
    warn_if_random(args.model)
    rm = _load(args, image_roots=roots, image_url_hosts=args.allow_url_host or ())
    # Relative image paths in the file are relative to the file, wherever the command runs.
    import dataclasses

    rm.encoder.policy = dataclasses.replace(rm.encoder.policy, base_dir=str(base))

    scores: list[float | None] = []  # one float per row: the summary's only per-sample state
    errors: dict[int, str] = {}
    src = sys.stdin if args.input == "-" else open(args.input, encoding="utf-8")
    out = sys.stdout if args.output == "-" else open(args.output, "w", encoding="utf-8")
    pending: deque = deque()  # (rows, future) in input order; at most --inflight chunks held

    def write(rows, future) -> None:
        valid = [sample for _, sample, error in rows if error is None]
        try:
            got, bad = (future.result() if future else []), {}
        except InvalidSampleError as e:
            got, bad = (e.scores or [None] * len(valid)), e.errors
        k = 0
        for _, sample, parse_error in rows:
            index = len(scores)
            score, error = None, parse_error
            if parse_error is None:
                score, error = got[k], bad.get(k)
                if score is None and error is None:  # the engine gave no score and no reason: say so
                    error = "not scored (no score came back for this sample)"
                k += 1
            row = {"index": index, "score": score, "error": error}
            if isinstance(sample, dict) and "id" in sample:
                row = {"id": sample["id"], **row}
            out.write(json.dumps(row) + "\n")
            scores.append(score)
            if error is not None:
                errors[index] = error
        out.flush()
        bar.update(len(rows))

    engine = RewardEngine(rm, max_batch_size=args.batch_size, max_batch_tokens=args.max_batch_tokens)
    try:
        with tqdm(desc="scoring", unit="sample", disable=args.quiet, file=sys.stderr) as bar:
            for rows in read_chunks(src, args.chunk):
                samples = [sample for _, sample, error in rows if error is None]
                pending.append((rows, engine.submit(samples) if samples else None))
                while len(pending) > args.inflight:
                    write(*pending.popleft())
            while pending:
                write(*pending.popleft())
    except Exception as e:  # a system failure: stop with its cause, never a silent None
        for _, future in pending:
            if future is not None:
                future.cancel()
        where = "stdout" if args.output == "-" else repr(args.output)
        print(f"rewardplug score: scoring failed after {len(scores)} rows ({type(e).__name__}: {e}); "
              f"the rows written to {where} so far are kept", file=sys.stderr)  # fmt: skip
        logger.debug("scoring failed", exc_info=True)
        return EXIT_FAILURE
    finally:
        engine.close()
        stats = engine.stats()
        if src is not sys.stdin:
            src.close()
        if out is not sys.stdout:
            out.close()
    print(score_summary(scores, errors, stats), file=sys.stderr)
    where = "stdout" if args.output == "-" else args.output
    print(f"wrote {len(scores)} scores to {where} ({len(errors)} samples could not be scored)", file=sys.stderr)
    return EXIT_OK if not errors else EXIT_INVALID


def check_ray_output(output_path: str) -> None:
    """``score --ray`` writes a folder of part files: OUTPUT must be a folder (or not exist yet) in a writable folder."""
    dst = Path(output_path)
    if dst.exists() and not dst.is_dir():
        raise CommandError(f"OUTPUT {output_path!r} is a file; with --ray OUTPUT is a folder of part files")
    folder = dst if dst.is_dir() else (dst.parent if str(dst.parent) else Path("."))
    if not folder.is_dir():
        raise CommandError(f"OUTPUT {output_path!r}: folder {str(folder)!r} does not exist (create it first)")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CommandError(f"OUTPUT {output_path!r} is not writable")


def cmd_score_on_ray(args) -> int:
    """``score --ray``: the offline package's resumable Ray Data scoring (same exit codes)."""
    from .offline.cli import run_ray_score

    if args.input == "-" or args.output == "-":
        raise CommandError("--ray reads files and writes a folder: INPUT and OUTPUT cannot be '-'", EXIT_USAGE)
    if args.layers is not None:
        raise CommandError("--layers is not taken with --ray (its workers load the model by name)", EXIT_USAGE)
    if not Path(args.input).exists():
        raise CommandError(f"INPUT {args.input!r} does not exist")
    check_ray_output(args.output)
    args.input = [args.input]  # score_dataset takes a list of files or folders
    args.no_progress = args.quiet
    return run_ray_score(args)


# ---- parser -------------------------------------------------------------------------------------------


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each flag's default (unless its help already says it, or there is none to show) and keeps
    the descriptions' line breaks."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, [], argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


MODEL_HELP = ("hub id (Skywork/Skywork-VL-Reward-7B) or checkpoint folder; 'tiny' and 'random-7b' are built-in "
              "random-weight models (the scores mean nothing)")


def model_args(sp: argparse.ArgumentParser, *, default: str | None = None) -> None:
    """The flags every model-loading command takes (``RewardModel.from_pretrained``'s options); --model
    is required unless a default is given (the demo's)."""
    if default is None:
        sp.add_argument("--model", required=True, help=MODEL_HELP)
    else:
        sp.add_argument("--model", default=default, help=MODEL_HELP)
    sp.add_argument("--dtype", default="auto", help="auto (the checkpoint's: bf16 for the 7B), bfloat16, float16, float32")
    sp.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: the first GPU if any, else cpu)")
    sp.add_argument("--batch-size", type=int, default=8, help="most samples per forward pass")
    sp.add_argument("--max-length", type=int, default=None, help="refuse samples longer than this many tokens")
    sp.add_argument("--layers", type=int, default=None,
                    help="random-7b only: keep its first N of 28 language layers (a CPU-sized variant)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rewardplug", description=DESCRIPTION, formatter_class=_Formatter)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging and tracebacks")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("demo", help="score GRPO-like groups of completions over generated images",
                       description="Score 3 generated pictures x G completions through the engine and print a table.",
                       formatter_class=_Formatter)  # fmt: skip
    model_args(d, default=DEMO_MODEL)
    d.add_argument("--group-size", type=int, default=4, choices=range(1, 5), metavar="G", help="completions per picture (1-4)")
    d.set_defaults(func=cmd_demo)

    s = sub.add_parser("score", help="score a JSONL file of samples into a JSONL file of scores",
                       description="Score a JSON Lines file, streaming it through a RewardEngine (pictures and "
                       "prompts shared within a chunk; memory bounded by --chunk x --inflight samples).\n\n"
                       + SCORE_FORMATS + "\n\n" + EXIT_CODES,
                       formatter_class=_Formatter)  # fmt: skip
    s.add_argument("input", metavar="INPUT", help="JSONL file of samples, or - for stdin")
    s.add_argument("output", metavar="OUTPUT", help="JSONL file to write (its folder must exist), or - for stdout")
    model_args(s)
    s.add_argument("--max-batch-tokens", type=int, default=16384, help="padded tokens per forward pass (engine budget)")
    s.add_argument("--image-root", action="append", metavar="DIR",
                   help="another folder local image paths may be read from (repeatable)")  # fmt: skip
    s.add_argument("--allow-url-host", action="append", metavar="HOST",
                   help="host whose http(s) image URLs may be fetched (repeatable; '*' for any)")  # fmt: skip
    s.add_argument("--chunk", type=int, default=256, help="samples read and submitted to the engine at a time")
    s.add_argument("--inflight", type=int, default=2, help="chunks submitted ahead of the one being written")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_ray_score_arguments(s)
    s.set_defaults(func=cmd_score)

    add_serving_commands(sub)  # pool start/status/stop, serve

    add_offline_commands(sub, _Formatter)  # eval, pairs
    add_bench_command(sub)  # bench
    return p


def _on_sigterm(signum, frame):
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``rewardplug`` command; returns the exit code (``EXIT_CODES``)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main_thread else None
    try:
        return run_command(args)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def run_command(args) -> int:
    """Run a parsed command: a problem the user can fix is a message and its exit code, not a traceback."""
    try:
        code = args.func(args)
        return code if isinstance(code, int) else EXIT_OK  # some commands return their report
    except CommandError as e:
        print(f"rewardplug {args.command}: error: {e}", file=sys.stderr)
        return e.code
    except Exception as e:  # rewardplug's own errors and OS errors: a message, not a traceback (-v shows it)
        from .errors import RewardPlugError, ScoringError

        if not isinstance(e, (RewardPlugError, OSError)) or args.verbose:
            raise
        print(f"rewardplug {args.command}: error: {e}", file=sys.stderr)
        return EXIT_FAILURE if isinstance(e, ScoringError) else EXIT_IO
    except KeyboardInterrupt:
        print(f"rewardplug {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated:
        print(f"rewardplug {args.command}: terminated (SIGTERM)", file=sys.stderr)
        return EXIT_TERMINATED


if __name__ == "__main__":
    sys.exit(main())
