"""Reading offline data: a Hugging Face dataset saved to disk, parquet, or JSONL, as rows of dicts;
and turning preference rows into (prompt, images, chosen, rejected) pairs.

Two preference layouts are understood:

- VL-RewardBench's (the default): ``id``, ``query``, ``image``, ``response`` (a list of two answers),
  ``human_ranking`` (rank per answer, 0 = best: ``[0, 1]`` means the first answer is preferred),
  ``query_source`` (WildVision, VLFeedback, POVID, RLAIF-V, RLHF-V, MMMU-Pro, MathVerse);
- plain pairs: ``prompt`` (or ``query``/``question``), ``image``/``images``, ``chosen``, ``rejected``.

Images may be PIL images, bytes, ``{"bytes": ..., "path": ...}`` dicts (as datasets and its parquet
files store them), paths, or anything else rewardplug's samples accept.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

# VL-RewardBench's sources and the three categories its paper reports (General, Hallucination,
# Reasoning); the macro average is the mean of the three accuracies.
VLREWARDBENCH_CATEGORIES = {
    "wildvision": "General",
    "vlfeedback": "General",
    "povid": "Hallucination",
    "rlaif": "Hallucination",
    "rlhf": "Hallucination",
    "mmmu": "Reasoning",
    "mathverse": "Reasoning",
    "reasoning": "Reasoning",
}


def vlrewardbench_category(row: dict) -> str | None:
    """VL-RewardBench's category of a row, from ``query_source`` or else from the ``id`` prefix
    (``RLAIF-V_...``, ``mathverse_...``); None when neither names a known source."""
    for key in ("query_source", "id"):
        value = row.get(key)
        if not isinstance(value, str):
            continue
        low = value.lower()
        for prefix, category in VLREWARDBENCH_CATEGORIES.items():
            if low.startswith(prefix):
                return category
    return None


class Rows:
    """Rows of a dataset, read by position (images stay undecoded until a row is read)."""

    def __init__(self, data: Any, columns: list[str], path: Path | None):
        self._data = data  # a datasets.Dataset, or a list of dicts
        self.columns = columns
        self.path = path

    def __len__(self) -> int:
        return len(self._data)

    def slice(self, start: int, stop: int) -> list[dict]:
        if isinstance(self._data, list):
            return self._data[start:stop]
        return [self._data[i] for i in range(start, min(stop, len(self._data)))]

    def take(self, indices: Sequence[int]) -> list[dict]:
        return [self._data[i] for i in indices]

    def column(self, name: str) -> list:
        """One column's values (without decoding other columns)."""
        if isinstance(self._data, list):
            return [row.get(name) for row in self._data]
        return list(self._data[name])

    @property
    def base_dir(self) -> str | None:
        """Folder that relative image paths in the data are relative to."""
        if self.path is None:
            return None
        return str(self.path if self.path.is_dir() else self.path.parent)


def read_rows(source: Any, *, split: str | None = None) -> Rows:
    """Open ``source``: a folder written by ``datasets.save_to_disk`` (a Dataset, or a DatasetDict
    with ``split``; default "test", else the only split), a ``.parquet`` file, a ``.jsonl``/``.json``
    file, a ``datasets.Dataset``, or a list of dicts."""
    if isinstance(source, list):
        return Rows(source, sorted({k for row in source for k in row}), None)
    if not isinstance(source, (str, os.PathLike)):  # a datasets.Dataset
        return Rows(source, list(source.column_names), None)
    path = Path(source)
    if path.is_dir():
        import datasets

        data = datasets.load_from_disk(str(path))
        if isinstance(data, datasets.DatasetDict):
            names = list(data)
            pick = split or ("test" if "test" in names else names[0] if len(names) == 1 else None)
            if pick not in data:
                raise ValueError(f"{path} holds splits {names}; choose one with split=")
            data = data[pick]
        return Rows(data, list(data.column_names), path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        return Rows(table.to_pylist(), list(table.column_names), path)
    if path.suffix in (".jsonl", ".json"):
        rows = []
        with path.open() as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path} line {n} is not valid JSON ({e.msg})") from None
        return Rows(rows, sorted({k for row in rows for k in row}), path)
    raise ValueError(f"cannot read {path}: expected a datasets folder, .parquet or .jsonl")


def _first(available: Sequence[str], candidates: Sequence[str]) -> str | None:
    return next((c for c in candidates if c in available), None)


