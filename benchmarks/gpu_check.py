"""The first hour on a GPU, in one command: is it exact, how much memory, how fast, does the device wait?

    python benchmarks/gpu_check.py                  # one GPU: under 8 minutes on an H100 / H200
    python benchmarks/gpu_check.py --smoke          # the same code path on the CPU with tiny sizes (the tests run it)

Needs only the core dependencies (torch, transformers, accelerate, safetensors, pillow, blake3, cachetools,
qwen-vl-utils) and no network: the models are ``tiny`` (the embedded checkpoint) and ``random-7b`` (the
Qwen2.5-VL-7B architecture with random weights built on the device, ``rewardplug.named_models``). Their
scores mean nothing; their speed and memory are the real model's. Writes ``gpu_check.json`` and
``gpu_check.md`` (tables ready for BENCHMARKS.md and docs/sizing.md) into ``--out``.

Sections (each records an ``error`` instead of stopping the others; the exit code is 1 if any failed):
- exactness: ``tiny`` and ``random-7b`` with a few layers, fp32 and bf16, scored through RewardEngine on
  the device, against ``RewardModel.score`` (batch of one) on the CPU in fp32 and on the device alone;
- memory: peak while loading the throughput model, steady state, peak while scoring at three
  ``max_batch_tokens``, and what offloading the weights to host memory frees (the pool's ``offload()``
  path, which needs Ray Serve's module; skipped with a note without it);
- throughput at two image sizes and two group sizes: the model card's way, naive batches and the engine
  (``rewardplug bench``'s methods), samples/s and MFU against the device's dense bf16 peak;
- device wait: an engine run (on a GPU under the torch profiler): the device's busy fraction, its idle gaps between
  batches (the gap before each batch's first kernel), device ms per sample beside host encode ms per
  sample (one thread, fresh images);
- attention: SDPA against FlashAttention-2 when ``flash_attn`` is importable.

Every timed run scores pictures no earlier run has seen (a fresh seed per use), so no pixel or vision
cache carries over from a warm-up. On the CPU (``--smoke``) the "device" is the host: busy time is the
time inside the engine's batch launches, memory is the process's resident set.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import statistics
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rewardplug import named_models
from rewardplug.bench import (
    _free, _sync, card_way, device_peak_flops, encode_ms_per_sample, measure, useful_flops, workload_stats,
)  # fmt: skip
from rewardplug.workload import make_workload

log = logging.getLogger("gpu_check")
SCHEMA = 1
FP32_TOLERANCE = 1e-5  # engine vs the model alone, same device, fp32 (the project's exactness bar)
FP32_CROSS_DEVICE_TOLERANCE = 1e-4  # a GPU's fp32 kernels against the CPU's: other summation orders


@dataclass
class Plan:
    """What one run measures: the GPU plan or the CPU smoke plan (same code, other sizes)."""

    device: str
    exact_models: list[tuple[str, int | None]]  # (model, layers)
    exact_groups: int
    exact_group_size: int
    exact_side: int
    model: str
    layers: int | None
    dtype: str
    sides: tuple[int, ...]
    group_sizes: tuple[int, ...]
    samples_per_config: int
    card_samples: int
    answer_tokens: tuple[int, int]
    batch_tokens: tuple[int, ...]  # the memory section's three max_batch_tokens
    wait_batch_tokens: int  # max_batch_tokens of the device-wait run (several batches, so there are gaps)
    gap_threshold_us: float
    budget_s: float | None = None  # sections not started by then are skipped (the command's 8 minutes)
    notes: list[str] = field(default_factory=list)


def gpu_plan(device: str, exact_layers: int) -> Plan:
    return Plan(device=device, exact_models=[(named_models.TINY, None), (named_models.RANDOM_7B, exact_layers)],
                exact_groups=2, exact_group_size=4, exact_side=224, model=named_models.RANDOM_7B, layers=None,
                dtype="bfloat16", sides=(448, 1024), group_sizes=(8, 16), samples_per_config=64, card_samples=8,
                answer_tokens=(16, 256), batch_tokens=(4096, 16384, 65536), wait_batch_tokens=16384,
                gap_threshold_us=10.0, budget_s=420.0)  # fmt: skip


def smoke_plan() -> Plan:
    return Plan(device="cpu", exact_models=[(named_models.TINY, None)], exact_groups=2, exact_group_size=3,
                exact_side=56, model=named_models.TINY, layers=None, dtype="float32", sides=(56, 84),
                group_sizes=(2, 3), samples_per_config=4, card_samples=1, answer_tokens=(4, 12),
                batch_tokens=(256, 1024, 4096), wait_batch_tokens=256, gap_threshold_us=0.0)  # fmt: skip


# ---- sections ------------------------------------------------------------------------------------


def exactness(plan: Plan) -> list[dict]:
    """Each model in fp32 and bf16 on the device through the engine, against the CPU fp32 model alone."""
    from rewardplug import RewardEngine

    device = torch.device(plan.device)
    rows = []
    for k, (name, layers) in enumerate(plan.exact_models):
        options = {"layers": layers} if layers is not None else {}
        cpu = named_models.load(name, dtype="float32", device="cpu", image_roots=None, **options)
        samples = make_workload(cpu.processor.tokenizer, plan.exact_groups, plan.exact_group_size, plan.exact_side,
                                *plan.answer_tokens, seed=900 + k)  # fmt: skip
        reference = cpu.score(samples, batch_size=1)
        del cpu
        _free(torch.device("cpu"))
        for dtype in ("float32", "bfloat16"):
            rm = named_models.load(name, dtype=dtype, device=device, image_roots=None, **options)
            with RewardEngine(rm, metrics=None) as engine:
                got = engine.score(samples)
            alone = rm.score(samples, batch_size=1)
            del rm
            _free(device)
            row = {
                "model": name, "layers": layers, "dtype": dtype, "device": str(device), "samples": len(samples),
                "finite": all(_finite(v) for v in got + alone),
                "engine_vs_cpu_fp32": _max_diff(got, reference),
                "alone_vs_cpu_fp32": _max_diff(alone, reference),
                "engine_vs_alone": _max_diff(got, alone),
                "score_range": max(reference) - min(reference),
            }  # fmt: skip
            if dtype == "float32":
                cross = FP32_TOLERANCE if device.type == "cpu" else FP32_CROSS_DEVICE_TOLERANCE
                row["ok"] = row["finite"] and row["engine_vs_alone"] <= FP32_TOLERANCE and row["engine_vs_cpu_fp32"] <= cross
            else:  # bf16 differs from fp32 by its rounding; the same samples must still rank alike
                row["ok"] = row["finite"] and row["engine_vs_cpu_fp32"] <= max(0.05, 0.25 * row["score_range"])
            rows.append(row)
            log.info("exactness %s", row)
    return rows


class Loaded:
    """The throughput model, loaded once with its load-time memory measured."""

    def __init__(self, plan: Plan):
        self.device = torch.device(plan.device)
        options = {"layers": plan.layers} if plan.layers is not None else {}
        with Memory(self.device) as mem:
            start = time.perf_counter()
            self.rm = named_models.load(plan.model, dtype=plan.dtype, device=self.device, image_roots=None, **options)
            _sync(self.device)
            self.load_s = time.perf_counter() - start
        self.load_peak, self.steady = mem.peak, mem.now()


def memory(plan: Plan, loaded: Loaded) -> dict:
    """Peaks at load and while scoring at each ``max_batch_tokens``; what offloading frees."""
    from rewardplug import RewardEngine

    rm, device = loaded.rm, loaded.device
    out = {
        "kind": "cuda_allocated" if device.type == "cuda" else "process_rss", "unit": "bytes",
        "parameters_bytes": rm.memory_bytes(), "load_peak": loaded.load_peak, "steady": loaded.steady,
        "load_s": loaded.load_s, "scoring": [],
    }  # fmt: skip
    side, G = max(plan.sides), max(plan.group_sizes)
    for k, budget in enumerate(plan.batch_tokens):
        samples = _work(rm, plan, side, G, seed=300 + k)
        with RewardEngine(rm, max_batch_tokens=budget, metrics=None) as engine, Memory(device) as mem:
            engine.score(samples)
            _sync(device)
        out["scoring"].append({"max_batch_tokens": budget, "samples": len(samples), "image_size": side,
                               "group_size": G, "peak": mem.peak, "over_steady": mem.peak - loaded.steady})  # fmt: skip
    out["offload"] = offload(rm, device)
    return out


def offload(rm, device) -> dict:
    """What the pool's ``offload()`` frees on the device: its replica moves every tensor to host memory
    (``rewardplug.offload``, no Ray needed)."""
    if device.type != "cuda":
        return {"freed": 0, "note": "the model is on the CPU already: offloading frees nothing"}
    from rewardplug.offload import move_home, move_to_host

    _sync(device)
    before = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    homes = move_to_host(rm)
    _sync(device)
    offload_s, after = time.perf_counter() - start, torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    move_home(homes)
    _sync(device)
    return {"before": before, "after": after, "freed": before - after, "offload_s": offload_s,
            "onload_s": time.perf_counter() - start}  # fmt: skip


def throughput(plan: Plan, loaded: Loaded, peak: float) -> list[dict]:
    """``rewardplug bench``'s three methods per image size and group size, on fresh pictures each."""
    from rewardplug import RewardEngine

    rm, device = loaded.rm, loaded.device
    card_one, naive_batch, _ = card_way(rm)
    rows = []
    for side in plan.sides:
        for G in plan.group_sizes:
            seed = 1000 * side + 10 * G
            card_one(_work(rm, plan, side, G, seed + 1)[0])  # warm-ups on other pictures: kernels, allocator
            naive_batch(_work(rm, plan, side, G, seed + 2)[:G])
            with RewardEngine(rm, metrics=None) as engine:
                engine.score(_work(rm, plan, side, G, seed + 3)[: 2 * G])
            methods = {
                "card": measure(rm, _work(rm, plan, side, G, seed + 4)[: plan.card_samples],
                                lambda s: [card_one(x) for x in s], peak, device),
                "naive": measure(rm, _work(rm, plan, side, G, seed + 5),
                                 lambda s: [v for k in range(0, len(s), G) for v in naive_batch(s[k : k + G])], peak,
                                 device),
                "engine": measure(rm, _work(rm, plan, side, G, seed + 6), _engine_score(rm), peak, device),
            }  # fmt: skip
            rate = {k: m["samples_per_s"] for k, m in methods.items()}
            rows.append({"image_size": side, "group_size": G, "methods": methods,
                         "engine_vs_card": rate["engine"] / rate["card"], "engine_vs_naive": rate["engine"] / rate["naive"]})  # fmt: skip
            log.info("throughput %dpx G=%d: %s", side, G, {k: round(v, 2) for k, v in rate.items()})
    return rows


