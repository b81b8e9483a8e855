"""Preference pairs from N scored completions per prompt, as a TRL DPO dataset (MPO/DPO data).

Input rows: ``prompt``, ``completion``, ``images`` (or ``image``), and ``score`` (or scored here through
an engine or a pool). Rows are grouped by prompt and images (or by a group column), then per group:

- ``best-worst``: the highest against the lowest score, when the gap is above ``min_margin``;
- ``all``: every pair whose gap is above ``min_margin``, largest gaps first, at most
  ``max_pairs_per_prompt`` per prompt.

Output rows follow TRL's DPO format for vision data (conversational): ``prompt`` (user messages),
``chosen`` and ``rejected`` (one assistant message each), ``images`` (a list), plus ``chosen_score``,
``rejected_score`` and ``margin``. TRL's DPOTrainer and ``DataCollatorForVisionPreference`` take it as
is. The selection rule is recorded next to the output (``OUT.meta.json``, or ``rewardplug_pairs.json``
inside a dataset folder, also in the dataset's info description).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .data import read_rows, resolve_image

logger = logging.getLogger(__name__)

MODES = ("best-worst", "all")


class MissingScoresError(ValueError):
    """Rows have no score and nothing was given to score them with."""

    def __init__(self, count: int, score_column: str):
        super().__init__(f"{count} rows have no {score_column!r}: pass model=, pool= or scorer= to score them")
        self.count, self.score_column = count, score_column


@dataclass
class PairRule:
    """How pairs are picked per prompt.

    mode: "best-worst" (one pair per prompt) or "all" (every pair above the margin, largest first).
    min_margin: a pair needs chosen_score - rejected_score > min_margin (0: any strict preference; ties
        never make a pair).
    max_pairs_per_prompt: cap for mode "all" (None: no cap).
    """

    mode: str = "best-worst"
    min_margin: float = 0.0
    max_pairs_per_prompt: int | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.min_margin < 0:
            raise ValueError(f"min_margin must be >= 0, got {self.min_margin}")
        if self.max_pairs_per_prompt is not None and self.max_pairs_per_prompt < 1:
            raise ValueError(f"max_pairs_per_prompt must be >= 1, got {self.max_pairs_per_prompt}")


def _image_key(image: Any) -> str:
    if isinstance(image, str):
        return image
    if isinstance(image, (bytes, bytearray)):
        return hashlib.sha1(image).hexdigest()
    if isinstance(image, dict):
        return image.get("path") or hashlib.sha1(image.get("bytes") or b"").hexdigest()
    from ..images import image_digest  # a PIL image: by content

    return image_digest(image)


def _images(row: dict) -> list:
    value = row.get("images", row.get("image"))
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def group_key(row: dict, group_column: str | None = None) -> str:
    """Rows with the same key are completions of one prompt: the group column's value, else the prompt
    and its images."""
    if group_column:
        return json.dumps(row[group_column], sort_keys=True, default=str)
    prompt = json.dumps(row.get("prompt"), sort_keys=True, default=_image_key)
    return prompt + "|" + "|".join(_image_key(im) for im in _images(row))


def select_pairs(scores: list[float], rule: PairRule) -> list[tuple[int, int]]:
    """(chosen, rejected) positions within one prompt's completions, by the rule. Ties in score go to
    the earlier completion."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    if len(order) < 2:
        return []
    if rule.mode == "best-worst":
        best, worst = order[0], order[-1]
        return [(best, worst)] if scores[best] - scores[worst] > rule.min_margin else []
    pairs = [(a, b) for a, b in itertools.combinations(order, 2) if scores[a] - scores[b] > rule.min_margin]
    pairs.sort(key=lambda p: (-(scores[p[0]] - scores[p[1]]), p))
    return pairs[: rule.max_pairs_per_prompt] if rule.max_pairs_per_prompt else pairs


def _messages(value: Any, role: str) -> list[dict]:
    return [{"role": role, "content": value}] if isinstance(value, str) else list(value)


