"""Pairwise preference accuracy in the VL-RewardBench protocol.

A pair is right when the chosen answer scores strictly higher than the rejected one; a tie counts as
wrong (and is reported), and so does a pair whose answers could not be scored (reported as unscored,
with the reason). Overall accuracy is per pair; the macro average is the mean of the per-category
accuracies (VL-RewardBench: General, Hallucination, Reasoning).

Every scored pair is appended to ``OUT/pairs.jsonl`` as soon as it is scored; a rerun with the same
output folder skips the pairs already there, so an interrupted evaluation resumes where it stopped.
At the end ``OUT`` holds ``scores.json`` (every pair's scores and the summary), ``report.md`` and
PNG charts (see ``report.py``).
"""

from __future__ import annotations

import json
import logging
import math
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from .data import PreferenceColumns, answer_text, read_rows
from .scoring import open_scorer, settle, submit

logger = logging.getLogger(__name__)

PAIRS_FILE = "pairs.jsonl"
RUN_FILE = "run.json"


class OtherRunError(ValueError):
    """The output folder holds results of another run (another model, data or columns)."""

    def __init__(self, folder: Path, changed: dict):
        self.folder, self.changed = folder, changed
        super().__init__(f"{folder} holds results of another run ({self.differences()}); use another output folder, "
                         "or resume=False to start over")  # fmt: skip

    def differences(self) -> str:
        return "; ".join(f"{key} was {before!r}, now {now!r}" for key, (before, now) in self.changed.items())


@dataclass
class PairResult:
    """One pair's outcome. ``error`` is set (and the scores may be None) when an answer could not be
    scored; such a pair counts as wrong."""

    key: str
    index: int
    category: str
    chosen_score: float | None
    rejected_score: float | None
    chosen_chars: int
    rejected_chars: int
    error: str | None = None

    @property
    def correct(self) -> bool:
        return self.error is None and self.chosen_score > self.rejected_score

    @property
    def tie(self) -> bool:
        return self.error is None and self.chosen_score == self.rejected_score

    @property
    def margin(self) -> float | None:
        return None if self.error is not None else self.chosen_score - self.rejected_score


@dataclass
class CategoryStats:
    pairs: int = 0
    correct: int = 0
    ties: int = 0
    unscored: int = 0

    @property
    def accuracy(self) -> float:
        return self.correct / self.pairs if self.pairs else math.nan


@dataclass
class EvalSummary:
    """Overall accuracy (per pair), macro average (mean of category accuracies), per-category counts."""

    pairs: int
    correct: int
    ties: int
    unscored: int
    accuracy: float
    macro_average: float
    categories: dict[str, CategoryStats] = field(default_factory=dict)
    model: str | None = None
    data: str | None = None
    output_dir: str | None = None

    def to_dict(self) -> dict:
        out = asdict(self)
        out["categories"] = {k: {**asdict(v), "accuracy": v.accuracy} for k, v in self.categories.items()}
        return out


def summarize(results: list[PairResult], **info: Any) -> EvalSummary:
    """Accuracy, ties and macro average of pair results (ties and unscored pairs count as wrong)."""
    cats: dict[str, CategoryStats] = {}
    for r in results:
        c = cats.setdefault(r.category, CategoryStats())
        c.pairs += 1
        c.correct += r.correct
        c.ties += r.tie
        c.unscored += r.error is not None
    n = len(results)
    correct = sum(c.correct for c in cats.values())
    return EvalSummary(
        pairs=n,
        correct=correct,
        ties=sum(c.ties for c in cats.values()),
        unscored=sum(c.unscored for c in cats.values()),
        accuracy=correct / n if n else math.nan,
        macro_average=sum(c.accuracy for c in cats.values()) / len(cats) if cats else math.nan,
        categories=dict(sorted(cats.items())),
        **info,
    )


def _keys(rows, columns: PreferenceColumns) -> list[str]:
    """A resume key per row: the id column when its values are unique, else the row number."""
    if columns.id:
        ids = [str(v) for v in rows.column(columns.id)]
        if len(set(ids)) == len(ids):
            return ids
        logger.warning("column %r has duplicate values: pairs are keyed by row number", columns.id)
    return [f"row{i}" for i in range(len(rows))]


def _load_done(path: Path) -> dict[str, PairResult]:
    """Pairs already written by an earlier run (a torn last line from a crash is ignored)."""
    done: dict[str, PairResult] = {}
    if not path.exists():
        return done
    with path.open() as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[record["key"]] = PairResult(**record)
    return done


def _check_run(out: Path, run: dict, resume: bool) -> None:
    """Refuse to mix pairs scored by another model (or from other data) into one results file."""
    path = out / RUN_FILE
    if resume and path.exists():
        before = json.loads(path.read_text())
        changed = {k: (before.get(k), v) for k, v in run.items() if before.get(k) != v}
        if changed:
            raise OtherRunError(out, changed)
    else:
        (out / PAIRS_FILE).unlink(missing_ok=True)
    path.write_text(json.dumps(run, indent=2) + "\n")


