"""Engine metrics: counters (exported as ``rewardplug_<name>_total``) and histograms, through a sink.

Sinks, chosen with ``RewardEngine(metrics=...)``:

- ``"prometheus"`` (default): ``prometheus_client`` counters and histograms in its default registry,
  one series per engine (label ``engine``). Expose them with ``prometheus_client.start_http_server``
  or your web framework's ``/metrics`` route.
- ``"ray"``: ``ray.util.metrics`` (for Ray Serve replicas): every replica reports to Ray's metrics
  agent, so the cluster's one scrape target shows all of them (tag ``engine``; Ray prefixes ``ray_``).
- ``None``: no export (``engine.stats()`` still counts).
- any object with ``count(name, value)`` and ``observe(name, value)``.

Counters: requests, samples, invalid_samples, failed_samples, scoring_errors, batches, forward_passes,
tokens (real), padded_tokens, vision_hits, vision_misses, prefix_groups, prefix_hits, duplicate_hits,
oom_splits. Histograms: request_latency_seconds, batch_padded_tokens.
"""

from __future__ import annotations

import threading
from typing import Any, Protocol

# Stats keys whose exported name differs.
EXPORT_NAMES = {"real_tokens": "tokens"}
DESCRIPTIONS = {
    "requests": "requests submitted",
    "samples": "samples submitted",
    "invalid_samples": "samples that could not be scored (bad input, or too large alone)",
    "failed_samples": "samples of a batch whose scoring gave a per-sample failure",
    "scoring_errors": "requests failed by a system failure (device error, bug, closed engine)",
    "batches": "batches scored",
    "forward_passes": "forward passes run",
    "tokens": "real (unpadded) tokens run",
    "padded_tokens": "padded tokens run (rows x longest row)",
    "vision_hits": "images whose vision features were reused",
    "vision_misses": "images that ran through the vision tower",
    "prefix_groups": "shared prompt prefixes encoded once",
    "prefix_hits": "completions scored on top of a shared prefix",
    "duplicate_hits": "samples identical to another in flight, scored once",
    "oom_splits": "batches split after running out of memory",
}
HISTOGRAMS = {
    "request_latency_seconds": (
        "seconds from submit to result",
        [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300],
    ),
    "batch_padded_tokens": (
        "padded tokens per scored batch",
        [64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536],
    ),
}
PREFIX = "rewardplug_"


class MetricsSink(Protocol):
    def count(self, name: str, value: float) -> None: ...

    def observe(self, name: str, value: float) -> None: ...


class NullMetrics:
    """Exports nothing."""

    def count(self, name: str, value: float) -> None:
        pass

    def observe(self, name: str, value: float) -> None:
        pass


NULL_METRICS = NullMetrics()

# Metric objects are process-wide (a registry refuses a name twice); engines share them by label.
_lock = threading.Lock()
_prometheus: dict[str, Any] = {}
_ray: dict[str, Any] = {}


class PrometheusMetrics:
    """prometheus_client counters and histograms in the default registry, labelled ``engine=<name>``."""

    def __init__(self, engine: str):
        import prometheus_client as prom

        self.engine = engine
        with _lock:
            if not _prometheus:
                for key, text in DESCRIPTIONS.items():
                    _prometheus[key] = prom.Counter(PREFIX + key, text, ["engine"])
                for key, (text, buckets) in HISTOGRAMS.items():
                    _prometheus[key] = prom.Histogram(PREFIX + key, text, ["engine"], buckets=buckets)
        self._counters = {k: m.labels(engine=engine) for k, m in _prometheus.items() if k in DESCRIPTIONS}
        self._histograms = {k: m.labels(engine=engine) for k, m in _prometheus.items() if k in HISTOGRAMS}

    def count(self, name: str, value: float) -> None:
        metric = self._counters.get(EXPORT_NAMES.get(name, name))
        if metric is not None and value > 0:
            metric.inc(value)

    def observe(self, name: str, value: float) -> None:
        metric = self._histograms.get(name)
        if metric is not None:
            metric.observe(value)


class RayMetrics:
    """``ray.util.metrics`` counters and histograms, tagged ``engine=<name>``; needs a Ray worker or
    driver (a Serve replica is one)."""

    def __init__(self, engine: str):
        from ray.util import metrics as ray_metrics

        self.tags = {"engine": engine}
        with _lock:
            if not _ray:
                for key, text in DESCRIPTIONS.items():
                    _ray[key] = ray_metrics.Counter(PREFIX + key, text, tag_keys=("engine",))
                for key, (text, buckets) in HISTOGRAMS.items():
                    _ray[key] = ray_metrics.Histogram(PREFIX + key, text, boundaries=buckets, tag_keys=("engine",))

    def count(self, name: str, value: float) -> None:
        metric = _ray.get(EXPORT_NAMES.get(name, name))
        if metric is not None and name not in HISTOGRAMS and value > 0:
            metric.inc(value, tags=self.tags)

    def observe(self, name: str, value: float) -> None:
        if name in HISTOGRAMS:
            _ray[name].observe(value, tags=self.tags)


def make_sink(metrics: Any, engine: str) -> MetricsSink:
    """``RewardEngine(metrics=...)``: "prometheus", "ray", None, or a sink object."""
    if metrics is None:
        return NULL_METRICS
    if metrics == "prometheus":
        return PrometheusMetrics(engine)
    if metrics == "ray":
        return RayMetrics(engine)
    if isinstance(metrics, str) or not (hasattr(metrics, "count") and hasattr(metrics, "observe")):
        raise ValueError(
            f"metrics must be 'prometheus', 'ray', None or an object with count() and observe(), got {metrics!r}"
        )
    return metrics
