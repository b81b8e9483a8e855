"""ZeRO-3 reward-model memory: measured per-rank peak on 2 CPU ranks, and computed estimates for the 7B.

    python benchmarks/zero3_memory.py                 # computed estimates for Skywork-VL-Reward-7B (bf16)
    python benchmarks/zero3_memory.py --measure       # measured: 2 gloo ranks on the CPU, sharded vs unsharded

--measure writes a random checkpoint big enough that weights dominate (default: text hidden 1024,
8 layers, vision hidden 512 x 4 blocks, fp32: about 0.5 GB), then launches the deepspeed launcher twice
with 2 ranks: "sharded" builds ShardedRewardModel (partitioned from construction, checkpoint streamed in
module by module), "unsharded" loads RewardModel on each rank (what every rank held before). Both runs
use the same harness (launcher, gloo init, imports, samples); each rank reports its peak RSS
(getrusage ru_maxrss), its RSS before loading, and the parameter bytes it keeps. The ratio is sharded /
unsharded. Scores of the two runs are compared too.

Both runs set glibc's ``MALLOC_MMAP_THRESHOLD_=131072`` (``--malloc fixed``, the default): with glibc's
dynamic threshold, freed large temporaries (zero.Init creates each parameter whole before partitioning
it; loading creates full tensors) stay in the heap and count as resident, so the CPU figure would
measure the allocator's retention rather than what the model needs (a GPU's caching allocator reuses
such blocks). ``--malloc default`` measures with glibc's defaults.

The 7B table (no --measure) is COMPUTED from the meta-device model, not measured: per rank, its 1/N
shard of every parameter plus the working set ZeRO-3 gathers while a layer runs (the largest module
whole plus the prefetch bucket rewardplug configures: 0.9 x hidden^2 parameters). Activations and the
key/value cache come on top, as for a full replica.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GiB = 2**30
MiB = 2**20


# ---- computed estimates for the 7B ---------------------------------------------------------------


def estimates() -> None:
    from rewardplug import RewardModel
    from rewardplug.testing import QWEN2_5_VL_7B_CONFIG, make_tiny_checkpoint

    path = make_tiny_checkpoint(tempfile.mkdtemp(), config=QWEN2_5_VL_7B_CONFIG, weights=False)
    rm = RewardModel.from_pretrained(path, device="meta", dtype="bfloat16")
    bb = rm.backbone
    total = sum(p.numel() for p in bb.parameters())
    layer = max(sum(p.numel() for p in m.parameters()) for m in list(bb.language_model.layers) + list(bb.visual.blocks))
    embed = bb.language_model.embed_tokens.weight.numel()
    hidden = rm.config.text_config.hidden_size
    prefetch = int(0.9 * hidden * hidden)
    print("COMPUTED ESTIMATES (not measured): Skywork-VL-Reward-7B parameters per GPU in bf16 under ZeRO-3")
    print(f"backbone (no lm_head): {total / 1e9:.3f}B parameters = {2 * total / GiB:.2f} GiB in bf16 "
          f"(value head: fp32, {hidden + 1} parameters, partitioned too)")
    print(f"largest module gathered at once: embeddings {embed / 1e6:.0f}M, decoder layer {layer / 1e6:.0f}M parameters")
    print(f"\n{'ranks':>6}{'shard/GPU':>12}{'+ gathered':>13}{'est. peak/GPU':>15}{'vs full':>9}")
    print(f"{'full':>6}{2 * total / GiB:>10.2f}GB{0:>11.2f}GB{2 * total / GiB:>13.2f}GB{1:>8.0%}")
    for n in (2, 4, 8):
        shard = 2 * total / n
        gathered = 2 * (max(layer, embed) + prefetch)
        print(f"{n:>6}{shard / GiB:>10.2f}GB{gathered / GiB:>11.2f}GB{(shard + gathered) / GiB:>13.2f}GB"
              f"{(shard + gathered) / (2 * total):>8.0%}")


# ---- measured on 2 CPU ranks ---------------------------------------------------------------------


def bench_config(hidden: int, layers: int, vision_hidden: int, vision_depth: int) -> dict:
    from rewardplug.testing import tiny_config

    heads = hidden // 64
    return tiny_config(
        hidden_size=hidden, intermediate_size=int(2.75 * hidden), num_hidden_layers=layers, max_window_layers=layers,
        num_attention_heads=heads, num_key_value_heads=max(1, heads // 4),
        rope_scaling={"mrope_section": [8, 12, 12], "rope_type": "default", "type": "default"},
        vision_config=dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=int(2.75 * vision_hidden),
                           num_heads=vision_hidden // 64, out_hidden_size=hidden, fullatt_block_indexes=[vision_depth - 1]),
    )  # fmt: skip


def samples_for(rank: int) -> list:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(rank)
    image = Image.fromarray((rng.random((112, 140, 3)) * 255).astype("uint8"))
    return [{"prompt": "What is in the picture?", "completion": "A picture " + "of noise " * k, "images": [image]}
            for k in range(3 + rank)]  # fmt: skip


def worker(kind: str, checkpoint: str, out: str) -> None:
    """One rank (started by the deepspeed launcher)."""
    import deepspeed
    import psutil
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend="gloo")
    from rewardplug import RewardModel

    rank = dist.get_rank()
    # Import the model code and read the processor first, so rss_before..peak is the load itself.
    RewardModel.from_pretrained(checkpoint, device="meta", image_roots=None)
    rss_before = psutil.Process().memory_info().rss
    start = time.perf_counter()
    if kind == "sharded":
        from rewardplug.integrations.deepspeed import ShardedRewardModel

        rm = ShardedRewardModel.from_pretrained(
            checkpoint, dtype="float32", image_roots=None,
            ds_config={"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}},
        )  # fmt: skip
        param_bytes, total_bytes = rm.local_bytes(), 4 * rm.total_parameters()
    else:
        rm = RewardModel.from_pretrained(checkpoint, dtype="float32", device="cpu", image_roots=None)
        param_bytes = total_bytes = rm.memory_bytes()
    load_s = time.perf_counter() - start
    peak_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    scores = rm.score(samples_for(rank))
    dist.barrier()
    result = {
        "rank": rank, "rss_before": rss_before, "peak_after_load": peak_load,
        "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "param_bytes": param_bytes,
        "total_bytes": total_bytes, "load_s": load_s, "scores": scores,
    }  # fmt: skip
    Path(out, f"{kind}-rank{rank}.json").write_text(json.dumps(result))


def launch(kind: str, checkpoint: Path, out: Path, malloc: str) -> list[dict]:
    launcher = shutil.which("deepspeed", path=os.path.dirname(sys.executable)) or shutil.which("deepspeed")
    cmd = [launcher, "--num_gpus", "2", "--no_local_rank", __file__, "--worker", kind, str(checkpoint), str(out)]
    env = dict(os.environ)
    if malloc == "fixed":
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return [json.loads((out / f"{kind}-rank{r}.json").read_text()) for r in range(2)]


def measure(args) -> None:
    from rewardplug.testing import make_tiny_checkpoint

    work = Path(tempfile.mkdtemp(prefix="zero3-memory-"))
    try:
        config = bench_config(args.hidden, args.layers, args.vision_hidden, args.vision_depth)
        checkpoint = make_tiny_checkpoint(work / "checkpoint", config=config, seed=0)
        size = sum(f.stat().st_size for f in checkpoint.glob("*.safetensors"))
        print(f"checkpoint: text hidden {args.hidden} x {args.layers} layers, vision hidden {args.vision_hidden} x "
              f"{args.vision_depth} blocks, fp32, {size / MiB:.0f} MiB of safetensors (lm_head included; never loaded)")
        runs = {kind: launch(kind, checkpoint, work, args.malloc) for kind in ("unsharded", "sharded")}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nMEASURED on this machine: 2 gloo ranks on the CPU (deepspeed launcher), glibc malloc {args.malloc}, per rank")
    print(f"{'run':>10}{'rank':>5}{'RSS before load':>17}{'peak RSS':>10}{'peak - before':>15}{'params kept':>13}{'load s':>8}")
    for kind, ranks in runs.items():
        for r in ranks:
            print(f"{kind:>10}{r['rank']:>5}{r['rss_before'] / MiB:>14.0f}MiB{r['peak'] / MiB:>7.0f}MiB"
                  f"{(r['peak'] - r['rss_before']) / MiB:>12.0f}MiB{r['param_bytes'] / MiB:>10.0f}MiB{r['load_s']:>8.1f}")
    print("\nsharded / unsharded, per rank:")
    for rank in range(2):
        s, u = runs["sharded"][rank], runs["unsharded"][rank]
        print(f"  rank {rank}: peak RSS {s['peak'] / u['peak']:.2f}x, peak growth over the pre-load RSS "
              f"{(s['peak'] - s['rss_before']) / (u['peak'] - u['rss_before']):.2f}x, "
              f"parameter bytes kept {s['param_bytes'] / u['param_bytes']:.2f}x "
              f"(model: {u['total_bytes'] / MiB:.0f} MiB of parameters)")
    diff = max(abs(a - b) for r in range(2) for a, b in zip(runs["sharded"][r]["scores"], runs["unsharded"][r]["scores"]))
    print(f"scores: max |sharded - unsharded| = {diff:.2e} over {sum(len(r['scores']) for r in runs['sharded'])} samples")


def main(argv=None) -> None:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--worker":
        return worker(*sys.argv[2:5])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--measure", action="store_true", help="run the 2-rank CPU measurement")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vision-hidden", type=int, default=512)
    p.add_argument("--vision-depth", type=int, default=4)
    p.add_argument("--malloc", choices=("fixed", "default"), default="fixed",
                   help="fixed: MALLOC_MMAP_THRESHOLD_=131072 in both runs (see above); default: glibc's")
    args = p.parse_args(argv)
    if args.measure:
        measure(args)
    else:
        estimates()


if __name__ == "__main__":
    main()
