"""Soak: threads x GRPO requests over distinct images through one RewardEngine, for N minutes.

    python benchmarks/soak.py --minutes 10                  # writes soak.png next to the output
    python benchmarks/soak.py --minutes 2 --out /tmp/soak.png

Every request is a GRPO group (one prompt with a new 448x448 image, G completions); one request in ten
holds a bad sample (scored with on_invalid="none": it must come back None, the rest scored). The model
is the tiny test checkpoint (``rewardplug.testing.make_tiny_checkpoint``, fp32 CPU): this measures the
engine's memory and bookkeeping over time, not model speed.

Prints requests, errors, RSS at start (after warm-up), peak and end, p50/p99 latency, the budgets and
the RSS growth against them; writes a PNG of RSS, latency and throughput over time (matplotlib).
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

from rewardplug import RewardEngine, RewardModel
from rewardplug.testing import make_tiny_checkpoint

WORDS = ["red", "circle", "noise", "pixel", "blue", "the", "a", "picture", "shows", "maybe", "green"]


def text(n: int, rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(max(1, n // 5)))


def request(thread: int, k: int, size: int, group: int) -> list[dict]:
    rng = random.Random(thread * 1_000_003 + k)
    pixels = np.random.default_rng(thread * 1_000_003 + k).integers(0, 256, (size, size, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)  # distinct per request: every image is a vision and pixel cache miss
    prompt = f"Question {k} from thread {thread}: {text(40, rng)}?"
    out = [{"prompt": prompt, "completion": text(rng.randint(10, 200), rng), "images": [image]} for _ in range(group)]
    if k % 10 == 9:
        out[1] = {"prompt": prompt}  # a bad sample: no completion
    return out


class Recorder:
    """RSS every ``every`` seconds and each request's (end time, latency, ok)."""

    def __init__(self, every: float = 0.5):
        self.process = psutil.Process()
        self.every = every
        self.rss: list[tuple[float, int]] = []
        self.done: list[tuple[float, float, bool]] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.start = time.monotonic()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self):
        while not self.stop.is_set():
            self.rss.append((time.monotonic() - self.start, self.process.memory_info().rss))
            self.stop.wait(self.every)

    def finish(self, latency: float, ok: bool):
        with self.lock:
            self.done.append((time.monotonic() - self.start, latency, ok))