def to_dpo_row(prompt: Any, chosen: Any, rejected: Any, images: list, chosen_score: float, rejected_score: float) -> dict:
    """One row of TRL's conversational DPO format (with our scores alongside)."""
    return {
        "prompt": _messages(prompt, "user"),
        "chosen": _messages(chosen, "assistant"),
        "rejected": _messages(rejected, "assistant"),
        "images": images,
        "chosen_score": chosen_score,
        "rejected_score": rejected_score,
        "margin": chosen_score - rejected_score,
    }


def make_pairs(
    input: Any,
    output: str | os.PathLike,
    *,
    rule: PairRule | None = None,
    score_column: str = "score",
    group_column: str | None = None,
    rescore: bool = False,
    model: str | None = None,
    pool: str | None = None,
    scorer: Any = None,
    address: str | None = None,
    samples_per_request: int = 64,
    progress: bool = True,
    model_options: dict | None = None,
    engine_options: dict | None = None,
) -> dict:
    """Build preference pairs from scored completions and write them as a TRL DPO dataset.

    input: JSONL, parquet or a saved datasets folder (or a list of dicts) with prompt, completion,
        images and ``score_column``. Rows without a score (or all rows, with ``rescore``) are scored
        through ``model`` / ``pool`` (on the Ray cluster at ``address``) / ``scorer``; rows that cannot
        be scored are left out (counted).
    output: ``.jsonl``, ``.parquet``, or any other path: a datasets folder (``save_to_disk``) with the
        images as an Image feature (PIL on load), the form TRL's DPOTrainer takes directly.
    Returns the metadata written next to the output (rule, counts, sources).
    """
    rule = rule or PairRule()
    rows_in = read_rows(input)
    rows = rows_in.slice(0, len(rows_in))
    for n, row in enumerate(rows):
        if "prompt" not in row or "completion" not in row:
            raise ValueError(f"row {n} needs 'prompt' and 'completion' (keys: {sorted(row)})")
    missing = [i for i, row in enumerate(rows) if rescore or not _is_score(row.get(score_column))]
    unscorable: dict[int, str] = {}
    if missing:
        if model is None and pool is None and scorer is None:
            raise MissingScoresError(len(missing), score_column)
        unscorable = _score_rows(rows, missing, score_column, samples_per_request, progress,
                                 dict(model=model, pool=pool, scorer=scorer, address=address, base_dir=rows_in.base_dir,
                                      model_options=model_options, engine_options=engine_options))  # fmt: skip

    groups: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        if i not in unscorable:
            groups.setdefault(group_key(row, group_column), []).append(i)
    out_rows = []
    jsonl_dir = Path(output).parent if Path(output).suffix == ".jsonl" else None
    for members in groups.values():
        scores = [float(rows[i][score_column]) for i in members]
        for a, b in select_pairs(scores, rule):
            first, second = rows[members[a]], rows[members[b]]
            if jsonl_dir is not None:  # paths stay paths, relative ones relative to the output file
                images = [_path_from(jsonl_dir, im, rows_in.base_dir) for im in _images(first)]
            else:  # files are embedded: read them where they are
                images = [resolve_image(im, rows_in.base_dir) for im in _images(first)]
            out_rows.append(to_dpo_row(first["prompt"], first["completion"], second["completion"], images,
                                       scores[a], scores[b]))  # fmt: skip
    meta = {
        "rewardplug_pairs": {
            "rule": asdict(rule),
            "score_column": score_column,
            "group_column": group_column,
            "input": str(input) if isinstance(input, (str, os.PathLike)) else None,
            "scored_here": len(missing),
            "scored_by": model or (f"pool:{pool}" if pool else None) if missing else None,
            "completions": len(rows),
            "unscorable": {str(k): v for k, v in unscorable.items()},
            "prompts": len(groups),
            "pairs": len(out_rows),
            "format": "trl-dpo-conversational",
        }
    }
    write_pairs(out_rows, output, meta)
    logger.info("%d pairs from %d prompts written to %s", len(out_rows), len(groups), output)
    return meta["rewardplug_pairs"]


def _path_from(folder: Path, image: Any, base_dir: str | None) -> Any:
    """An image for a JSONL output in ``folder``: a relative local path (relative to the input's folder,
    as rewardplug reads it) becomes the relative path from ``folder`` to the same file, so the output
    reads the same way; absolute paths, URLs, data URIs and embedded images are kept as they are."""
    path = image.get("path") if isinstance(image, dict) and not image.get("bytes") else image
    if not isinstance(path, str) or base_dir is None or "://" in path or path.startswith("data:") or Path(path).is_absolute():
        return image
    target = Path(base_dir) / path
    if not target.exists():
        return image
    return os.path.relpath(os.path.abspath(target), os.path.abspath(folder))