def evaluate(
    data: Any,
    output_dir: str | Path,
    *,
    model: str | None = None,
    pool: str | None = None,
    scorer: Any = None,
    address: str | None = None,
    columns: PreferenceColumns | None = None,
    split: str | None = None,
    pairs_per_request: int = 16,
    max_requests_in_flight: int = 4,
    resume: bool = True,
    progress: bool = True,
    report: bool = True,
    on_pair: Callable[[PairResult], None] | None = None,
    model_options: dict | None = None,
    engine_options: dict | None = None,
) -> EvalSummary:
    """Score every (chosen, rejected) pair of ``data`` and write results to ``output_dir``.

    data: a saved datasets folder, a parquet or JSONL file, a datasets.Dataset or a list of dicts
        (see ``rewardplug.offline.data``). columns: where prompt, image, answers and category are;
        default: found (VL-RewardBench's layout or chosen/rejected).
    model / pool / scorer: where scores come from, exactly one: a checkpoint (a RewardEngine is
        built here with ``model_options`` / ``engine_options``), the name of a running RewardPool, or an
        object with the engine's ``submit`` (a RewardEngine or RewardPool you own). address: the Ray
        cluster of the pool (default: the running one).
    pairs_per_request: pairs sent per request (2 samples each); up to ``max_requests_in_flight``
        requests are outstanding at once, so a pool's replicas all stay busy.
    resume: skip pairs already in ``output_dir/pairs.jsonl`` (from an interrupted run of the same model
        on the same data); False starts over.
    on_pair: called after each pair is written (e.g. to stop a run early).
    Returns the summary; a bad sample makes its pair unscored (counted wrong, reason kept), a system
    failure (ScoringError) stops the run with everything scored so far kept on disk.
    """
    from tqdm.auto import tqdm

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = read_rows(data, split=split)
    columns = (columns or PreferenceColumns()).resolve(rows.columns)
    keys = _keys(rows, columns)
    label = str(model or (f"pool:{pool}" if pool else getattr(getattr(scorer, "model", None), "name_or_path", None)))
    run = {"model": label, "data": str(Path(data).resolve()) if isinstance(data, (str, Path)) else None, "pairs": len(rows),
           "columns": vars(columns)}  # fmt: skip
    _check_run(out, run, resume)
    done = _load_done(out / PAIRS_FILE)
    todo = [i for i in range(len(rows)) if keys[i] not in done]
    if done:
        logger.info("resuming: %d of %d pairs already scored in %s", len(rows) - len(todo), len(rows), out)

    with open_scorer(model=model, pool=pool, scorer=scorer, address=address, base_dir=rows.base_dir,
                     model_options=model_options, engine_options=engine_options) as source, \
            (out / PAIRS_FILE).open("a") as log, \
            tqdm(total=len(rows), initial=len(rows) - len(todo), desc="pairs", unit="pair", disable=not progress) as bar:  # fmt: skip
        inflight: deque = deque()
        chunks = [todo[k : k + pairs_per_request] for k in range(0, len(todo), pairs_per_request)]
        for chunk in chunks:
            inflight.append(_submit_chunk(source, rows, columns, keys, chunk))
            if len(inflight) >= max_requests_in_flight:
                _write_chunk(inflight.popleft(), log, done, bar, on_pair)
        while inflight:
            _write_chunk(inflight.popleft(), log, done, bar, on_pair)

    results = [done[k] for k in keys]
    summary = summarize(results, model=label, data=run["data"], output_dir=str(out))
    if report:
        from .report import write_report

        write_report(summary, results, out)
    return summary


@dataclass
class _Chunk:
    pending: list[PairResult]  # scores still None
    row_errors: dict[int, str]  # position in chunk -> why the row is no pair at all
    future: Any


def _submit_chunk(source, rows, columns: PreferenceColumns, keys: list[str], indices: list[int]) -> _Chunk:
    samples, pending, row_errors = [], [], {}
    batch = list(zip(indices, rows.take(indices)))
    for pos, (i, row) in enumerate(batch):
        category = columns.category_of(row)
        try:
            chosen, rejected = columns.answers(row)
        except (ValueError, KeyError, TypeError) as e:
            row_errors[pos] = f"row {i}: {e}"
            chosen = rejected = ""
        pending.append(PairResult(keys[i], i, category, None, None, len(answer_text(chosen)), len(answer_text(rejected))))
        if pos not in row_errors:
            images = columns.images(row, rows.base_dir)
            for answer in (chosen, rejected):
                samples.append({"prompt": row[columns.prompt], "completion": answer, "images": images})
    future = submit(source, samples) if samples else None
    return _Chunk(pending, row_errors, future)


def _write_chunk(chunk: _Chunk, log, done: dict, bar, on_pair) -> None:
    scores, errors = settle(chunk.future) if chunk.future is not None else ([], {})
    s = 0  # position of this pair's chosen answer among the submitted samples
    for pos, result in enumerate(chunk.pending):
        if pos in chunk.row_errors:
            result.error = chunk.row_errors[pos]
        else:
            result.chosen_score, result.rejected_score = scores[s], scores[s + 1]
            why = [f"{name}: {errors[s + k]}" for k, name in enumerate(("chosen", "rejected")) if s + k in errors]
            result.error = "; ".join(why) or None
            s += 2
        log.write(json.dumps(asdict(result)) + "\n")
        log.flush()
        done[result.key] = result
        bar.update(1)
        if on_pair is not None:
            on_pair(result)