def device_wait(plan: Plan, loaded: Loaded) -> list[dict]:
    """An engine run under the profiler per image size: device busy fraction, idle gaps between batches,
    device ms per sample beside host encode ms per sample."""
    from rewardplug import RewardEngine

    rm, device = loaded.rm, loaded.device
    G = min(plan.group_sizes)
    rows = []
    for side in plan.sides:
        samples = _work(rm, plan, side, G, seed=2000 + side)
        with RewardEngine(rm, max_batch_tokens=plan.wait_batch_tokens, metrics=None) as engine:
            engine.score(_work(rm, plan, side, G, seed=2100 + side)[: 2 * G])  # warm-up, other pictures
            timeline = Timeline(device)
            timeline.attach(engine)
            with timeline.record():
                engine.score(samples)
            encode_workers = engine.encode_workers
        row = timeline.summary(len(samples), plan.gap_threshold_us)
        row.update(image_size=side, group_size=G, samples=len(samples), encode_workers=encode_workers,
                   host_encode_ms_per_sample=encode_ms_per_sample(rm, _work(rm, plan, side, G, seed=2200 + side)))  # fmt: skip
        rows.append(row)
        log.info("device wait %dpx: %s", side, row)
    return rows


def attention(plan: Plan, loaded: Loaded, peak: float) -> dict:
    """SDPA against FlashAttention-2: the engine on the same samples with each, scores compared."""
    if importlib.util.find_spec("flash_attn") is None:
        return {"skipped": "flash_attn is not importable (pip install flash-attn)"}
    if loaded.device.type != "cuda":
        return {"skipped": "FlashAttention-2 needs a CUDA device"}
    side, G = min(plan.sides), min(plan.group_sizes)
    samples = _work(loaded.rm, plan, side, G, seed=4000)
    sdpa = measure(loaded.rm, samples, _engine_score(loaded.rm), peak, loaded.device)
    sdpa_scores = _engine_score(loaded.rm)(samples)
    loaded.rm = None
    _free(loaded.device)
    options = {"layers": plan.layers} if plan.layers is not None else {}
    rm = named_models.load(plan.model, dtype=plan.dtype, device=loaded.device, image_roots=None,
                           attn_implementation="flash_attention_2", **options)  # fmt: skip
    _engine_score(rm)(_work(rm, plan, side, G, seed=4001)[: 2 * G])
    flash = measure(rm, samples, _engine_score(rm), peak, loaded.device)
    flash_scores = _engine_score(rm)(samples)
    del rm
    _free(loaded.device)
    return {"image_size": side, "group_size": G, "sdpa": sdpa, "flash_attention_2": flash,
            "flash_vs_sdpa": flash["samples_per_s"] / sdpa["samples_per_s"],
            "max_abs_diff_flash_vs_sdpa": _max_diff(flash_scores, sdpa_scores)}  # fmt: skip


