"""Plain-text tables for people: the ``rewardplug score`` summary and ``stats()`` as a table.

No third-party imports (the CLI's ``--help`` must stay fast).

>>> print(format_table([("samples", 3), ("mean", 0.5)], headers=("what", "value")))
what     value
-------  -----
samples      3
mean       0.5
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any, Iterable, Mapping, Sequence


def format_table(rows: Iterable[Sequence[Any]], headers: Sequence[str] | None = None) -> str:
    """Align ``rows`` in columns: text to the left, numbers to the right; floats with 4 significant digits."""
    cells = [[_cell(v) for v in row] for row in rows]
    if headers is not None:
        cells.insert(0, [str(h) for h in headers])
    if not cells:
        return ""
    width = max(len(r) for r in cells)
    cells = [r + [""] * (width - len(r)) for r in cells]
    sizes = [max(len(r[i]) for r in cells) for i in range(width)]
    numeric = [all(_is_number(r[i]) for r in cells[1 if headers is not None else 0 :] if r[i]) for i in range(width)]
    lines = []
    for n, row in enumerate(cells):
        parts = [c.rjust(s) if numeric[i] and n >= (headers is not None) else c.ljust(s)
                 for i, (c, s) in enumerate(zip(row, sizes))]  # fmt: skip
        lines.append("  ".join(parts).rstrip())
        if n == 0 and headers is not None:
            lines.append("  ".join("-" * s for s in sizes))
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.4g}" if abs(value) < 1e6 else f"{value:.3e}"
    return "" if value is None else str(value)


def _is_number(text: str) -> bool:
    try:
        float(text.rstrip("%"))
        return True
    except ValueError:
        return False


def error_reason(message: str) -> str:
    """The kind of an error, without the sample-specific parts (paths, URLs, counts), to group errors.

    >>> error_reason("image 1: image path '/data/x.png' is outside the allowed image roots; allow ...")
    'image path is outside the allowed image roots'
    >>> error_reason("sample has 9000 tokens, over max_length=8192")
    'sample has N tokens, over max_length=N'
    """
    text = re.sub(r"^(image \d+: )+", "", message.strip())
    text = re.split(r";| \(", text, maxsplit=1)[0]
    text = re.sub(r" ?'[^']*[/\\.:][^']*'", "", text)  # quoted paths, URLs, file names
    return re.sub(r"\d+", "N", text).strip()


def score_summary(scores: Sequence[float | None], errors: Mapping[int, str], stats: Mapping[str, Any] | None = None) -> str:
    """The end-of-run table of ``rewardplug score``: counts, mean/min/max of the scores, what the engine
    shared (from its ``stats()``, if given), errors by reason."""
    values = [s for s in scores if s is not None]
    rows: list[tuple] = [("samples", len(scores)), ("scored", len(values)), ("not scored", len(scores) - len(values))]
    if values:
        rows += [("mean score", sum(values) / len(values)), ("min score", min(values)), ("max score", max(values))]
    if stats:
        rows += [("vision tower runs", stats.get("vision_misses", 0)),
                 ("images from the vision cache", stats.get("vision_hits", 0)),
                 ("completions on a shared prompt", stats.get("prefix_hits", 0)),
                 ("duplicates scored once", stats.get("duplicate_hits", 0))]  # fmt: skip
    out = format_table(rows)
    if errors:
        by_reason = Counter(error_reason(e) for e in errors.values())
        out += "\n\n" + format_table(by_reason.most_common(), headers=("error", "samples"))
    return out


# Engine/pool stats keys, grouped for display: (section, key, label, unit).
_STATS_LAYOUT = [
    ("traffic", "requests", "requests", ""),
    ("traffic", "samples", "samples", ""),
    ("traffic", "invalid_samples", "invalid samples", ""),
    ("traffic", "failed_samples", "failed samples", ""),
    ("traffic", "queue_depth", "queued now", ""),
    ("traffic", "queued_samples", "queued samples", ""),
    ("traffic", "max_queued_samples", "queued samples allowed", ""),
    ("traffic", "scoring_errors", "scoring errors (system)", ""),
    ("traffic", "retries", "retries", ""),
    ("batches", "batches", "batches", ""),
    ("batches", "forward_passes", "forward passes", ""),
    ("batches", "real_tokens", "real tokens", ""),
    ("batches", "padded_tokens", "padded tokens", ""),
    ("batches", "padding_efficiency", "padding efficiency", "%"),
    ("batches", "oom_splits", "out-of-memory splits", ""),
    ("sharing", "vision_hits", "vision cache hits", ""),
    ("sharing", "vision_misses", "vision tower runs", ""),
    ("sharing", "vision_cache_bytes", "vision cache", "MiB"),
    ("sharing", "vision_cache_entries", "vision cache entries", ""),
    ("sharing", "prefix_groups", "prompt groups", ""),
    ("sharing", "prefix_hits", "completions on a shared prompt", ""),
    ("sharing", "duplicate_hits", "duplicates scored once", ""),
    ("latency", "latency_p50_ms", "p50", "ms"),
    ("latency", "latency_p95_ms", "p95", "ms"),
    ("latency", "latency_p99_ms", "p99", "ms"),
]


def stats_table(stats: Mapping[str, Any]) -> str:
    """``RewardEngine.stats()`` / ``RewardPool.stats()`` as a readable table (used by ``rewardplug pool status``).

    Known counters are grouped (traffic, batches, sharing, latency) with units; keys this module does
    not know (for example a pool's per-replica entries) follow under "other", so nothing is hidden.
    """
    rows, seen = [], set()
    for section, key, label, unit in _STATS_LAYOUT:
        if key not in stats:
            continue
        seen.add(key)
        value = stats[key]
        if unit == "%" and isinstance(value, (int, float)):
            value = f"{100 * value:.1f}%"
        elif unit == "MiB" and isinstance(value, (int, float)):
            value = f"{value / 2**20:.1f}"
        elif unit == "ms" and isinstance(value, (int, float)):
            value = round(float(value), 1)
        rows.append((section, label + (f" ({unit})" if unit in ("MiB", "ms") else ""), value))
    for key in sorted(k for k in stats if k not in seen):
        value = stats[key]
        rows.append(("other", key, value if not isinstance(value, (dict, list)) else _compact(value)))
    return format_table(rows, headers=("", "", "value"))


def _compact(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
