"""Command line: ``rewardplug demo`` and ``rewardplug score IN.jsonl OUT.jsonl``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

logger = logging.getLogger("rewardplug")

TINY = "tiny"
BANNER = (
    "=" * 78
    + "\n  rewardplug demo on the embedded tiny checkpoint: RANDOM WEIGHTS, the scores mean nothing.\n"
    "  It runs the same loading and scoring code as the real model. With the real weights:\n"
    "    rewardplug demo --model Skywork/Skywork-VL-Reward-7B\n"
    + "=" * 78
)


def _model_path(model: str) -> str:
    if model == TINY:
        from .testing import cached_tiny_checkpoint

        return str(cached_tiny_checkpoint())
    return model


def _load(args, **extra):
    from .model import RewardModel

    return RewardModel.from_pretrained(
        _model_path(args.model), dtype=args.dtype, device=args.device, max_length=args.max_length, **extra
    )


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
    if args.model == TINY:
        print(BANNER)
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
    return 0


def cmd_score(args) -> int:
    from tqdm.auto import tqdm

    src = Path(args.input)
    roots = [str(src.resolve().parent), "."] + list(args.image_root or [])
    rm = _load(args, image_roots=roots, image_url_hosts=args.allow_url_host or ())
    # Relative image paths in the file are relative to the file, wherever the command runs.
    rm.encoder.policy = dataclasses.replace(rm.encoder.policy, base_dir=str(src.resolve().parent))
    samples, parse_errors = [], {}
    with src.open() as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                samples.append(json.loads(line))
            except json.JSONDecodeError as e:
                parse_errors[len(samples)] = f"line {n} is not valid JSON ({e.msg})"
                samples.append(None)
    bad = 0
    with open(args.output, "w") as out, tqdm(total=len(samples), desc="scoring", unit="sample") as bar:
        for start in range(0, len(samples), args.chunk):
            chunk = samples[start : start + args.chunk]
            encoded, errors = rm.encode_many(chunk)
            scores = rm.score_encoded(encoded, batch_size=args.batch_size)
            for i, (sample, value) in enumerate(zip(chunk, scores)):
                error = parse_errors.get(start + i) or errors.get(i)
                row = {"index": start + i, "score": value, "error": error}
                if isinstance(sample, dict) and "id" in sample:
                    row = {"id": sample["id"], **row}
                bad += row["error"] is not None
                out.write(json.dumps(row) + "\n")
            bar.update(len(chunk))
    print(f"wrote {len(samples)} scores to {args.output} ({bad} samples could not be scored)", file=sys.stderr)
    return 0 if bad == 0 else 2


def cmd_serve(args) -> int:
    import os

    from .serving.http import ServiceSettings, serve_forever

    api_key = args.api_key or os.environ.get("REWARDPLUG_API_KEY")
    if args.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        logger.warning("serving on %s without an API key: anyone who reaches this port can use it", args.host)
    settings = ServiceSettings(
        model=_model_path(args.model), api_key=api_key, max_body_bytes=int(args.max_body_mb * 2**20),
        max_samples=args.max_samples, image_roots=args.image_root or [], image_url_hosts=args.allow_url_host or [],
        model_options={"dtype": args.dtype, "max_length": args.max_length},
    )  # fmt: skip
    serve_forever(settings, host=args.host, port=args.port, replicas=args.replicas,
                  gpus_per_replica=args.gpus_per_replica, cpus_per_replica=args.cpus_per_replica, address=args.address)  # fmt: skip
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rewardplug", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    def model_args(sp):
        sp.add_argument("--model", default=TINY, help="hub id or checkpoint folder (default: the embedded tiny checkpoint)")
        sp.add_argument("--dtype", default="auto", help="auto, bfloat16, float32, ...")
        sp.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: a GPU if any)")
        sp.add_argument("--batch-size", type=int, default=8)
        sp.add_argument("--max-length", type=int, default=None, help="refuse samples longer than this many tokens")

    d = sub.add_parser("demo", help="score GRPO-like groups of completions over generated images")
    model_args(d)
    d.add_argument("--group-size", type=int, default=4, choices=range(1, 5), metavar="G")
    d.set_defaults(func=cmd_demo)

    s = sub.add_parser("score", help="score a JSONL file of samples into a JSONL file of scores")
    model_args(s)
    s.add_argument("input")
    s.add_argument("output")
    s.add_argument("--image-root", action="append", help="folder local image paths may be read from (repeatable)")
    s.add_argument("--allow-url-host", action="append", help="host whose http(s) image URLs may be fetched")
    s.add_argument("--chunk", type=int, default=256, help="samples read and scored per step")
    s.set_defaults(func=cmd_score)
    v = sub.add_parser("serve", help="serve the model over HTTP on Ray Serve (loopback by default)")
    model_args(v)
    v.add_argument("--replicas", type=int, default=1)
    v.add_argument("--gpus-per-replica", type=float, default=0 if not _has_cuda() else 1)
    v.add_argument("--cpus-per-replica", type=float, default=1)
    v.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--api-key", help="require this key (Authorization: Bearer or X-API-Key); or set REWARDPLUG_API_KEY")
    v.add_argument("--image-root", action="append", help="folder local image paths may be read from (repeatable)")
    v.add_argument("--allow-url-host", action="append", help="host whose image URLs may be fetched ('*' for any)")
    v.add_argument("--max-body-mb", type=float, default=64)
    v.add_argument("--max-samples", type=int, default=4096, help="samples per request")
    v.add_argument("--address", help="join this Ray cluster instead of starting one")
    v.set_defaults(func=cmd_serve)
    return p


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
