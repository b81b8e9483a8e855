"""Offline uses of the reward model: preference evaluation, preference-pair building, and scoring
whole datasets (in one process or over Ray Data).

>>> from rewardplug.offline import evaluate, make_pairs, score_dataset  # doctest: +SKIP
>>> summary = evaluate("vl_rewardbench/", "eval-out/", model="Skywork/Skywork-VL-Reward-7B")  # doctest: +SKIP
>>> summary.accuracy, summary.macro_average  # doctest: +SKIP

The names above load their module on first use; Ray, datasets, pyarrow and matplotlib load only when
a function needs them (``pip install 'rewardplug[offline]'``).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "PreferenceColumns": "data",
    "read_rows": "data",
    "vlrewardbench_category": "data",
    "evaluate": "evaluation",
    "EvalSummary": "evaluation",
    "PairResult": "evaluation",
    "summarize": "evaluation",
    "OtherRunError": "evaluation",
    "PairRule": "pairs",
    "select_pairs": "pairs",
    "make_pairs": "pairs",
    "MissingScoresError": "pairs",
    "score_dataset": "dataset",
    "read_scores": "dataset",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
