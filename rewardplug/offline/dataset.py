"""Scoring whole datasets on a Ray cluster with Ray Data, resumable block by block.

The input (JSONL or parquet files) is cut into blocks of ``rows_per_block`` rows, fixed by the input
alone (byte offsets of JSONL lines, row ranges of parquet files), so a rerun cuts it the same way.
Ray Data maps the blocks still to do over an actor pool (``map_batches`` with a callable class: one
reward model and engine per actor, ``concurrency`` actors, ``num_gpus`` each). An actor reads its block,
scores it, and writes ``part-<file>-<first row>.parquet`` (or ``.jsonl``) under the output folder
atomically (a temporary name, then a rename). A rerun after a crash skips every block whose part file
exists, so finished blocks are never scored again.

Output rows: ``file`` (input file number), ``row`` (row number in that file), ``id`` (when the input
has one), ``score`` (None when the sample could not be scored) and ``error`` (the reason, else None);
``keep_columns`` copies input columns alongside. ``read_scores(output)`` reads them back in input order.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

logger = logging.getLogger(__name__)

PLAN_FILE = "_plan.json"
DONE_FILE = "_SUCCESS.json"


@dataclass(frozen=True)
class Block:
    """Rows [start, stop) of input file ``file`` (for JSONL also their byte range)."""

    file: int
    path: str
    start: int
    stop: int
    byte_start: int = -1
    byte_stop: int = -1

    def part_name(self, fmt: str) -> str:
        return f"part-{self.file:05d}-{self.start:012d}.{fmt}"


def _inputs(input: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Input files: one file, a list, or a folder's *.jsonl / *.parquet files (sorted)."""
    items = [input] if isinstance(input, (str, os.PathLike)) else list(input)
    files: list[Path] = []
    for item in map(Path, items):
        if item.is_dir():
            files += sorted(p for p in item.iterdir() if p.suffix in (".jsonl", ".parquet"))
        else:
            files.append(item)
    for f in files:
        if f.suffix not in (".jsonl", ".parquet") or not f.is_file():
            raise ValueError(f"input {f} is not a .jsonl or .parquet file")
    if not files:
        raise ValueError(f"no .jsonl or .parquet files in {input}")
    return [f.resolve() for f in files]


def plan_blocks(files: Sequence[Path], rows_per_block: int) -> list[Block]:
    """Cut the inputs into blocks of ``rows_per_block`` rows (the last of each file may be shorter)."""
    blocks = []
    for n, path in enumerate(files):
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            rows = pq.ParquetFile(path).metadata.num_rows
            blocks += [Block(n, str(path), s, min(s + rows_per_block, rows)) for s in range(0, rows, rows_per_block)]
            continue
        offset, row, start, block_start = 0, 0, 0, 0
        with path.open("rb") as f:
            for line in f:
                if line.strip():
                    if row - start == rows_per_block:
                        blocks.append(Block(n, str(path), start, row, block_start, offset))
                        start, block_start = row, offset
                    row += 1
                offset += len(line)
        if row > start:
            blocks.append(Block(n, str(path), start, row, block_start, offset))
    return blocks


