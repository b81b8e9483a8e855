"""Runs planned batches on a RewardModel, sharing work without changing any score.

- The vision tower runs once per distinct image (content digest); outputs are kept in a VisionCache.
- Units whose samples share a prompt prefix run it once (key/value cache) and score each completion
  on top of it, with each sample's own M-RoPE positions.
- ``launch`` queues a batch's passes with their scores left on the device; ``finish`` reads them (the
  batch's one synchronisation), so the engine launches the next batch before reading this one.
- Out of memory, and only out of memory, splits the batch and retries, down to single samples: a
  sample still out of memory alone gets its own reason (it is too large). Any other failure (a device
  error such as "CUDA error: an illegal memory access", a bug) is a system failure: ``run`` raises
  ``ScoringError`` with the original as its cause, and the caller fails every request in the batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..encoding import EncodedSample, cat_pixels, collate
from ..errors import ScoringError
from ..model import RewardModel
from .scheduler import Unit, WorkItem
from .stats import Stats
from .caches import VisionCache

logger = logging.getLogger(__name__)

Result = tuple[WorkItem, "float | SampleTooLarge"]


class SampleTooLarge(Exception):
    """One sample ran out of memory even when scored alone: that sample's own problem, not the system's."""


def is_oom(error: BaseException) -> bool:
    return isinstance(error, (MemoryError, torch.OutOfMemoryError)) or "out of memory" in str(error).lower()


def _prefix(s: EncodedSample, p: int) -> EncodedSample:
    return EncodedSample(s.input_ids[:p], s.mm_token_type_ids[:p], s.pixels, s.image_grid_thw,
                         s.image_digests, s.position_ids[:, :p])  # fmt: skip


def _suffix(s: EncodedSample, p: int) -> EncodedSample:
    return EncodedSample(s.input_ids[p:], s.mm_token_type_ids[p:], position_ids=s.position_ids[:, p:])


@dataclass
class Launched:
    """A batch queued on the device: each pass's items and scores (still on the device), its counters,
    or the error that stopped it."""

    units: list[Unit]
    scored: list[tuple[list[WorkItem], torch.Tensor]]
    counts: dict[str, int]
    error: Exception | None = None


class ModelRunner:
    """max_kv_tokens: the most expanded key/value tokens one suffix pass holds, ``rows x (padded prefix +
    padded suffix)`` (the engine's budget); None: no bound."""

    def __init__(self, model: RewardModel, vision_cache: VisionCache, stats: Stats, min_chunk_tokens: int = 512,
                 max_kv_tokens: int | None = None):  # fmt: skip
        self.model = model
        self.min_chunk_tokens = min_chunk_tokens
        self.max_kv_tokens = max_kv_tokens
        self.vision_cache = vision_cache
        self.stats = stats

    def run(self, units: list[Unit]) -> list[Result]:
        """Score every item of ``units`` (launch, then finish)."""
        return self.finish(self.launch(units))

    def launch(self, units: list[Unit]) -> "Launched":
        """Queue a batch's passes on the device; its scores stay there until ``finish``. Never raises:
        a failure is kept and comes out of ``finish``."""
        counts: dict[str, int] = {}
        try:
            return Launched(units, self._compute(units, counts), counts)
        except Exception as error:  # noqa: BLE001 - sorted in finish
            return Launched(units, [], counts, error)

    def finish(self, launched: "Launched") -> list[Result]:
        """Read a launched batch's scores (its one synchronisation) and count the batch. Out of memory
        runs the batch again, split; a sample too large alone gets ``SampleTooLarge`` in place of its
        score; any other failure raises ``ScoringError``."""
        try:
            if launched.error is not None:
                raise launched.error
            values = torch.cat([s for _, s in launched.scored]).cpu().tolist() if launched.scored else []
        except Exception as error:  # noqa: BLE001 - OOM splits, anything else is a system failure
            if is_oom(error):
                return self._split(launched.units)
            n = sum(u.rows for u in launched.units)
            raise ScoringError(f"scoring a batch of {n} samples failed ({type(error).__name__}: {error})") from error
        counts = launched.counts
        self.stats.add(batches=1, **counts)  # only once the whole batch succeeded: retries count once
        self.stats.observe("batch_padded_tokens", counts.get("padded_tokens", 0))
        return list(zip([i for items, _ in launched.scored for i in items], values))

    def _split(self, units: list[Unit]) -> list[Result]:
        items = [i for u in units for i in u.items]
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if len(items) == 1:
            s = items[0].encoded
            reason = f"out of memory even when scored alone ({s.num_tokens} tokens, {s.num_patches} image patches)"
            return [(items[0], SampleTooLarge(reason))]
        self.stats.add(oom_splits=1)
        logger.info("batch of %d samples ran out of memory; splitting", len(items))
        if len(units) > 1:
            half = len(units) // 2
            return self.run(units[:half]) + self.run(units[half:])
        half = len(items) // 2
        return self.run([Unit(items[:half], half > 1)]) + self.run([Unit(items[half:], len(items) - half > 1)])

    def _compute(self, units: list[Unit], counts: dict[str, int]) -> list[tuple[list[WorkItem], torch.Tensor]]:
        def add(**deltas):
            for k, v in deltas.items():
                counts[k] = counts.get(k, 0) + v

        singles = [u.items[0] for u in units if not u.shared]
        groups = [u for u in units if u.shared]
        reps = [g.items[0].encoded for g in groups]
        embeds = self._image_embeds([i.encoded for i in singles] + reps, add)
        # Every pass is queued with its scores left on the device; they are read once, at the end, so the
        # host collates the next pass while the device runs this one.
        scored: list[tuple[list[WorkItem], torch.Tensor]] = []
        for part in self._single_passes(list(zip(singles, embeds[: len(singles)]))):
            items = [i for i, _ in part]
            batch = collate([i.encoded for i in items], self.model.pad_token_id, "right")
            scored.append((items, self.model.forward(batch, _flat([e for _, e in part]), on_device=True)))
            add(forward_passes=1, real_tokens=sum(i.num_tokens for i in items), padded_tokens=batch.padded_tokens)
        if groups:
            scored += self._run_groups(groups, embeds[len(singles) :], add)
        return scored

    def _single_passes(self, rows: list) -> list[list]:
        """Plain samples in one pass, or, where the model prefers unpadded batches (a CPU, where padding
        only costs), one pass per length: same rows and budgets, no padding."""
        if not rows or not getattr(self.model, "prefers_unpadded_batches", False):
            return [rows] if rows else []
        by_length: dict[int, list] = {}
        for row in rows:
            by_length.setdefault(row[0].num_tokens, []).append(row)
        return list(by_length.values())

    def _run_groups(self, groups: list[Unit], embeds: list[list[torch.Tensor]], add) -> list[tuple[list, torch.Tensor]]:
        pad = self.model.pad_token_id
        lengths = [g.items[0].prefix_len for g in groups]
        prefixes = collate([_prefix(g.items[0].encoded, p) for g, p in zip(groups, lengths)], pad, "right")
        cache = self.model.forward_prefixes(prefixes, _flat(embeds))
        # Suffix rows of all groups, shortest first, in chunks of similar length: padding stays low.
        rows = sorted(((i, k, p) for k, (g, p) in enumerate(zip(groups, lengths)) for i in g.items),
                      key=lambda r: r[0].num_tokens - r[2])  # fmt: skip
        results: list[tuple[list, torch.Tensor]] = []
        padded, passes = prefixes.padded_tokens, 1
        prefix_len = prefixes.input_ids.shape[1]  # padded: every suffix row attends to all of it
        for chunk in _similar_length_chunks(rows, self.min_chunk_tokens, prefix_len, self.max_kv_tokens):
            suffixes = collate([_suffix(i.encoded, p) for i, _, p in chunk], pad, "right")
            index = torch.tensor([k for _, k, _ in chunk])
            scores = self.model.forward_suffixes(cache, index, prefixes.attention_mask, suffixes, on_device=True)
            padded += suffixes.padded_tokens
            passes += 1
            results.append(([i for i, _, _ in chunk], scores))
        real = sum(lengths) + sum(i.num_tokens - p for i, _, p in rows)
        add(forward_passes=passes, real_tokens=real, padded_tokens=padded, prefix_groups=len(groups),
            prefix_hits=len(rows) - len(groups))  # fmt: skip
        return results

    def _image_embeds(self, samples: list[EncodedSample], add) -> list[list[torch.Tensor]]:
        """Vision features of each sample's images, running the tower only for images not seen yet."""
        found: dict[str, torch.Tensor] = {}
        todo: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        hits = 0
        for s in samples:
            if not s.image_digests:
                continue
            sizes = s.image_grid_thw.prod(-1).tolist()
            for digest, pixels, grid in zip(s.image_digests, s.pixels.split(sizes), s.image_grid_thw):
                if digest in found or digest in todo:
                    hits += 1
                    continue
                cached = self.vision_cache.get(digest)
                if cached is not None:
                    found[digest] = cached
                    hits += 1
                else:
                    todo[digest] = (pixels, grid)
        for chunk in _vision_passes(list(todo.items()), getattr(self.model, "vision_patches_per_pass", None)):
            pixels = cat_pixels([p for _, (p, _) in chunk])
            grids = torch.stack([g for _, (_, g) in chunk])
            for (digest, _), features in zip(chunk, self.model.image_features(pixels, grids)):
                found[digest] = features = features.clone()  # own storage: a view would pin the whole batch
                self.vision_cache.put(digest, features)
        add(vision_hits=hits, vision_misses=len(todo))
        return [[found[d] for d in s.image_digests] for s in samples]


def _vision_passes(images: list, max_patches: int | None) -> list[list]:
    """Images (digest, (pixels, grid)) in passes of at most ``max_patches`` patches (an image larger
    than that gets a pass of its own); one pass for all when None."""
    if max_patches is None:
        return [images] if images else []
    passes: list[list] = []
    patches = 0
    for image in images:
        n = int(image[1][1].prod())
        if not passes or patches + n > max_patches:
            passes.append([])
            patches = 0
        passes[-1].append(image)
        patches += n
    return passes


def _similar_length_chunks(rows: list, min_tokens: int, prefix_len: int = 0, max_kv_tokens: int | None = None,
                           efficiency: float = 0.9) -> list[list]:  # fmt: skip
    """Split rows sorted by suffix length into suffix passes. A pass is closed when adding the next row
    would push its padding efficiency under ``efficiency`` and it already holds ``min_tokens`` padded
    tokens (so GPUs still get big enough batches), or would take its expanded key/value, ``rows x
    (prefix_len + longest suffix)``, over ``max_kv_tokens`` (a row over it alone gets a pass of its own;
    the planner keeps such rows out of sharing)."""
    chunks: list[list] = [[]]
    real = 0
    for row in rows:
        length = row[0].num_tokens - row[2]
        chunk = chunks[-1]
        padded_after = (len(chunk) + 1) * length
        uneven = padded_after * efficiency > real + length and len(chunk) * length >= min_tokens
        over_kv = max_kv_tokens is not None and (len(chunk) + 1) * (prefix_len + length) > max_kv_tokens
        if chunk and (uneven or over_kv):
            chunks.append([])
            chunk, real = chunks[-1], 0
        chunk.append(row)
        real += length
    return chunks


def _flat(per_sample: list[list[torch.Tensor]]) -> list[torch.Tensor] | None:
    flat = [t for ts in per_sample for t in ts]
    return flat or None
