"""The evaluation's outputs: ``scores.json`` (summary and every pair's scores), ``report.md`` (overall
accuracy, macro average, per-category table, ties and unscored pairs) and PNG charts: accuracy per
category, the chosen-minus-rejected score margin histogram, and score against answer length.

Charts are drawn on matplotlib ``Figure`` objects with the Agg canvas (no display, no pyplot state).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

CHARTS = {
    "accuracy": "accuracy_by_category.png",
    "margins": "score_margins.png",
    "lengths": "score_vs_length.png",
}


def write_report(summary, results: list, out: Path) -> dict[str, Path]:
    """Write scores.json, report.md and the charts into ``out``; return their paths by name."""
    out = Path(out)
    paths = {"json": out / "scores.json", "report": out / "report.md"}
    paths["json"].write_text(json.dumps(
        {"summary": summary.to_dict(), "pairs": [{**asdict(r), "correct": r.correct, "tie": r.tie} for r in results]},
        indent=1,
    ) + "\n")  # fmt: skip
    paths.update(write_charts(summary, results, out))
    paths["report"].write_text(markdown(summary, {k: p.name for k, p in paths.items() if k in CHARTS}))
    return paths


def _pct(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:.1f}"


def markdown(summary, charts: dict[str, str]) -> str:
    lines = [
        "# Preference evaluation",
        "",
        f"- model: `{summary.model}`",
        f"- data: `{summary.data}`",
        f"- pairs: {summary.pairs}",
        f"- **overall accuracy: {_pct(summary.accuracy)}%** ({summary.correct}/{summary.pairs})",
        f"- **macro average: {_pct(summary.macro_average)}%** (mean of {len(summary.categories)} category accuracies)",
        f"- ties (chosen and rejected scored equal, counted wrong): {summary.ties}",
        f"- unscored (an answer could not be scored, counted wrong; reasons in scores.json): {summary.unscored}",
        "",
        "A pair is right when the chosen answer scores strictly higher than the rejected one (VL-RewardBench's protocol).",
        "",
        "| category | pairs | correct | ties | unscored | accuracy (%) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, c in summary.categories.items():
        lines.append(f"| {name} | {c.pairs} | {c.correct} | {c.ties} | {c.unscored} | {_pct(c.accuracy)} |")
    lines.append("")
    titles = {"accuracy": "Accuracy per category", "margins": "Score margin (chosen - rejected)",
              "lengths": "Score against answer length"}  # fmt: skip
    for key, name in charts.items():
        lines += [f"## {titles[key]}", "", f"![{titles[key]}]({name})", ""]
    return "\n".join(lines)


def write_charts(summary, results: list, out: Path) -> dict[str, Path]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def save(fig: Figure, key: str) -> Path:
        FigureCanvasAgg(fig)
        fig.tight_layout()
        path = out / CHARTS[key]
        fig.savefig(path, dpi=100)
        return path

    paths = {}
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    names = list(summary.categories)
    values = [100 * summary.categories[n].accuracy for n in names]
    ax.bar(names, values, color="tab:blue")
    ax.axhline(100 * summary.accuracy, color="tab:red", linestyle="--", label=f"overall {_pct(summary.accuracy)}%")
    ax.axhline(50, color="gray", linestyle=":", label="chance")
    ax.set_ylim(0, 100)
    ax.set_ylabel("accuracy (%)")
    ax.legend(loc="lower right")
    paths["accuracy"] = save(fig, "accuracy")

    scored = [r for r in results if r.error is None]
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.hist([r.margin for r in scored], bins=min(50, max(5, len(scored) // 5)), color="tab:green")
    ax.axvline(0, color="black", linewidth=1)
    ax.set_xlabel("chosen score - rejected score (right of 0: correct)")
    ax.set_ylabel("pairs")
    paths["margins"] = save(fig, "margins")

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.scatter([r.chosen_chars for r in scored], [r.chosen_score for r in scored], s=8, alpha=0.6, label="chosen")
    ax.scatter([r.rejected_chars for r in scored], [r.rejected_score for r in scored], s=8, alpha=0.6, label="rejected")
    ax.set_xlabel("answer length (characters)")
    ax.set_ylabel("score")
    ax.legend()
    paths["lengths"] = save(fig, "lengths")
    return paths