def read_block(block: Block) -> tuple[list[Any], dict[int, str]]:
    """The block's rows (None for a JSONL line that is not valid JSON) and why any row is unreadable."""
    path = Path(block.path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        rows, first = [], 0
        for g in range(pf.num_row_groups):  # only the row groups that overlap the block are read
            count = pf.metadata.row_group(g).num_rows
            if first < block.stop and first + count > block.start:
                table = pf.read_row_group(g)
                lo, hi = max(block.start - first, 0), min(block.stop - first, count)
                rows += table.slice(lo, hi - lo).to_pylist()
            first += count
        return rows, {}
    with path.open("rb") as f:
        f.seek(block.byte_start)
        text = f.read(block.byte_stop - block.byte_start).decode()
    rows, errors = [], {}
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            errors[len(rows)] = f"row {block.start + len(rows)} is not valid JSON ({e.msg})"
            rows.append(None)
    return rows, errors


class BlockScorer:
    """A Ray Data actor: one reward model and engine; scores whole blocks and writes their part files."""

    def __init__(self, model: str, output: str, fmt: str, keep_columns: Sequence[str], samples_per_request: int,
                 model_options: dict, engine_options: dict):  # fmt: skip
        from ..engine import RewardEngine
        from .scoring import load_model

        self.rm = load_model(model, **model_options)
        self.engine = RewardEngine(self.rm, **engine_options)
        self.output, self.fmt = Path(output), fmt
        self.keep_columns = list(keep_columns)
        self.samples_per_request = samples_per_request

    def __call__(self, batch: dict) -> dict:
        done: dict[str, list] = {"part": [], "rows": [], "errors": []}
        for values in zip(*(batch[k] for k in Block.__dataclass_fields__)):
            block = Block(*(v.item() if hasattr(v, "item") else v for v in values))
            rows, n_errors = self.score_block(block)
            done["part"].append(block.part_name(self.fmt))
            done["rows"].append(rows)
            done["errors"].append(n_errors)
        return done

    def score_block(self, block: Block) -> tuple[int, int]:
        import dataclasses

        from .scoring import settle, submit

        rows, errors = read_block(block)
        base_dir = str(Path(block.path).parent)  # relative image paths are relative to their file
        if self.rm.encoder.policy.base_dir != base_dir:
            self.rm.encoder.policy = dataclasses.replace(self.rm.encoder.policy, base_dir=base_dir)
        scores: list = [None] * len(rows)
        good = [i for i, row in enumerate(rows) if i not in errors]
        step = self.samples_per_request
        futures = [(chunk, submit(self.engine, [rows[i] for i in chunk])) for chunk in
                   (good[k : k + step] for k in range(0, len(good), step))]  # fmt: skip
        for chunk, future in futures:
            values, bad = settle(future)
            for pos, i in enumerate(chunk):
                scores[i] = values[pos]
                if pos in bad:
                    errors[i] = bad[pos]
        records = []
        for i, row in enumerate(rows):
            record = {"file": block.file, "row": block.start + i}
            if isinstance(row, dict) and "id" in row:
                record["id"] = row["id"]
            record.update(score=scores[i], error=errors.get(i))
            for name in self.keep_columns:
                record[name] = row.get(name) if isinstance(row, dict) else None
            records.append(record)
        write_part(records, self.output / block.part_name(self.fmt), self.fmt)
        return len(rows), len(errors)


def write_part(records: list[dict], path: Path, fmt: str) -> None:
    """Write one block's results under a temporary name, then rename: a part file exists only whole."""
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    if fmt == "jsonl":
        with tmp.open("w") as f:
            for record in records:
                f.write(json.dumps(record, default=str) + "\n")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), tmp)
    os.replace(tmp, path)


@dataclass
class ScoreDatasetResult:
    output: str
    blocks: int
    blocks_skipped: int
    rows_scored: int
    errors: int