def soak(engine: RewardEngine, *, seconds: float, threads: int, size: int, group: int, warmup_s: float) -> dict:
    rec = Recorder()
    deadline = time.monotonic() + seconds
    errors: list[str] = []
    counts = {"requests": 0, "bad_samples_flagged": 0}
    lock = threading.Lock()

    def client(t: int):
        k = 0
        while time.monotonic() < deadline:
            samples = request(t, k, size, group)
            start = time.monotonic()
            try:
                scores = engine.score(samples, on_invalid="none", timeout=600)
                ok = len(scores) == len(samples) and all(
                    (s is None) == (k % 10 == 9 and i == 1) for i, s in enumerate(scores)
                )
                if not ok:
                    errors.append(f"thread {t} request {k}: wrong result {scores}")
                with lock:
                    counts["bad_samples_flagged"] += k % 10 == 9
            except Exception as e:  # noqa: BLE001 - counted and printed
                ok = False
                errors.append(f"thread {t} request {k}: {type(e).__name__}: {e}")
            rec.finish(time.monotonic() - start, ok)
            with lock:
                counts["requests"] += 1
            k += 1

    workers = [threading.Thread(target=client, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    time.sleep(min(warmup_s, seconds))
    gc.collect()
    warm_rss = rec.process.memory_info().rss
    for w in workers:
        w.join()
    gc.collect()
    time.sleep(2 * rec.every)
    rec.stop.set()
    rec.thread.join()
    after = [r for t, r in rec.rss if t >= warmup_s] or [warm_rss]
    half = warmup_s + (seconds - warmup_s) / 2  # RSS still rising in the second half would be a leak
    second_half = [r for t, r in rec.rss if t >= half] or [warm_rss]
    latencies = np.array([lat for _, lat, _ in rec.done])
    return {
        "recorder": rec,
        "requests": counts["requests"],
        "errors": errors,
        "rss_start": warm_rss,
        "rss_peak": max(after),
        "rss_end": rec.process.memory_info().rss,
        "rss_second_half": (second_half[0], max(second_half)),
        "p50_s": float(np.percentile(latencies, 50)) if len(latencies) else 0.0,
        "p99_s": float(np.percentile(latencies, 99)) if len(latencies) else 0.0,
        "seconds": seconds,
        "warmup_s": warmup_s,
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rec = result["recorder"]
    fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    t, rss = zip(*rec.rss)
    axes[0].plot(t, np.array(rss) / 2**20)
    axes[0].axvline(result["warmup_s"], color="grey", ls="--", label="end of warm-up")
    axes[0].set_ylabel("RSS (MiB)")
    axes[0].legend()
    done_t = np.array([d[0] for d in rec.done])
    lat = np.array([d[1] for d in rec.done])
    axes[1].plot(done_t, lat, ".", ms=2)
    axes[1].set_ylabel("request latency (s)")
    bins = np.arange(0, max(done_t.max() if len(done_t) else 1, 1) + 5, 5)
    counts, edges = np.histogram(done_t, bins=bins)
    axes[2].step(edges[:-1], counts / 5, where="post")
    axes[2].set_ylabel("requests / s (5 s bins)")
    axes[2].set_xlabel("seconds")
    fig.suptitle(f"RewardEngine soak: {result['requests']} requests, {len(result['errors'])} errors")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=6)
    parser.add_argument("--group", type=int, default=4, help="completions per request (G)")
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--vision-cache-mb", type=float, default=64)
    parser.add_argument("--pixel-cache-mb", type=float, default=64)
    parser.add_argument("--max-queued-samples", type=int, default=256)
    parser.add_argument("--warmup-s", type=float, default=60.0, help="long enough for the caches to fill")
    parser.add_argument("--out", type=Path, default=Path("soak.png"))
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_checkpoint(Path(tmp) / "tiny", seed=0)
        model = RewardModel.from_pretrained(path, dtype="float32", device="cpu", pixel_cache_mb=args.pixel_cache_mb)
    engine = RewardEngine(model, vision_cache_mb=args.vision_cache_mb, max_queued_samples=args.max_queued_samples,
                          metrics=None)  # fmt: skip
    try:
        result = soak(engine, seconds=args.minutes * 60, threads=args.threads, size=args.image_size,
                      group=args.group, warmup_s=args.warmup_s)  # fmt: skip
    finally:
        engine.close(timeout=60)
    stats = engine.stats()
    mib = 2**20
    budgets = args.vision_cache_mb + args.pixel_cache_mb
    growth = (result["rss_peak"] - result["rss_start"]) / mib
    print(f"soak: {args.minutes} min, {args.threads} threads, G={args.group}, {args.image_size}x{args.image_size} "
          f"distinct images, vision cache {args.vision_cache_mb} MiB, pixel cache {args.pixel_cache_mb} MiB, "
          f"max_queued_samples {args.max_queued_samples}")  # fmt: skip
    print(f"requests {result['requests']}  samples {stats['samples']}  errors {len(result['errors'])}  "
          f"scoring_errors {stats['scoring_errors']}  invalid (expected) {stats['invalid_samples']}")  # fmt: skip
    print(f"RSS start (after {args.warmup_s:.0f} s warm-up) {result['rss_start'] / mib:.0f} MiB  "
          f"peak {result['rss_peak'] / mib:.0f} MiB  end {result['rss_end'] / mib:.0f} MiB  "
          f"growth {growth:.0f} MiB (cache budgets {budgets:.0f} MiB)")  # fmt: skip
    h0, h1 = result["rss_second_half"]
    print(f"RSS over the second half of the timed part: {h0 / mib:.0f} -> peak {h1 / mib:.0f} MiB "
          f"(+{(h1 - h0) / mib:.0f} MiB)")
    print(f"latency p50 {result['p50_s'] * 1e3:.0f} ms  p99 {result['p99_s'] * 1e3:.0f} ms  "
          f"throughput {result['requests'] / result['seconds']:.2f} requests/s")  # fmt: skip
    print(f"vision cache {stats['vision_cache_bytes'] / mib:.1f} MiB in {stats['vision_cache_entries']} entries")
    for e in result["errors"][:10]:
        print("error:", e)
    plot(result, args.out)
    print(f"wrote {args.out}")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