# ---- device timeline -----------------------------------------------------------------------------


class Timeline:
    """Device activity during an engine run and where each batch starts on it.

    Batches are marked by wrapping the engine's ``runner.launch`` (the engine itself is untouched) with
    host clock readings. On a GPU the activity is the profiler's kernels and copies, put on the host clock
    by a marker the main thread records as the profiler starts; on the CPU, where a launch computes its
    batch before returning, the launch ranges themselves. The idle gap before a batch is the time between
    the end of all device work before the batch's first activity and that activity's start."""

    MARKER = "gpu_check.clock"

    def __init__(self, device: torch.device):
        self.device = device
        self.prof = None
        self.launches: list[tuple[float, float]] = []  # host perf_counter seconds
        self.marker_s = 0.0

    def attach(self, engine) -> None:
        runner = engine.runner
        launch = runner.launch

        def marked(*args, **kwargs):
            begin = time.perf_counter()
            try:
                return launch(*args, **kwargs)
            finally:
                self.launches.append((begin, time.perf_counter()))

        runner.launch = marked

    @contextmanager
    def record(self):
        _sync(self.device)
        if self.device.type != "cuda":
            yield
            return
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as self.prof:
            with torch.profiler.record_function(self.MARKER):
                self.marker_s = time.perf_counter()
            yield
            _sync(self.device)

    def summary(self, samples: int, gap_threshold_us: float) -> dict:
        launches = sorted((a * 1e6, b * 1e6) for a, b in self.launches)  # host clock, microseconds
        activity, source = list(launches), "engine launch ranges (the CPU computes a batch inside its launch)"
        if self.device.type == "cuda":
            events = self.prof.events()
            marker = [e for e in events if e.name == self.MARKER]
            kernels = sorted((e.time_range.start, e.time_range.end) for e in events
                             if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start)  # fmt: skip
            if kernels and marker:
                shift = self.marker_s * 1e6 - marker[0].time_range.start  # profiler clock -> host clock
                activity, source = [(a + shift, b + shift) for a, b in kernels], "profiler kernels and copies"
            else:  # no CUPTI trace (a container without it): say so rather than report nothing
                source = "NO KERNEL TRACE (CUPTI unavailable?): engine launch ranges on the host clock"
        busy = _union(activity)
        span = (busy[-1][1] - busy[0][0]) if busy else 0.0
        busy_us = sum(b - a for a, b in busy)
        gaps = [busy[k + 1][0] - busy[k][1] for k in range(len(busy) - 1)]
        between = _gaps_before(busy, [start for start, _ in launches[1:]])
        return {
            "source": source, "batches": len(launches), "wall_ms": span / 1e3, "busy_ms": busy_us / 1e3,
            "busy_fraction": busy_us / span if span else None,
            "device_ms_per_sample": busy_us / 1e3 / samples if samples else None,
            "gaps_between_batches": _gap_stats(between),
            "all_idle_gaps": _gap_stats([g for g in gaps if g >= gap_threshold_us]),
            "gap_threshold_us": gap_threshold_us,
        }  # fmt: skip


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for a, b in sorted(intervals):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(a, b) for a, b in merged]