def score_dataset(
    input: str | os.PathLike | Sequence[str | os.PathLike],
    output: str | os.PathLike,
    *,
    model: str,
    format: str = "parquet",
    rows_per_block: int = 1024,
    concurrency: int = 1,
    num_gpus: float | None = None,
    num_cpus: float = 1,
    samples_per_request: int = 64,
    keep_columns: Sequence[str] = (),
    address: str | None = None,
    resume: bool = True,
    progress: bool = True,
    model_options: dict | None = None,
    engine_options: dict | None = None,
) -> ScoreDatasetResult:
    """Score every row of JSONL/parquet ``input`` on a Ray cluster; write part files into ``output``.

    model: hub id or checkpoint folder, visible from every node ("tiny": the embedded test checkpoint).
    format: "parquet" or "jsonl" part files. rows_per_block: rows per block (the unit of resume).
    concurrency: reward-model actors; num_gpus: GPUs per actor (default 1 when the cluster has GPUs,
        else 0); num_cpus: CPUs per actor.
    address: the Ray cluster to join (default: the running one, else ``ray.init()``).
    resume: keep part files already written and score only the other blocks; False starts over.
    model_options / engine_options: passed to RewardModel.from_pretrained / RewardEngine in each actor.
    Rows that cannot be scored get score None and the reason in ``error``; a system failure fails the
    run (finished blocks stay on disk, and a rerun resumes after them).
    """
    import ray
    from tqdm.auto import tqdm

    from ..named_models import checkpoint_path

    if format not in ("parquet", "jsonl"):
        raise ValueError(f"format must be 'parquet' or 'jsonl', got {format!r}")
    files = _inputs(input)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    plan = {"inputs": [str(f) for f in files], "rows_per_block": rows_per_block, "format": format,
            "model": model, "keep_columns": list(keep_columns)}  # fmt: skip
    _check_plan(out, plan, resume)
    blocks = plan_blocks(files, rows_per_block)
    todo = [b for b in blocks if not (out / b.part_name(format)).exists()]
    logger.info("%d blocks, %d already scored in %s", len(blocks), len(blocks) - len(todo), out)

    if not ray.is_initialized():
        ray.init(address=address)
    if num_gpus is None:
        num_gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    model_options = dict(model_options or {})
    model_options.setdefault("image_roots", sorted({str(f.parent) for f in files} | {os.getcwd()}))
    rows = errors = 0
    if todo:
        import ray.data

        ds = ray.data.from_items([asdict(b) for b in todo], override_num_blocks=len(todo))
        scored = ds.map_batches(
            BlockScorer,
            fn_constructor_kwargs=dict(model=checkpoint_path(model), output=str(out), fmt=format,
                                       keep_columns=list(keep_columns), samples_per_request=samples_per_request,
                                       model_options=model_options, engine_options=dict(engine_options or {})),  # fmt: skip
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=concurrency),
            num_gpus=num_gpus,
            num_cpus=num_cpus,
        )
        with tqdm(total=sum(b.stop - b.start for b in blocks), initial=sum(b.stop - b.start for b in blocks if b not in todo),
                  desc="scoring", unit="row", disable=not progress) as bar:  # fmt: skip
            for done in scored.iter_rows():
                rows += int(done["rows"])
                errors += int(done["errors"])
                bar.update(int(done["rows"]))
    result = ScoreDatasetResult(str(out), len(blocks), len(blocks) - len(todo), rows, errors)
    (out / DONE_FILE).write_text(json.dumps({**plan, "blocks": len(blocks)}, indent=2) + "\n")
    return result


def _check_plan(out: Path, plan: dict, resume: bool) -> None:
    """A rerun must cut the input the same way; otherwise part files would overlap."""
    path = out / PLAN_FILE
    if resume and path.exists():
        before = json.loads(path.read_text())
        if before != plan:
            changed = {k: (before.get(k), v) for k, v in plan.items() if before.get(k) != v}
            raise ValueError(f"{out} holds parts of another run ({changed}); use another folder or resume=False")
    else:
        for part in out.glob("part-*"):
            part.unlink()
        (out / DONE_FILE).unlink(missing_ok=True)
    path.write_text(json.dumps(plan, indent=2) + "\n")


def read_scores(output: str | os.PathLike) -> list[dict]:
    """Every scored row from an output folder, in input order (file, then row)."""
    records = []
    for part in sorted(Path(output).glob("part-*")):
        if part.suffix == ".jsonl":
            records += [json.loads(line) for line in part.read_text().splitlines() if line.strip()]
        elif part.suffix == ".parquet":
            import pyarrow.parquet as pq

            records += pq.read_table(part).to_pylist()
    return sorted(records, key=lambda r: (r["file"], r["row"]))
