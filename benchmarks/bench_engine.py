"""GRPO scoring side by side: the model card's way, naive batching, and RewardEngine.

    python benchmarks/bench_engine.py            # full run (about 5 minutes on 2 cores)
    python benchmarks/bench_engine.py --quick    # smaller workload

Workload: prompts with one 448x448 image (256 image tokens) and a one-line question, G=8
completions of 16-256 tokens each, on a random-weight model sized for this CPU with the 7B's
proportions (benchmarks/common.py), fp32.

(a) the model card's way (``rewardplug.bench.card_way``): one sample at a time, processor per sample,
    full model forward with hidden states and full-vocabulary logits, fp32 head on hidden_states[-1] at
    attention_mask.sum()-1;
(b) naive batched: one processor call per group of G (right padding), one forward of the inner model
    (no logits), no sharing;
(c) RewardEngine: one call with all samples (vision once per image, prompt prefix once per group).
(c') the same with ``cpu_cores="dedicated"`` (its model thread's OpenMP workers spin; for a CPU that
    runs nothing else), alternated with (c) and with the direct calls.

No cache carries over into a timed run: the pixel cache lives on the model and survives across engines,
so every warm-up and every repeated timing of (c) uses images of its own (same shapes, other seeds).
(a) and (b) keep no cache at all, so they score the same samples as (c) and their scores are compared.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    PeakRSS, count_flops, engine_batches_directly, grpo_workload, in_thread, make_bench_checkpoint, matmul_flops,
    param_split,
)  # fmt: skip

from rewardplug import RewardEngine, RewardModel  # noqa: E402
from rewardplug.bench import card_way  # noqa: E402


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def run(args) -> None:
    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp(prefix="rp-bench-"))
    path = make_bench_checkpoint(tmp / "bench")
    rm = RewardModel.from_pretrained(path, dtype="float32", device="cpu", image_roots=None)
    split = param_split(rm)
    print(f"model: vision {split['vision'] / 1e6:.2f}M, LM layers {split['lm_layers'] / 1e6:.2f}M "
          f"(vision/LM {split['vision'] / split['lm_layers']:.2f}), vocab 151936, fp32, {torch.get_num_threads()} threads")  # fmt: skip
    peak_flops = matmul_flops()
    print(f"dense fp32 matmul on this machine: {peak_flops / 1e9:.0f} GFLOP/s")

    samples = grpo_workload(args.prompts, args.group)
    card_subset = samples[: args.card_samples]
    score_one, score_batch, card_encode = card_way(rm)
    mem = PeakRSS()

    def fresh(seed: int) -> list:  # same shapes, images no run has seen
        return grpo_workload(args.prompts, args.group, seed=seed)

    score_one(fresh(101)[0])  # warm up
    with mem.measure():
        ref_a, t_a = timed(lambda: [score_one(s) for s in card_subset])
    mem_a = mem.peak
    with mem.measure():
        ref_b, t_b = timed(lambda: [v for k in range(0, len(samples), args.group)
                                    for v in score_batch(samples[k : k + args.group])])  # fmt: skip
    mem_b = mem.peak

    def engine_run(work=samples, cpu_cores="shared"):
        with RewardEngine(rm, cpu_cores=cpu_cores) as engine:  # fresh: a fresh vision cache (the pixel cache is the model's)
            scores = engine.score(work)
            return scores, engine.stats()

    def direct(work=samples):
        return engine_batches_directly(rm, work)

    engine_run(fresh(102))  # warm up on other images
    with mem.measure():
        (got_c, stats), t_c = timed(engine_run)
    mem_c = mem.peak
    # Engine against direct calls (on this thread, and on a thread of their own: on a CPU torch's kernels run
    # slower there while this thread keeps idle OpenMP workers, ``rewardplug.engine.openmp``) and the engine
    # with cpu_cores="dedicated", alternated and best of 3 each (this machine is noisy), each on new images.
    engine_run(fresh(103), "dedicated")  # warm up
    t_engine, t_direct, t_thread, t_dedicated = [t_c], [], [], []
    for k in range(3):
        work_d, work_e, work_t, work_x = (fresh(200 + 4 * k + j) for j in range(4))
        t_direct.append(timed(lambda: direct(work_d))[1])
        t_engine.append(timed(lambda: engine_run(work_e))[1])
        t_thread.append(timed(lambda: in_thread(lambda: direct(work_t)))[1])
        t_dedicated.append(timed(lambda: engine_run(work_x, "dedicated"))[1])
    flops_c = count_flops(lambda: direct(fresh(300)))

    n = len(samples)
    diff_a = max(abs(x - y) for x, y in zip(ref_a, got_c))
    diff_b = max(abs(x - y) for x, y in zip(ref_b, got_c))
    rate_a, rate_b, rate_c = len(card_subset) / t_a, n / t_b, n / t_c
    print(f"\nworkload: {args.prompts} prompts x G={args.group}, 448x448 image, completions 16-256 tokens "
          f"({stats['real_tokens'] / n:.0f} tokens per sample computed by the engine)")  # fmt: skip
    print(f"{'':28}{'samples/s':>10}{'peak RSS':>11}")
    print(f"{'(a) model card, 1 by 1':28}{rate_a:>10.2f}{mem_a / 2**30:>9.2f}GB   ({len(card_subset)} samples)")
    print(f"{'(b) naive batched':28}{rate_b:>10.2f}{mem_b / 2**30:>9.2f}GB")
    print(f"{'(c) RewardEngine':28}{rate_c:>10.2f}{mem_c / 2**30:>9.2f}GB")
    print(f"(c)/(a) = {rate_c / rate_a:.1f}x   (c)/(b) = {rate_c / rate_b:.2f}x   "
          f"max |score diff| vs (a) {diff_a:.1e}, vs (b) {diff_b:.1e}")  # fmt: skip
    print(f"padding efficiency {stats['padding_efficiency']:.3f}; prefix hits {stats['prefix_hits']}; "
          f"vision hits/misses {stats['vision_hits']}/{stats['vision_misses']}; batches {stats['batches']}")  # fmt: skip
    print(f"engine overhead vs direct calls on the same batches: {min(t_engine) / min(t_direct) - 1:+.1%} "
          f"(best of {len(t_engine)}: {min(t_engine):.2f}s vs {min(t_direct):.2f}s)")  # fmt: skip
    print(f"the same direct calls on a thread of their own: {min(t_thread) / min(t_direct) - 1:+.1%} "
          f"(best of {len(t_thread)}: {min(t_thread):.2f}s): the part of the engine's overhead that is its thread")  # fmt: skip
    rate_x = n / min(t_dedicated)
    print(f"(c') RewardEngine(cpu_cores='dedicated'): {rate_x:.2f} samples/s (best of {len(t_dedicated)}), "
          f"{min(t_dedicated) / min(t_direct) - 1:+.1%} vs the direct calls; (c')/(a) = {rate_x / rate_a:.1f}x   "
          f"(c')/(b) = {rate_x / rate_b:.2f}x   (best (c) of {len(t_engine)}: {n / min(t_engine) / rate_a:.1f}x, "
          f"{n / min(t_engine) / rate_b:.2f}x)")  # fmt: skip
    print(f"engine FLOPs executed {flops_c / 1e9:.0f} GFLOP -> {flops_c / t_c / 1e9:.0f} GFLOP/s = "
          f"{flops_c / t_c / peak_flops:.0%} of dense matmul")  # fmt: skip

    reference = rm.score(samples, batch_size=1)  # the model alone, untimed
    print(f"max |score diff| of (c) vs the model alone (RewardModel.score, batch of one): "
          f"{max(abs(x - y) for x, y in zip(reference, got_c)):.1e}")

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    print("\nhost encoding on one thread, fresh images, G=8 (ms per sample; best of 3 fresh workloads):")
    # "resize on device": what the host does when the vision tower is on a GPU (resize_on_device=True):
    # decode, hash and tokenize; the Pillow-exact resize and the pixel lookup run on the device.
    rm_dev = RewardModel.from_pretrained(path, dtype="float32", device="cpu", image_roots=None, resize_on_device=True)
    print(f"{'image':>7}{'rewardplug':>12}{'resize on device':>18}{'processor 1 by 1':>18}{'2 workers (s/s)':>17}")
    from concurrent.futures import ThreadPoolExecutor

    for side in (448, 1024):
        def best(model, base):
            return min(timed(lambda w=grpo_workload(4, 8, side=side, seed=base + side + k): model.encode_many(w))[1] / 32
                       for k in range(3))  # fmt: skip

        t_rp, t_dev = best(rm, 5000), best(rm_dev, 7000)
        t_card = card_encode(grpo_workload(1, 8, side=side, seed=6000 + side), 1)
        # Scaling: two requests encoded by two threads at once vs one after the other (fresh images each).
        a, b, c, d = (grpo_workload(4, 8, side=side, seed=8000 + side + k) for k in range(4))
        t_seq = timed(lambda: (rm.encode_many(a), rm.encode_many(b)))[1]
        with ThreadPoolExecutor(2) as pool:
            t_par = timed(lambda: list(pool.map(rm.encode_many, [c, d])))[1]
        print(f"{side:>7}{t_rp * 1e3:>12.2f}{t_dev * 1e3:>18.2f}{t_card * 1e3:>18.2f}"
              f"{64 / t_par:>9.0f} vs {64 / t_seq:.0f} ({t_seq / t_par:.2f}x)")  # fmt: skip
    torch.set_num_threads(threads)

    if args.scaling:
        print("\nscaling (engine vs naive batched, same run):")
        print(f"{'G':>4}{'image':>7}{'(b) s/s':>10}{'(c) s/s':>10}{'(c)/(b)':>9}" + "(c') s/s".rjust(10) + "(c')/(b)".rjust(10))
        for group, side in [(1, 448), (4, 448), (8, 448), (16, 448), (8, 224), (8, 672)]:
            work = grpo_workload(max(2, 32 // group), group, side=side, seed=1000 + group + side)  # unseen images
            _, tb = timed(lambda: [v for k in range(0, len(work), group) for v in score_batch(work[k : k + group])])
            with RewardEngine(rm) as eng:
                _, tc = timed(lambda: eng.score(work))
            work = grpo_workload(max(2, 32 // group), group, side=side, seed=2000 + group + side)
            with RewardEngine(rm, cpu_cores="dedicated") as eng:
                _, tx = timed(lambda: eng.score(work))
            print(f"{group:>4}{side:>7}{len(work) / tb:>10.2f}{len(work) / tc:>10.2f}{tb / tc:>9.2f}"
                  f"{len(work) / tx:>10.2f}{tb / tx:>10.2f}")  # fmt: skip


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--card-samples", type=int, default=16, help="samples scored the model card's way (slow)")
    p.add_argument("--no-scaling", dest="scaling", action="store_false")
    p.add_argument("--quick", action="store_true", help="4 prompts, 8 card samples, no scaling table")
    args = p.parse_args()
    if args.quick:
        args.prompts, args.card_samples, args.scaling = 4, 8, False
    run(args)