def _gaps_before(busy: list[tuple[float, float]], starts: list[float]) -> list[float]:
    """For each batch start (host time of its launch), the idle time before the first activity at or
    after it: 0 when the device was still busy with earlier work (an activity began before the launch
    and had not ended). On the CPU a batch's activity begins exactly at its launch."""
    out = []
    for t in starts:
        k = next((i for i, (a, b) in enumerate(busy) if b > t), None)
        if k is None:
            continue
        a, _ = busy[k]
        out.append(0.0 if a < t or k == 0 else a - busy[k - 1][1])
    return out


def _gap_stats(gaps_us: list[float]) -> dict:
    if not gaps_us:
        return {"count": 0, "total_ms": 0.0, "max_ms": 0.0, "median_ms": 0.0}
    return {"count": len(gaps_us), "total_ms": sum(gaps_us) / 1e3, "max_ms": max(gaps_us) / 1e3,
            "median_ms": statistics.median(gaps_us) / 1e3}  # fmt: skip


# ---- memory --------------------------------------------------------------------------------------


class Memory:
    """Peak memory during a block: CUDA's allocator peak on a GPU, the sampled process RSS on the CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0
        self._stop = None

    def now(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        import psutil

        return psutil.Process().memory_info().rss

    def __enter__(self):
        if self.device.type == "cuda":
            _sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        import threading

        self.peak = self.now()
        self._stop = threading.Event()

        def sample():
            while not self._stop.wait(0.005):
                self.peak = max(self.peak, self.now())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            _sync(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


# ---- run -----------------------------------------------------------------------------------------


def _work(rm, plan: Plan, side: int, G: int, seed: int) -> list[dict]:
    groups = max(1, plan.samples_per_config // G)
    return make_workload(rm.processor.tokenizer, groups, G, side, *plan.answer_tokens, seed=seed)


def _engine_score(rm):
    from rewardplug import RewardEngine

    def score(samples):
        with RewardEngine(rm, metrics=None) as engine:  # a fresh engine: fresh vision cache
            return engine.score(samples)

    return score


def _finite(value) -> bool:
    return value is not None and value == value and abs(value) != float("inf")


def _max_diff(a, b) -> float:
    return max(abs(x - y) for x, y in zip(a, b))


def run(plan: Plan, out: Path) -> dict:
    import platform

    import transformers

    start = time.perf_counter()
    device = torch.device(plan.device)
    if device.type == "cuda":
        # fp32 means fp32: cuDNN's TF32 convolutions (the vision patch embedding) would round inputs to 10 bits.
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    report: dict = {
        "schema": SCHEMA, "mode": "smoke" if device.type == "cpu" else "gpu", "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__, "transformers": transformers.__version__, "cuda": torch.version.cuda,
        "torch_threads": torch.get_num_threads(), "model": plan.model, "dtype": plan.dtype,
        "random_weights": "random weights: the scores mean nothing; speed and memory are the real model's",
        "ray": "importable" if importlib.util.find_spec("ray") else "not installed: the pool is skipped",
        "flash_attn": "importable" if importlib.util.find_spec("flash_attn") else "not installed",
        "errors": {},
    }  # fmt: skip

    def section(name, fn, *args):
        elapsed = time.perf_counter() - start
        log.info("section %s (%.0f s in)", name, elapsed)
        if plan.budget_s is not None and elapsed > plan.budget_s:
            report[name] = {"skipped": f"not started: {elapsed:.0f} s had passed (budget {plan.budget_s:.0f} s)"}
            return
        try:
            report[name] = fn(*args)
        except Exception as error:  # noqa: BLE001 - the other sections still stand; say why this one failed
            log.exception("section %s failed", name)
            report[name] = None
            report["errors"][name] = f"{type(error).__name__}: {error}\n{traceback.format_exc(limit=6)}"

    section("exactness", exactness, plan)
    loaded = None
    try:
        loaded = Loaded(plan)
    except Exception as error:  # noqa: BLE001
        report["errors"]["load"] = f"{type(error).__name__}: {error}\n{traceback.format_exc(limit=6)}"
    if loaded is not None:
        peak, peak_source = device_peak_flops(device, loaded.rm.dtype)
        report.update(peak_flops=peak, peak_source=peak_source, parameters=loaded.rm.num_parameters(),
                      layers=loaded.rm.config.text_config.num_hidden_layers)  # fmt: skip
        section("memory", memory, plan, loaded)
        section("device_wait", device_wait, plan, loaded)
        section("throughput", throughput, plan, loaded, peak)
        section("attention", attention, plan, loaded, peak)
    report["seconds"] = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "gpu_check.md").write_text(markdown(report))
    return report


# ---- markdown ------------------------------------------------------------------------------------


def markdown(r: dict) -> str:
    gib = 2**30
    lines = [f"### gpu_check on {r['device_name']} ({r['device']}), {r['model']} in {r['dtype']}",
             "", f"torch {r['torch']}, transformers {r['transformers']}, CUDA {r['cuda']}; {r['random_weights']}; "
             f"{r.get('seconds', 0):.0f} s; peak {r.get('peak_flops', 0) / 1e12:.3g} TFLOP/s ({r.get('peak_source', '-')})", ""]  # fmt: skip
    if r.get("exactness"):
        lines += ["| model | dtype | samples | engine vs CPU fp32 | alone vs CPU fp32 | engine vs alone | score range | ok |",
                  "|---|---|---:|---:|---:|---:|---:|---|"]  # fmt: skip
        for e in r["exactness"]:
            name = e["model"] + (f" ({e['layers']} layers)" if e["layers"] else "")
            lines.append(f"| {name} | {e['dtype']} | {e['samples']} | {e['engine_vs_cpu_fp32']:.1e} | "
                         f"{e['alone_vs_cpu_fp32']:.1e} | {e['engine_vs_alone']:.1e} | {e['score_range']:.2f} | {e['ok']} |")  # fmt: skip
        lines.append("")
    m = r.get("memory")
    if m and "skipped" not in m:
        unit = "CUDA allocated" if m["kind"] == "cuda_allocated" else "process RSS"
        lines += [f"Memory ({unit}): parameters {m['parameters_bytes'] / gib:.2f} GiB, peak at load "
                  f"{m['load_peak'] / gib:.2f} GiB, steady {m['steady'] / gib:.2f} GiB (load {m['load_s']:.1f} s); "
                  f"offload: {_offload_text(m['offload'])}", "",
                  "| max_batch_tokens | image px | G | samples | peak GiB | over steady GiB |", "|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for s in m["scoring"]:
            lines.append(f"| {s['max_batch_tokens']} | {s['image_size']} | {s['group_size']} | {s['samples']} | "
                         f"{s['peak'] / gib:.2f} | {s['over_steady'] / gib:.2f} |")  # fmt: skip
        lines.append("")
    if isinstance(r.get("throughput"), list):
        lines += ["| image px | G | card s/s | naive s/s | engine s/s | engine MFU | engine/card | engine/naive | max diff |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for t in r["throughput"]:
            c, n, e = (t["methods"][k] for k in ("card", "naive", "engine"))
            diff = max(x["max_abs_diff"] for x in (c, n, e))
            lines.append(f"| {t['image_size']} | {t['group_size']} | {c['samples_per_s']:.2f} | {n['samples_per_s']:.2f} | "
                         f"{e['samples_per_s']:.2f} | {(e['mfu'] or 0):.1%} | {t['engine_vs_card']:.1f}x | "
                         f"{t['engine_vs_naive']:.2f}x | {diff:.1e} |")  # fmt: skip
        lines.append("")
    if isinstance(r.get("device_wait"), list):
        lines += ["| image px | G | batches | busy | gaps between batches (n, total ms, max ms) | device ms/sample | "
                  "host encode ms/sample (1 thread) |", "|---:|---:|---:|---:|---|---:|---:|"]  # fmt: skip
        for w in r["device_wait"]:
            g = w["gaps_between_batches"]
            busy = f"{w['busy_fraction']:.0%}" if w["busy_fraction"] is not None else "-"
            lines.append(f"| {w['image_size']} | {w['group_size']} | {w['batches']} | {busy} | {g['count']}, "
                         f"{g['total_ms']:.2f}, {g['max_ms']:.2f} | {w['device_ms_per_sample']:.2f} | "
                         f"{w['host_encode_ms_per_sample']:.2f} |")  # fmt: skip
        lines.append("")
    a = r.get("attention")
    if a:
        if "skipped" in a:
            lines.append(f"Attention: FlashAttention-2 skipped ({a['skipped']}).")
        else:
            lines.append(f"Attention ({a['image_size']} px, G={a['group_size']}): SDPA {a['sdpa']['samples_per_s']:.2f} "
                         f"samples/s, FlashAttention-2 {a['flash_attention_2']['samples_per_s']:.2f} "
                         f"({a['flash_vs_sdpa']:.2f}x), max |score diff| {a['max_abs_diff_flash_vs_sdpa']:.1e}.")  # fmt: skip
        lines.append("")
    for name in ("memory", "device_wait", "throughput"):
        if isinstance(r.get(name), dict) and "skipped" in r[name]:
            lines.append(f"**{name} skipped**: {r[name]['skipped']}")
    for name, error in r.get("errors", {}).items():
        lines.append(f"**{name} failed**: {error.splitlines()[0]}")
    return "\n".join(lines) + "\n"


def _offload_text(o: dict) -> str:
    if o.get("freed") is None or "note" in o:
        return o.get("note", "-")
    return f"frees {o['freed'] / 2**30:.2f} GiB ({o['offload_s']:.1f} s; back in {o['onload_s']:.1f} s)"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny model and sizes (the test suite runs this)")
    p.add_argument("--device", default=None, help="default cuda (cpu with --smoke)")
    p.add_argument("--exact-layers", type=int, default=4, help="layers of random-7b in the exactness check")
    p.add_argument("--out", default="gpu-check", help="folder for gpu_check.json and gpu_check.md")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.smoke:
        plan = smoke_plan()
    else:
        device = args.device or "cuda"
        if device.startswith("cuda") and not torch.cuda.is_available():
            print("gpu_check: no CUDA device here; run with --smoke for the CPU check", file=sys.stderr)
            return 2
        plan = gpu_plan(device, args.exact_layers)
    print(named_models.banner(plan.model))
    report = run(plan, Path(args.out))
    print((Path(args.out) / "gpu_check.md").read_text())
    print(named_models.banner(plan.model))
    bad = [e for e in report.get("exactness") or [] if not e["ok"]]
    return 1 if report["errors"] or bad or report.get("exactness") is None else 0


if __name__ == "__main__":
    sys.exit(main())
