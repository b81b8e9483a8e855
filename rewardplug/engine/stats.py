"""Counters and latency percentiles of an engine, safe to read from any thread."""

from __future__ import annotations

import threading
from collections import deque

import torch


class Stats:
    def __init__(self, latency_window: int = 10_000):
        self._lock = threading.Lock()
        self._latencies: deque[float] = deque(maxlen=latency_window)
        self.counts = dict.fromkeys(
            ["requests", "samples", "invalid_samples", "failed_samples", "batches", "forward_passes",
             "real_tokens", "padded_tokens", "vision_hits", "vision_misses", "prefix_groups", "prefix_hits",
             "duplicate_hits", "oom_splits"],
            0,
        )  # fmt: skip

    def add(self, **deltas: int) -> None:
        with self._lock:
            for name, value in deltas.items():
                self.counts[name] += value

    def latency(self, seconds: float) -> None:
        with self._lock:
            self._latencies.append(seconds)

    def snapshot(self) -> dict:
        with self._lock:
            out = dict(self.counts)
            lat = torch.tensor(list(self._latencies), dtype=torch.float64)
        out["padding_efficiency"] = out["real_tokens"] / out["padded_tokens"] if out["padded_tokens"] else 1.0
        for q in (50, 95, 99):
            out[f"latency_p{q}_ms"] = float(torch.quantile(lat, q / 100)) * 1e3 if len(lat) else 0.0
        return out