@dataclass
class PreferenceColumns:
    """Which columns hold what; None means "find it" (the first candidate present).

    prompt: the question (default: query, prompt, question).
    image: the image or list of images (default: image, images); no such column means text only.
    chosen / rejected: the preferred and the other answer (plain-pair layout).
    responses / ranking: a list of answers and their ranks, 0 = best (VL-RewardBench layout:
        response, human_ranking); chosen is the best-ranked answer, rejected the worst.
    id: a unique key per pair (default: id); used to resume; the row number otherwise.
    category: "auto" (a ``category`` column, else VL-RewardBench's categories from query_source/id,
        else none), "none", or a column name.
    """

    prompt: str | None = None
    image: str | None = None
    chosen: str | None = None
    rejected: str | None = None
    responses: str | None = None
    ranking: str | None = None
    id: str | None = None
    category: str = "auto"

    def resolve(self, available: Sequence[str]) -> "PreferenceColumns":
        """The same columns with every "find it" settled against the data's columns."""
        out = PreferenceColumns(**vars(self))
        out.prompt = out.prompt or _first(available, ["query", "prompt", "question"])
        out.image = out.image or _first(available, ["image", "images"])
        out.id = out.id or _first(available, ["id"])
        if not (out.chosen and out.rejected) and not out.responses:
            if "chosen" in available and "rejected" in available:
                out.chosen, out.rejected = "chosen", "rejected"
            else:
                out.responses = _first(available, ["response", "responses"])
        if out.responses and not out.ranking:
            out.ranking = _first(available, ["human_ranking", "ranking"])
        missing = [c for c in (out.prompt,) if c is None]
        if missing or not ((out.chosen and out.rejected) or (out.responses and out.ranking)):
            raise ValueError(
                "cannot find the preference columns: need a prompt column (query/prompt/question) and "
                f"either chosen+rejected or response+human_ranking; the data has {list(available)}"
            )
        for name in (out.prompt, out.image, out.chosen, out.rejected, out.responses, out.ranking):
            if name is not None and name not in available:
                raise ValueError(f"column {name!r} is not in the data (columns: {list(available)})")
        if out.category == "auto":
            if "category" in available:
                out.category = "category"
            elif "query_source" in available or (out.responses and out.id):
                out.category = "vlrewardbench"
            else:
                out.category = "none"
        elif out.category not in ("none", "vlrewardbench") and out.category not in available:
            raise ValueError(f"category column {out.category!r} is not in the data (columns: {list(available)})")
        return out

    def category_of(self, row: dict) -> str:
        if self.category == "none":
            return "all"
        if self.category == "vlrewardbench":
            return vlrewardbench_category(row) or str(row.get("query_source") or "unknown")
        value = row.get(self.category)
        return "unknown" if value is None else str(value)

    def answers(self, row: dict) -> tuple[Any, Any]:
        """(chosen, rejected) of one row; ValueError when the ranking does not pick one of each."""
        if self.chosen and self.rejected:
            return row[self.chosen], row[self.rejected]
        responses, ranking = list(row[self.responses]), list(row[self.ranking])
        if len(responses) < 2 or len(responses) != len(ranking):
            raise ValueError(f"{len(responses)} responses with {len(ranking)} ranks: need 2 or more of each")
        best, worst = min(ranking), max(ranking)
        if best == worst:
            raise ValueError(f"ranking {ranking} prefers no answer")
        return responses[ranking.index(best)], responses[ranking.index(worst)]

    def images(self, row: dict, base_dir: str | None = None) -> list:
        """The row's images, relative paths made absolute against ``base_dir`` (the data's folder)."""
        value = row.get(self.image) if self.image else None
        if value is None:
            return []
        images = [im for im in value if im is not None] if isinstance(value, (list, tuple)) else [value]
        return [resolve_image(im, base_dir) for im in images]


def resolve_image(image: Any, base_dir: str | None) -> Any:
    """A relative local image path made absolute against ``base_dir`` when that file exists there, so
    data reads the same whatever the current folder and whoever scores it (engine, pool, Ray actor)."""
    if not isinstance(image, str) or base_dir is None or "://" in image or image.startswith("data:"):
        return image
    if Path(image).is_absolute():
        return image
    path = Path(base_dir) / image
    return str(path) if path.exists() else image


def answer_text(answer: Any) -> str:
    """The text of an answer (a string, or assistant messages) for lengths in reports."""
    if isinstance(answer, str):
        return answer
    if isinstance(answer, list):
        parts = []
        for message in answer:
            content = message.get("content") if isinstance(message, dict) else message
            if isinstance(content, str):
                parts.append(content)
            elif isinstance(content, list):
                parts += [c.get("text", "") for c in content if isinstance(c, dict)]
        return "".join(parts)
    return str(answer)
