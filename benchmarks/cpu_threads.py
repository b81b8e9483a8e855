"""Why the engine on a CPU trails batch-of-one calls at G=1: torch's CPU kernels, called from a thread
other than the main one, run slower than from the main thread with 2 intra-op threads (libgomp's
worker hand-off), while with 1 thread they run the same. The engine's model thread is such a thread.

    python benchmarks/cpu_threads.py

Prints one LM forward pass (the bench model, one 448 px sample, image features given) timed in the
main thread and in another thread, alternated, at 1 and 2 torch threads. On a GPU the host thread
only queues kernels, so this costs nothing there.
"""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

import torch
from common import grpo_workload, make_bench_checkpoint

from rewardplug import RewardModel
from rewardplug.encoding import collate


def main() -> None:
    path = make_bench_checkpoint(Path(tempfile.mkdtemp(prefix="rp-threads-")) / "bench")
    rm = RewardModel.from_pretrained(path, dtype="float32", device="cpu", image_roots=None)
    encoded, _ = rm.encode_many(grpo_workload(1, 1, seed=5))
    sample = encoded[0]
    batch = collate([sample], rm.pad_token_id)
    features = rm.image_features(sample.pixels, sample.image_grid_thw)

    def timed(threads: int, n: int = 10) -> float:
        torch.set_num_threads(threads)  # per thread: each thread sets its own
        rm.forward(batch, features)
        start = time.perf_counter()
        for _ in range(n):
            rm.forward(batch, features)
        return (time.perf_counter() - start) / n * 1e3

    print(f"{'torch threads':>14}{'main thread ms':>16}{'other thread ms':>17}{'ratio':>7}")
    for threads in (1, 2):
        for _ in range(2):
            out = {}
            worker = threading.Thread(target=lambda: out.setdefault("ms", timed(threads)))
            worker.start()
            worker.join()
            main_ms = timed(threads)
            print(f"{threads:>14}{main_ms:>16.1f}{out['ms']:>17.1f}{out['ms'] / main_ms:>7.2f}")


if __name__ == "__main__":
    main()
