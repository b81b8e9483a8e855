"""``rewardplug bench``: the model card's way, naive batches, the engine and the pool, side by side.

    rewardplug bench                                   # tiny checkpoint, CPU or the first GPU
    rewardplug bench --model Skywork/Skywork-VL-Reward-7B --groups 32 --group-size 8 --image-size 448
    rewardplug bench --model random-7b                 # the 7B's architecture, random weights, no download
    rewardplug bench --model random-7b --layers 2 --device cpu --dtype float32   # its first 2 layers

Each method scores a GRPO-like workload (``--groups`` prompts with one ``--image-size`` picture each,
``--group-size`` answers of ``--answer-tokens`` tokens per prompt) made of images no other run has seen,
so no pixel or vision cache carries over from a warm-up or from another method. Every method's scores
are compared with the model alone (``RewardModel.score``, batch of one) on the same samples.

Reported per method: samples/s, tokens/s, host encoding ms per sample, model FLOP/s and MFU. Model FLOPs
are the useful work of the workload, counted the same for every method: the vision tower once per
image, each prompt once per group, each answer on top of its prompt (matmuls and attention, 2 FLOPs
per multiply-add). The peak is the device's dense bf16 figure from a table of known GPUs, or a measured
dense matmul (CPU, unknown GPUs, fp32). Writes ``bench.json`` and ``bench.png`` into ``--out``.
A random-weight model (``tiny``, ``bench-cpu``, ``random-7b``) is announced before and after the table
and marked in the JSON (``random_weights``): its speed is the real model's, its scores mean nothing.
"""
# This module imports only argparse at import time (``rewardplug --help`` stays fast).

from __future__ import annotations

import argparse

# Dense bf16 tensor-core peaks (FLOP/s, no sparsity) by device-name substring, most specific first.
PEAK_BF16 = [
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("A100", 312e12),
    ("L40S", 362e12),
    ("4090", 165e12),  # RTX 4090, fp32 accumulate halves it on GeForce parts
]


DESCRIPTION = """\
Score one GRPO-like workload four ways, side by side: the model card's recipe (one sample at a time),
naive batches, RewardEngine and (with --replicas) a RewardPool. The workload is --groups prompts with
one --image-size picture each and --group-size answers of --answer-tokens tokens, made of pictures no
other run has seen (no cache carries over). Every method's scores are checked against the model alone.

Reports samples/s, tokens/s, host encoding ms per sample and MFU (useful FLOPs over the device's dense
bf16 peak, or a measured matmul rate on a CPU); writes bench.json and bench.png into --out. A random-weight
model (tiny, bench-cpu, random-7b) is announced: its speed is the real model's, its scores mean nothing.

examples:
  rewardplug bench                                   # tiny checkpoint, CPU or the first GPU
  rewardplug bench --model Skywork/Skywork-VL-Reward-7B --groups 32 --group-size 8 --image-size 448
  rewardplug bench --model random-7b                 # the 7B's architecture, random weights, no download
  rewardplug bench --model random-7b --layers 2 --device cpu --dtype float32"""


