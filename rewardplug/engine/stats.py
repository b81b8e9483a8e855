"""Counters and latency percentiles of an engine, safe to read from any thread.

``snapshot()`` is cumulative since the engine started. ``delta(consumer)`` is what changed since that
consumer's previous call: what a trainer should log per step (TRL averages the values it is given over
a step, so cumulative counters are the wrong figure). Every window is bounded: the latency window in
items, the set of consumers in entries.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict, deque

import torch

from .metrics import NULL_METRICS, MetricsSink

logger = logging.getLogger(__name__)

COUNTERS = [
    "requests", "samples", "invalid_samples", "failed_samples", "scoring_errors", "batches", "forward_passes",
    "real_tokens", "padded_tokens", "vision_hits", "vision_misses", "prefix_groups", "prefix_hits",
    "duplicate_hits", "oom_splits",
]  # fmt: skip


class Stats:
    """Cumulative counters plus a bounded latency window, forwarded to a metrics sink as they change.

    latency_window: latencies kept for the percentiles (items; default 10,000).
    max_consumers: consumers of ``delta`` remembered (least recently used first out; default 64).
    """

    def __init__(self, latency_window: int = 10_000, sink: MetricsSink = NULL_METRICS, max_consumers: int = 64):
        self._lock = threading.Lock()
        self._latencies: deque[float] = deque(maxlen=latency_window)
        self._latency_count = 0  # latencies ever recorded: tells a consumer which ones are new
        self._sink = sink
        self._max_consumers = max_consumers
        self._marks: OrderedDict[str, tuple[dict, int]] = OrderedDict()
        self.counts = dict.fromkeys(COUNTERS, 0)

    def add(self, **deltas: int) -> None:
        with self._lock:
            for name, value in deltas.items():
                self.counts[name] += value
        for name, value in deltas.items():
            if value:
                self._emit(self._sink.count, name, value)

    def observe(self, name: str, value: float) -> None:
        """A histogram observation that is not kept here (batch sizes): only the sink sees it."""
        self._emit(self._sink.observe, name, value)

    def _emit(self, method, name: str, value: float) -> None:
        try:
            method(name, value)
        except Exception:  # noqa: BLE001 - a broken metrics backend must not fail scoring
            logger.warning("metrics sink failed on %s", name, exc_info=True)

    def latency(self, seconds: float) -> None:
        with self._lock:
            self._latencies.append(seconds)
            self._latency_count += 1
        self._emit(self._sink.observe, "request_latency_seconds", seconds)

    def snapshot(self) -> dict:
        """Counters since start, padding efficiency and latency percentiles (ms) over the window."""
        with self._lock:
            counts = dict(self.counts)
            latencies = list(self._latencies)
        return _summary(counts, latencies)

    def delta(self, consumer: str) -> dict:
        """Counters changed since ``consumer``'s previous call (since start on its first), with padding
        efficiency and latency percentiles of just those requests."""
        with self._lock:
            counts = dict(self.counts)
            before, seen = self._marks.pop(consumer, (dict.fromkeys(COUNTERS, 0), 0))
            self._marks[consumer] = (counts, self._latency_count)
            while len(self._marks) > self._max_consumers:
                self._marks.popitem(last=False)
            new = min(self._latency_count - seen, len(self._latencies))
            latencies = list(self._latencies)[len(self._latencies) - new :] if new else []
        return _summary({k: counts[k] - before.get(k, 0) for k in counts}, latencies)


def _summary(counts: dict, latencies: list[float]) -> dict:
    out = dict(counts)
    out["padding_efficiency"] = out["real_tokens"] / out["padded_tokens"] if out["padded_tokens"] else 1.0
    lat = torch.tensor(latencies, dtype=torch.float64)
    for q in (50, 95, 99):
        out[f"latency_p{q}_ms"] = float(torch.quantile(lat, q / 100)) * 1e3 if len(lat) else 0.0
    return out
