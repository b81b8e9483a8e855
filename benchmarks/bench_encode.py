"""Host encoding alone: ``RewardModel.encode_many`` on fresh images in G=8 groups, on one core, and the
same requests through encoder worker processes (``rewardplug.encoding.workers``), 1 process vs n.

    python benchmarks/bench_encode.py [--sides 448 1024] [--workers 2] [--groups 4] [--requests 8]

Every timed request has pictures no earlier request had (no cache carried from warm-up or from another
run: each run's seeds differ), so each figure is the cost of fresh images. The checkpoint is the tiny one
with the 7B's pixel bounds (max_pixels 12845056): the encoder's work does not depend on the weights.
Reported per image side:

- one core, in process: ms per sample (best of ``--repeats`` fresh requests), with the host resize
  (CPU engine) and with the resize left to the device (``resize_on_device``, what a GPU node's host does);
- processes: samples/s of ``--requests`` fresh requests sent by as many threads as processes, through 1
  process and through ``--workers`` processes, side by side, and their ratio;
- the content digest of one picture (``rewardplug.images.image_digest``, BLAKE3) beside blake2b of the
  same bytes, the hash it replaced.

Targets (issue 21): one core <= 0.6 ms per sample at 448 px and <= 3 ms at 1024 px; 2 processes >= 1.7x
one on a 2-core machine. The machine's load average is printed with the figures: on a shared machine
they move with it.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from rewardplug import RewardModel, workload
from rewardplug.encoding.workers import EncoderProcesses
from rewardplug.images import image_digest
from rewardplug.testing import make_tiny_checkpoint

_seed = [int(time.time()) % 100_000 * 100]  # a new range per run: no picture is ever seen twice


def fresh(tokenizer, groups: int, side: int) -> list[dict]:
    _seed[0] += 1
    return workload.make_workload(tokenizer, groups, 8, side, 16, 256, _seed[0])


def one_core_ms(rm: RewardModel, side: int, groups: int, repeats: int) -> float:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        best = float("inf")
        for _ in range(repeats):
            samples = fresh(rm.processor.tokenizer, groups, side)
            t0 = time.perf_counter()
            rm.encode_many(samples)
            best = min(best, (time.perf_counter() - t0) / len(samples))
        return best * 1e3
    finally:
        torch.set_num_threads(threads)


def digest_ms(side: int, repeats: int = 20) -> tuple[float, float]:
    """(image_digest, blake2b of the same bytes) in ms for one fresh side x side picture: the content digest
    beside the hash it replaced (same bytes, tobytes() included in both)."""
    image = workload.make_image(side, _seed[0] + 1)

    def best(f) -> float:
        f()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            f()
            times.append(time.perf_counter() - t0)
        return min(times) * 1e3

    return (best(lambda: image_digest(image)),
            best(lambda: hashlib.blake2b(image.tobytes(), digest_size=16).hexdigest()))  # fmt: skip


def stream_rate(pool: EncoderProcesses, requests: list[list[dict]]) -> float:
    """Samples/s of the requests sent by as many threads as the pool has processes."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(pool.workers) as threads:
        for encoded, errors in threads.map(pool.encode_many, requests):
            assert not errors and all(e is not None for e in encoded)
    return sum(len(r) for r in requests) / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sides", type=int, nargs="+", default=[448, 1024])
    parser.add_argument("--groups", type=int, default=4, help="G=8 groups per request")
    parser.add_argument("--repeats", type=int, default=3, help="fresh requests per one-core figure (best of)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--requests", type=int, default=8, help="fresh requests per process figure")
    args = parser.parse_args()

    path = make_tiny_checkpoint(Path(tempfile.mkdtemp()) / "tiny-7b-bounds", seed=0, max_pixels=12845056)
    rm = RewardModel.from_pretrained(path, dtype="float32", device="cpu", image_roots=None)
    rm_dev = RewardModel.from_pretrained(path, dtype="float32", device="cpu", image_roots=None, resize_on_device=True)
    tok = rm.processor.tokenizer
    print(f"cores: {os.cpu_count()}  load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"starting encoder processes (1 and {args.workers}) ...", flush=True)
    t0 = time.perf_counter()
    one, many = EncoderProcesses.for_model(rm, workers=1), EncoderProcesses.for_model(rm, workers=args.workers)
    print(f"started in {time.perf_counter() - t0:.1f} s (imports and processor load, in parallel)")
    try:
        for pool in (one, many):  # each process's first request (lazy imports, the meta backbone) is untimed
            with ThreadPoolExecutor(pool.workers) as threads:
                list(threads.map(pool.encode_many, [fresh(tok, 1, 224) for _ in range(pool.workers)]))
        rm.encode_many(fresh(tok, 1, 224))
        rm_dev.encode_many(fresh(tok, 1, 224))

        print(f"\nG=8, {args.groups} groups per request, fresh images; ms per sample on one core (best of {args.repeats})"
              f", samples/s through processes ({args.requests} requests)")  # fmt: skip
        head = f"{'side':>6}{'1 core':>9}{'1 core, resize on device':>26}{'1 process':>11}{f'{args.workers} processes':>13}{'ratio':>7}"
        print(head)
        for side in args.sides:
            ms = one_core_ms(rm, side, args.groups, args.repeats)
            ms_dev = one_core_ms(rm_dev, side, args.groups, args.repeats)
            r1 = stream_rate(one, [fresh(tok, args.groups, side) for _ in range(args.requests)])
            rn = stream_rate(many, [fresh(tok, args.groups, side) for _ in range(args.requests)])
            print(f"{side:>6}{ms:>9.2f}{ms_dev:>26.2f}{r1:>11.0f}{rn:>13.0f}{rn / r1:>6.2f}x", flush=True)
        print("\nimage digest of one picture, ms (best of 20): BLAKE3 (image_digest) / blake2b (before)")
        for side in args.sides:
            ours, before = digest_ms(side)
            print(f"{side:>6}{ours:>9.2f} / {before:.2f}")
    finally:
        one.close()
        many.close()
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