def add_command(subparsers) -> argparse.ArgumentParser:
    """Add ``bench`` to a ``rewardplug`` subparsers object."""
    p = subparsers.add_parser(
        "bench",
        help="throughput of the model card's way, naive batches, the engine and the pool, side by side",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="tiny",
                   help="hub id or folder; 'tiny' (default) the tiny test checkpoint, 'bench-cpu' a CPU-sized "
                        "random model with the 7B's proportions, 'random-7b' the 7B's architecture with random "
                        "weights built on the device (no download)")  # fmt: skip
    p.add_argument("--layers", type=int, default=None,
                   help="random-7b only: keep its first N of 28 language layers (and 32N/28 vision blocks)")
    p.add_argument("--groups", type=int, default=4, help="prompts (one image each) per method (default 4)")
    p.add_argument("--group-size", type=int, default=8, help="answers per prompt, G (default 8)")
    p.add_argument("--image-size", type=int, default=448, help="image side in pixels (default 448)")
    p.add_argument("--answer-tokens", default="16-256", help="answer length range LO-HI in tokens (default 16-256)")
    p.add_argument("--card-samples", type=int, default=None,
                   help="samples scored the model card's way (slow; default: one group)")  # fmt: skip
    p.add_argument("--replicas", type=int, default=0, help="pool replicas (needs ray; 0 = no pool column)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: first GPU, else CPU)")
    p.add_argument("--dtype", default=None, help="default bfloat16 on GPU, float32 on CPU")
    p.add_argument("--cpu-cores", choices=["shared", "dedicated"], default="shared",
                   help="on a CPU: the engine's cpu_cores ('dedicated' when nothing else uses this machine's "
                        "cores: its model thread's OpenMP workers spin between kernels; default shared)")  # fmt: skip
    p.add_argument("--out", default="bench-results", help="folder for bench.json and bench.png")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> dict:
    """Run the benchmark described by parsed ``args``: prints a table, writes ``bench.json`` and
    ``bench.png`` into ``args.out``, and returns the JSON's content."""
    import json
    import logging
    from pathlib import Path

    import torch

    from . import named_models
    from .workload import make_workload

    log = logging.getLogger(__name__)
    lo, hi = _token_range(args.answer_tokens)
    if args.layers is not None and args.model != named_models.RANDOM_7B:
        raise SystemExit(f"--layers applies to --model {named_models.RANDOM_7B} only")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype_name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    random_weights = named_models.is_random(args.model)
    if random_weights:
        print(named_models.banner(args.model), flush=True)
    options = {"layers": args.layers} if args.layers is not None else {}
    rm = named_models.load(args.model, dtype=dtype_name, device=device, image_roots=None, **options)
    G, n_groups = args.group_size, args.groups
    card_n = args.card_samples if args.card_samples is not None else G
    tokenizer = rm.processor.tokenizer

    def workload(tag: int, groups: int = n_groups) -> list[dict]:
        # A distinct seed per use: every timed run sees images nothing has cached.
        return make_workload(tokenizer, groups, G, args.image_size, lo, hi, seed=args.seed * 1000 + tag)

    model_dtype = rm.dtype
    peak, peak_source = device_peak_flops(device, model_dtype)
    report: dict = {
        "device": str(device), "device_name": _device_name(device), "model": args.model, "dtype": dtype_name,
        "layers": rm.config.text_config.num_hidden_layers, "parameters": rm.num_parameters(),
        "random_weights": random_weights, "torch_threads": torch.get_num_threads(), "cpu_cores": args.cpu_cores,
        "workload": {"groups": n_groups, "group_size": G, "image_size": args.image_size,
                     "answer_tokens": [lo, hi], "samples": n_groups * G, "card_samples": card_n},
        "peak_flops": peak, "peak_source": peak_source, "methods": {},
    }  # fmt: skip
    report["encode_ms_per_sample"] = {"rewardplug_1_thread": encode_ms_per_sample(rm, workload(5))}
    methods = report["methods"]

    card_one, naive_batch, card_encode = card_way(rm)
    card_samples = workload(1, groups=-(-card_n // G))[:card_n]
    card_one(workload(11)[0])  # warm-up on other images
    methods["card"] = measure(rm, card_samples, lambda s: [card_one(x) for x in s], peak, device)
    encode = report["encode_ms_per_sample"]
    methods["card"]["encode_ms_per_sample"] = encode["card_processor_1_by_1"] = card_encode(workload(6, 1), 1) * 1e3
    naive_batch(workload(12, groups=1))
    methods["naive"] = measure(
        rm, workload(2), lambda s: [v for k in range(0, len(s), G) for v in naive_batch(s[k : k + G])], peak, device
    )
    methods["naive"]["encode_ms_per_sample"] = encode["processor_per_group"] = card_encode(workload(7, 1), G) * 1e3
    del card_one, naive_batch, card_encode
    _free(device)

    from .engine import RewardEngine

    def engine_score(samples):
        with RewardEngine(rm, cpu_cores=args.cpu_cores) as engine:  # a fresh engine: fresh vision cache
            return engine.score(samples)

    engine_score(workload(13, groups=1))
    methods["engine"] = measure(rm, workload(3), engine_score, peak, device)
    methods["engine"]["encode_ms_per_sample"] = encode["rewardplug_1_thread"]

    if args.replicas > 0 and _ray_importable():
        pool_samples, pool_warmup = workload(4), workload(14)
        reference = rm.score(pool_samples, batch_size=1)
        stats = workload_stats(rm, pool_samples)
        del rm, engine_score  # the replicas load their own copies
        _free(device)
        pool_model = args.model if args.model == named_models.RANDOM_7B else named_models.checkpoint_path(args.model)
        methods["pool"] = measure_pool(pool_model, args, device, dtype_name, pool_samples, pool_warmup, reference,
                                       stats, peak)  # fmt: skip
        if "error" not in methods["pool"]:
            methods["pool"]["encode_ms_per_sample"] = encode["rewardplug_1_thread"]
    if peak_source.startswith("measured"):  # measured again at the end: the faster of the two is the peak
        again, _ = device_peak_flops(device, model_dtype)
        if again > peak:
            for m in methods.values():
                if m.get("mfu") is not None:
                    m["mfu"] *= peak / again
            report["peak_flops"] = peak = again
    ratios = {}
    rate = {k: v.get("samples_per_s") for k, v in methods.items()}
    for a, b in (("engine", "card"), ("engine", "naive"), ("pool", "engine"), ("naive", "card")):
        if rate.get(a) and rate.get(b):
            ratios[f"{a}_vs_{b}"] = rate[a] / rate[b]
    report["ratios"] = ratios

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    if random_weights:
        print(named_models.banner(args.model))
    try:
        plot(report, out / "bench.png")
    except ImportError:
        log.warning("matplotlib is not installed: no bench.png (pip install matplotlib)")
    print(f"\nwrote {out / 'bench.json'} and {out / 'bench.png'}")
    return report


# ---- methods -------------------------------------------------------------------------------------


def card_way(rm):
    """The model card's code, ported to transformers 5 (TRL no longer has its head class): one sample at a
    time through the processor and the full model with hidden states and vocabulary logits. Also the
    naive batched way: one processor call per group (right padding), the inner model, no sharing.

    Built around ``rm``'s own backbone and value head (no second copy of the weights; a 7B fits once
    on a card): the full model is the backbone plus an ``lm_head`` in the model's dtype on its device.
    The head's values never reach a score, so it is zeros; its matmul costs what the real one costs."""
    import copy
    import time

    import torch
    from qwen_vl_utils import process_vision_info

    from .model import _backbone_class

    config = rm.config
    device = rm.device
    with torch.device("meta"):
        model = _backbone_class(config.model_type)._from_config(config, dtype=rm.dtype)
    model.model = rm.backbone
    text = config.text_config
    model.lm_head = torch.nn.Linear(text.hidden_size, text.vocab_size, bias=False, device=device, dtype=rm.dtype)
    torch.nn.init.zeros_(model.lm_head.weight)
    model.eval()
    processor = copy.deepcopy(rm.processor)
    processor.image_processor = copy.deepcopy(rm.image_processor)  # the PIL processor, as the card's era had
    processor.tokenizer.padding_side = "right"  # the card's index (attention_mask.sum() - 1) needs it
    head = rm.value_head

    def messages(s):
        content = [{"type": "image", "image": im} for im in s["images"]] + [{"type": "text", "text": s["prompt"]}]
        return [{"role": "user", "content": content}, {"role": "assistant", "content": s["completion"]}]

    def inputs_of(group):
        msgs = [messages(s) for s in group]
        texts = [processor.apply_chat_template(m, tokenize=False, add_generation_prompt=False) for m in msgs]
        image_inputs, video_inputs = process_vision_info(msgs)
        return processor(text=texts, images=image_inputs, videos=video_inputs, padding=True, return_tensors="pt")

    @torch.inference_mode()
    def score_one(s):
        inputs = inputs_of([s]).to(device)
        out = model(**inputs, output_hidden_states=True, return_dict=True)
        values = head(out.hidden_states[-1].float()).squeeze(-1)
        return values.gather(-1, inputs["attention_mask"].sum(-1, keepdim=True) - 1).item()

    @torch.inference_mode()
    def score_batch(group):
        inputs = inputs_of(group).to(device)
        hidden = model.model(**inputs).last_hidden_state
        values = head(hidden.float()).squeeze(-1)
        return values.gather(-1, inputs["attention_mask"].sum(-1, keepdim=True) - 1).squeeze(-1).tolist()

    def encode_seconds_per_sample(samples, group_size: int):
        """Host work (template, qwen-vl-utils, processor) per sample on one thread, ``group_size`` per call."""
        with _one_thread():
            t0 = time.perf_counter()
            for k in range(0, len(samples), group_size):
                inputs_of(samples[k : k + group_size])
            return (time.perf_counter() - t0) / len(samples)

    return score_one, score_batch, encode_seconds_per_sample


def measure(rm, samples, score, peak, device) -> dict:
    """Time ``score(samples)``, then (untimed) compare with the model alone and count useful FLOPs."""
    import time

    _sync(device)
    t0 = time.perf_counter()
    got = score(samples)
    _sync(device)
    seconds = time.perf_counter() - t0
    reference = rm.score(samples, batch_size=1)
    return summarize(workload_stats(rm, samples), got, reference, seconds, peak)


def measure_pool(model, args, device, dtype_name, samples, warmup, reference, stats, peak) -> dict:
    import time

    try:
        from .serving.pool import RewardPool

        gpus = 1 if device.type == "cuda" else 0
        with RewardPool(str(model), num_replicas=args.replicas, gpus_per_replica=gpus, dtype=dtype_name) as pool:
            pool.score(warmup)
            t0 = time.perf_counter()
            got = pool.score(samples)
            seconds = time.perf_counter() - t0
            pool.shutdown()
    except Exception as e:  # noqa: BLE001 - the other columns still stand; say why this one is missing
        return {"error": f"{type(e).__name__}: {e}"}
    return summarize(stats, got, reference, seconds, peak, replicas=args.replicas)


def summarize(stats: dict, got, reference, seconds, peak, replicas: int = 1) -> dict:
    flops = stats["flops"]
    out = {
        "samples": stats["samples"],
        "seconds": seconds,
        "samples_per_s": stats["samples"] / seconds,
        "tokens_per_s": stats["tokens"] / seconds,
        "model_flops": flops,
        "model_flops_per_s": flops / seconds if flops else None,
        "mfu": flops / seconds / (peak * replicas) if flops and peak else None,
        "max_abs_diff": max(abs(a - b) for a, b in zip(got, reference)),
    }
    return out


def workload_stats(rm, samples) -> dict:
    """Samples, tokens and useful model FLOPs of a workload (encoded with ``rm``, untimed)."""
    encoded, _ = rm.encode_many(samples)
    im_start = rm.processor.tokenizer.convert_tokens_to_ids("<|im_start|>")
    tokens = sum(e.num_tokens for e in encoded if e is not None)
    return {"samples": len(samples), "tokens": tokens, "flops": useful_flops(rm, encoded, im_start)}


def useful_flops(rm, encoded, im_start: int) -> float:
    """The workload's useful FLOPs: vision once per distinct image, each prompt (up to its last
    <|im_start|>) once, each answer on top of it; 2 per multiply-add, attention included (causal)."""
    text, vision = rm.config.text_config, rm.config.vision_config
    lm_params = sum(p.numel() for p in rm.backbone.language_model.layers.parameters())
    vis_params = sum(p.numel() for p in rm.backbone.visual.parameters())
    heads_dim = text.num_attention_heads * (getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads)
    window = (getattr(vision, "window_size", 112) // vision.patch_size) ** 2
    full_blocks = len(getattr(vision, "fullatt_block_indexes", []) or [])
    depth = vision.depth

    def lm(new: int, context_before: int) -> float:  # new tokens after context_before cached ones
        attn_pairs = new * context_before + new * (new + 1) / 2
        return 2 * lm_params * new + 4 * heads_dim * attn_pairs * text.num_hidden_layers

    def tower(patches: int) -> float:
        pairs = patches * (full_blocks * patches + (depth - full_blocks) * min(window, patches))
        return 2 * vis_params * patches + 4 * vision.hidden_size * pairs

    total, images, prompts = 0.0, set(), set()
    for e in encoded:
        if e is None:
            continue
        for digest, grid in zip(e.image_digests, e.image_grid_thw if e.image_grid_thw is not None else []):
            if digest not in images:
                images.add(digest)
                total += tower(int(grid.prod()))
        starts = (e.input_ids == im_start).nonzero()
        p = int(starts[-1]) + 1 if len(starts) else 0
        key = (e.input_ids[:p].numpy().tobytes(), tuple(e.image_digests))
        if key not in prompts:
            prompts.add(key)
            total += lm(p, 0)
        total += lm(e.num_tokens - p, p)
    return total


def encode_ms_per_sample(rm, samples) -> float:
    """rewardplug's host encoding of a whole request on one thread, fresh images (ms per sample)."""
    import time

    with _one_thread():
        t0 = time.perf_counter()
        rm.encode_many(samples)
        return (time.perf_counter() - t0) / len(samples) * 1e3


# ---- device --------------------------------------------------------------------------------------


def device_peak_flops(device, dtype) -> tuple[float, str]:
    """(peak FLOP/s, where it comes from): the table for known GPUs in bf16/fp16, else a measured dense
    matmul in the model's dtype on the device."""
    import torch

    name = _device_name(device)
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        for key, peak in PEAK_BF16:
            if key in name:
                return peak, f"table: {key} dense bf16"
    return measured_matmul_flops(device, dtype), f"measured dense {str(dtype).replace('torch.', '')} matmul"


def measured_matmul_flops(device, dtype, seconds: float = 1.0) -> float:
    """The fastest of the square matmuls run for ``seconds``, after as long a warm-up: the device's rate
    when nothing disturbs it. An average over one burst moved by 10-40% between runs on a shared CPU (a
    virtual machine's cores come back slowly from idle), and the MFU with it."""
    import time

    import torch

    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    warm = time.perf_counter() + seconds
    while time.perf_counter() < warm:
        a @ b
        _sync(device)
    best, end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def _device_name(device) -> str:
    import platform

    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device) -> None:
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class _one_thread:
    """Host encoding is measured on one core (torch's intra-op threads set to 1 for the block)."""

    def __enter__(self):
        import torch

        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        import torch

        torch.set_num_threads(self.threads)


def _ray_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("ray") is not None


def _token_range(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in str(text).split("-", 1)) if "-" in str(text) else (int(text), int(text))
    except ValueError:
        raise SystemExit(f"--answer-tokens must look like LO-HI (e.g. 16-256), got {text!r}") from None
    if not 1 <= lo <= hi:
        raise SystemExit(f"--answer-tokens needs 1 <= LO <= HI, got {text!r}")
    return lo, hi


def bench_cpu_config() -> dict:
    """Qwen2.5-VL-7B's proportions scaled for a 2-core CPU: the vision tower about a tenth of the language
    model's layers, and the full 151,936-token vocabulary (so the card's full-vocabulary logits cost
    what they cost on the real model, relative to the rest)."""
    from .testing import tiny_config

    return tiny_config(
        hidden_size=384, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=6,
        num_key_value_heads=2, max_window_layers=4, vocab_size=151936,
        rope_scaling={"mrope_section": [8, 12, 12], "rope_type": "default", "type": "default"},
        vision_config=dict(depth=3, hidden_size=128, intermediate_size=512, num_heads=2, out_hidden_size=384,
                           fullatt_block_indexes=[2]),
    )  # fmt: skip


# ---- output --------------------------------------------------------------------------------------

LABELS = {"card": "model card, 1 by 1", "naive": "naive batches", "engine": "RewardEngine", "pool": "RewardPool"}


def print_table(report: dict) -> None:
    w = report["workload"]
    print(f"\n{report['model']} on {report['device']} ({report['device_name']}), {report['dtype']}; "
          f"{w['groups']} groups x G={w['group_size']}, {w['image_size']}px images, answers "
          f"{w['answer_tokens'][0]}-{w['answer_tokens'][1]} tokens")  # fmt: skip
    print(f"peak {report['peak_flops'] / 1e12:.2f} TFLOP/s ({report['peak_source']})")
    head = f"{'':22}{'samples/s':>10}{'tokens/s':>11}{'encode ms':>10}{'TFLOP/s':>9}{'MFU':>7}{'max|diff|':>11}"
    print(head)
    for name, m in report["methods"].items():
        if "error" in m:
            print(f"{LABELS.get(name, name):22}  failed: {m['error']}")
            continue
        enc = m.get("encode_ms_per_sample")
        print(f"{LABELS.get(name, name):22}{m['samples_per_s']:>10.2f}{m['tokens_per_s']:>11.0f}"
              f"{(f'{enc:.2f}' if enc is not None else '-'):>10}"
              f"{(m['model_flops_per_s'] or 0) / 1e12:>9.3f}{(m['mfu'] or 0):>7.1%}{m['max_abs_diff']:>11.1e}")  # fmt: skip
    print("  ".join(f"{k.replace('_vs_', '/')} = {v:.2f}x" for k, v in report["ratios"].items()))


def plot(report: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = {k: v for k, v in report["methods"].items() if "error" not in v}
    names = [LABELS.get(k, k) for k in methods]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    bars = left.bar(names, [m["samples_per_s"] for m in methods.values()], color="#4c72b0")
    left.bar_label(bars, fmt="%.1f")
    left.set_ylabel("samples/s")
    left.set_title("throughput")
    right.bar(names, [100 * (m["mfu"] or 0) for m in methods.values()], color="#55a868")
    right.set_ylabel("MFU (%)")
    right.set_title(f"MFU vs {report['peak_source']}")
    w = report["workload"]
    fig.suptitle(f"{report['model']} on {report['device_name']} ({report['dtype']}): {w['groups']} x G={w['group_size']}, "
                 f"{w['image_size']}px")  # fmt: skip
    for ax in (left, right):
        ax.tick_params(axis="x", rotation=15)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