def _is_score(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def _score_rows(rows: list[dict], indices: list[int], score_column: str, per_request: int, progress: bool,
                source_options: dict) -> dict[int, str]:  # fmt: skip
    from tqdm.auto import tqdm

    from .scoring import open_scorer, settle, submit

    base_dir = source_options["base_dir"]
    unscorable: dict[int, str] = {}
    with open_scorer(**source_options) as source, tqdm(total=len(indices), desc="scoring", unit="sample", disable=not progress) as bar:  # fmt: skip
        chunks = [indices[k : k + per_request] for k in range(0, len(indices), per_request)]
        futures = [(chunk, submit(source, [_sample(rows[i], base_dir) for i in chunk])) for chunk in chunks]
        for chunk, future in futures:
            scores, errors = settle(future)
            for pos, i in enumerate(chunk):
                rows[i][score_column] = scores[pos]
                if pos in errors:
                    unscorable[i] = errors[pos]
            bar.update(len(chunk))
    if unscorable:
        logger.warning("%d completions could not be scored and make no pairs (reasons in the metadata)", len(unscorable))
    return unscorable


def _sample(row: dict, base_dir: str | None) -> dict:
    images = [resolve_image(im, base_dir) for im in _images(row)]
    return {"prompt": row["prompt"], "completion": row["completion"], "images": images}


def meta_path(output: str | os.PathLike) -> Path:
    """Where the selection rule is recorded for an output path."""
    output = Path(output)
    if output.suffix in (".jsonl", ".parquet"):
        return output.with_name(output.name + ".meta.json")
    return output / "rewardplug_pairs.json"


def write_pairs(rows: list[dict], output: str | os.PathLike, meta: dict) -> None:
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    if output.suffix == ".jsonl":
        with output.open("w") as f:
            for row in rows:
                f.write(json.dumps({**row, "images": [_jsonable(im) for im in row["images"]]}) + "\n")
    else:
        import datasets

        rows = [{**row, "images": [_image_struct(im) for im in row["images"]]} for row in rows]
        ds = datasets.Dataset.from_list(rows) if rows else datasets.Dataset.from_dict(
            {k: [] for k in ("prompt", "chosen", "rejected", "images", "chosen_score", "rejected_score", "margin")})  # fmt: skip
        if rows and any(row["images"] for row in rows):
            ds = ds.cast_column("images", [datasets.Image()])
        ds.info.description = json.dumps(meta)
        if output.suffix == ".parquet":
            ds.to_parquet(str(output))
        else:
            ds.save_to_disk(str(output))
    meta_path(output).write_text(json.dumps(meta, indent=2) + "\n")


def _image_struct(image: Any) -> dict:
    """An image as datasets' Image feature stores it ({"bytes", "path"}), whatever form it came in."""
    import base64
    import io

    if isinstance(image, dict):
        return {"bytes": image.get("bytes"), "path": image.get("path")}
    if isinstance(image, str):
        if image.startswith("data:"):
            return {"bytes": base64.b64decode(image.split(",", 1)[1]), "path": None}
        if Path(image).is_file():  # embedded, so the dataset stays whole wherever it is copied
            return {"bytes": Path(image).read_bytes(), "path": Path(image).name}
        return {"bytes": None, "path": image}
    if isinstance(image, (bytes, bytearray)):
        return {"bytes": bytes(image), "path": None}
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


def _jsonable(image: Any) -> Any:
    """Images in a JSONL output: strings as they are, bytes and PIL images as PNG data URIs."""
    import base64
    import io

    if isinstance(image, str):
        return image
    if isinstance(image, dict):
        return image.get("path") if image.get("path") and not image.get("bytes") else _jsonable(image["bytes"])
    if not isinstance(image, (bytes, bytearray)):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        image = buf.getvalue()
    return "data:image/png;base64," + base64.b64encode(bytes(image)).decode()
