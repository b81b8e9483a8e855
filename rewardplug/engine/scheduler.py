"""Token-budget batching with prompt groups kept together, and the ``Scheduler`` that hands the
engine's loop one batch at a time.

A ``Unit`` is what the runner computes in one go: one sample, or several samples that share a prompt
prefix (same tokens up to the final assistant turn, same images), whose prefix is encoded once. Units
are sorted by length and packed greedily so that padded tokens stay under ``max_batch_tokens``.

Prefix sharing has a memory cost of its own: each suffix row attends to a copy of its prefix's
key/value cache (expanded per row), plus its own suffix. That copy lives for one suffix pass, so the
bound is per pass: the runner runs a batch's suffix rows in passes of at most ``max_kv_tokens`` expanded
tokens, ``rows x (padded prefix + padded suffix)``, bounded in bytes before it runs (never found by
running out of memory). A group larger than one pass keeps its one prefix pass (splitting the group
would encode the prefix again per part); only a row that alone is over the bound is scored unshared.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ..encoding import EncodedSample


@dataclass
class WorkItem:
    """One sample to score, with the keys that let it share work with others."""

    encoded: EncodedSample
    owner: Any = None  # the engine's request
    index: int = 0  # position in the owner's samples
    key: bytes = b""  # identity: same tokens and images
    prefix_len: int = 0  # tokens that may be shared (0: none)
    prefix_key: bytes = b""

    @property
    def num_tokens(self) -> int:
        return self.encoded.num_tokens


def make_item(encoded: EncodedSample, turn_start_id: int | None, owner: Any = None, index: int = 0) -> WorkItem:
    """Compute identity and prefix keys.

    The shareable prefix ends at the last turn-start token (inclusive; ``<|im_start|>`` for Qwen, the
    model's ``turn_start_token_id``): a special token is always a token of its own, so the tokens
    before it never depend on the answer. Samples with image tokens after it (images in the answer)
    share nothing; with no turn-start token (None) nothing is shared.
    """
    ids = encoded.input_ids
    images = "|".join(encoded.image_digests).encode()
    key = hashlib.blake2b(ids.numpy().tobytes() + b"#" + images, digest_size=16).digest()
    starts = (ids == turn_start_id).nonzero() if turn_start_id is not None else []
    prefix_len, prefix_key = 0, b""
    if len(starts):
        p = int(starts[-1]) + 1
        if p < len(ids) and not bool(encoded.mm_token_type_ids[p:].any()):
            prefix_len = p
            prefix_key = hashlib.blake2b(ids[:p].numpy().tobytes() + b"#" + images, digest_size=16).digest()
    return WorkItem(encoded, owner, index, key, prefix_len, prefix_key)


@dataclass
class Unit:
    items: list[WorkItem]
    shared: bool  # True: items share items[0]'s prefix

    @property
    def rows(self) -> int:
        return len(self.items)

    @property
    def longest(self) -> int:
        return max(i.num_tokens for i in self.items)


@dataclass
class BatchPlan:
    units: list[Unit] = field(default_factory=list)
    singles: int = 0
    single_max: int = 0
    groups: int = 0
    prefix_max: int = 0
    suffixes: int = 0
    suffix_max: int = 0

    def padded_with(self, unit: Unit) -> tuple[int, int]:
        """(padded tokens, rows) if ``unit`` were added."""
        s, smax, g, pmax, n, nmax = self._dims_with(unit)
        return s * smax + g * pmax + n * nmax, s + n

    def row_kv_tokens_with(self, unit: Unit) -> int:
        """Expanded key/value tokens of the widest suffix row if ``unit`` were added (the padded prefix
        plus the longest suffix): the least a suffix pass of this batch can hold."""
        _, _, _, pmax, _, nmax = self._dims_with(unit)
        return pmax + nmax

    def add(self, unit: Unit) -> None:
        self.singles, self.single_max, self.groups, self.prefix_max, self.suffixes, self.suffix_max = (
            self._dims_with(unit)
        )
        self.units.append(unit)

    def _dims_with(self, unit: Unit):
        if not unit.shared:
            return (self.singles + 1, max(self.single_max, unit.longest), self.groups, self.prefix_max,
                    self.suffixes, self.suffix_max)  # fmt: skip
        p = unit.items[0].prefix_len
        longest_suffix = max(i.num_tokens - p for i in unit.items)
        return (self.singles, self.single_max, self.groups + 1, max(self.prefix_max, p),
                self.suffixes + unit.rows, max(self.suffix_max, longest_suffix))  # fmt: skip


def make_units(items: list[WorkItem], share_prefix: bool) -> list[Unit]:
    """Group items by prompt prefix (when sharing) and sort the units by length."""
    if not share_prefix:
        units = [Unit([i], False) for i in items]
    else:
        groups: dict[bytes, list[WorkItem]] = {}
        units = []
        for item in items:
            if item.prefix_len:
                groups.setdefault(item.prefix_key, []).append(item)
            else:
                units.append(Unit([item], False))
        units += [Unit(g, len(g) > 1) for g in groups.values()]
    units.sort(key=lambda u: u.longest)
    return units


def plan_batches(
    units: list[Unit], max_batch_tokens: int, max_batch_size: int, max_kv_tokens: int | None = None
) -> list[BatchPlan]:
    """Pack units, in order, into batches under the token, row and key/value budgets.

    max_kv_tokens: the runner's bound on one suffix pass's expanded key/value tokens (default
    ``max_batch_tokens``); here it keeps every suffix row of a batch (its padded prefix plus its suffix)
    within it, and takes out of sharing a row that alone is over it. A unit that is over a budget on its
    own runs alone; a shared group over the token or row budget is split into sub-groups that fit (each
    encodes the prefix again); a sub-group of one row is scored as a plain sample (no expansion).
    """
    max_kv_tokens = max_batch_tokens if max_kv_tokens is None else max_kv_tokens
    plans: list[BatchPlan] = []
    current = BatchPlan()
    for unit in _split_oversized(units, max_batch_tokens, max_batch_size, max_kv_tokens):
        padded, rows = current.padded_with(unit)
        kv = current.row_kv_tokens_with(unit)
        over = padded > max_batch_tokens or rows > max_batch_size or kv > max_kv_tokens
        if current.units and over:
            plans.append(current)
            current = BatchPlan()
        current.add(unit)
    if current.units:
        plans.append(current)
    return plans


def _split_oversized(units: list[Unit], max_batch_tokens: int, max_batch_size: int, max_kv_tokens: int) -> list[Unit]:
    def over(unit: Unit) -> bool:
        padded, rows = BatchPlan().padded_with(unit)
        kv = BatchPlan().row_kv_tokens_with(unit)
        return padded > max_batch_tokens or rows > max_batch_size or kv > max_kv_tokens

    out = []
    for unit in units:
        if not unit.shared or not over(unit):
            out.append(unit)
            continue
        chunk: list[WorkItem] = []
        for item in sorted(unit.items, key=lambda i: i.num_tokens):
            if chunk and over(Unit(chunk + [item], True)):
                out.append(Unit(chunk, len(chunk) > 1))
                chunk = []
            chunk.append(item)
        out.append(Unit(chunk, len(chunk) > 1))
    return out


# ---- the engine's scheduler ----------------------------------------------------------------------


@dataclass
class ScheduledBatch:
    """One batch for the runner: its units, and the duplicates (same key) of its items that get their
    scores."""

    units: list[Unit]
    copies: dict[bytes, list[WorkItem]]

    @property
    def items(self) -> list[WorkItem]:
        return [i for u in self.units for i in u.items]

    def targets(self, item: WorkItem) -> list[WorkItem]:
        """``item`` and its duplicates: every request position that gets ``item``'s score."""
        return [item, *self.copies.get(item.key, [])]


class PlanningFailed(Exception):
    """Planning a round failed (a bug): the round's items are in ``items``, the error is the cause."""

    def __init__(self, items: list[WorkItem]):
        super().__init__(f"planning a round of {len(items)} samples failed")
        self.items = items


class Scheduler:
    """Encoded samples in, batches out.

    ``add`` takes a request's items (from the encoder workers). ``schedule`` returns the next batch of
    the current round; when the round is used up it gathers a new one: it waits for ready items (with
    ``wait``), then up to ``max_wait_s`` for the window to fill, takes at most ``4 x max_batch_tokens``
    of them by turns from each request (a small request never waits behind all of a large one), drops
    duplicates and plans budgeted batches. Without ``wait`` it returns None at once when nothing is
    ready (the caller has a batch in flight and reads it first). With ``wait`` it returns None only
    when every producer has stopped and nothing is left.
    """

    def __init__(self, *, max_batch_tokens: int, max_batch_size: int, max_kv_tokens: int, max_wait_s: float,
                 share_prefix: bool, producers: int, stats: Any = None):  # fmt: skip
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = max_batch_size
        self.max_kv_tokens = max_kv_tokens
        self.max_wait_s = max_wait_s
        self.share_prefix = share_prefix
        self.stats = stats
        self._producers = producers
        self._ready: list[WorkItem] = []
        self._planned: list[ScheduledBatch] = []  # the current round's batches not yet handed out
        self._cond = threading.Condition()  # guards _ready and _producers

    def add(self, items: list[WorkItem]) -> None:
        with self._cond:  # a request's items arrive together, so its prompt group stays whole
            self._ready.extend(items)
            self._cond.notify_all()

    def producer_stopped(self) -> None:
        with self._cond:
            self._producers -= 1
            self._cond.notify_all()

    def ready(self) -> int:
        """Samples waiting: ready, or planned and not yet handed out."""
        planned = list(self._planned)  # the model thread replaces it; a snapshot is enough for a gauge
        with self._cond:
            return len(self._ready) + sum(len(b.items) for b in planned)

    @property
    def finished(self) -> bool:
        """Every producer stopped and every item handed out: nothing will come any more."""
        with self._cond:
            return self._producers <= 0 and not self._ready and not self._planned

    def schedule(self, wait: bool = True) -> ScheduledBatch | None:
        if not self._planned:
            items = self._take_round(wait)
            if not items:
                return None
            try:
                self._planned = self._plan(items)
            except Exception as error:
                raise PlanningFailed(items) from error
        return self._planned.pop(0) if self._planned else None

    def _take_round(self, wait: bool) -> list[WorkItem]:
        with self._cond:
            if not wait and not self._ready:
                return []
            while not self._ready and self._producers > 0:
                self._cond.wait()
            if not self._ready:
                return []  # closed and drained
            deadline = time.perf_counter() + self.max_wait_s
            while wait and self._producers > 0 and not self._window_full():
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            items = self._take_window()
        return [i for i in items if not i.owner.done]  # requests failed meanwhile (closed)

    def _plan(self, items: list[WorkItem]) -> list[ScheduledBatch]:
        unique: dict[bytes, WorkItem] = {}
        copies: dict[bytes, list[WorkItem]] = {}
        for item in items:
            if item.key in unique:
                copies.setdefault(item.key, []).append(item)
            else:
                unique[item.key] = item
        if self.stats is not None:
            self.stats.add(duplicate_hits=len(items) - len(unique))
        units = make_units(list(unique.values()), self.share_prefix)
        batches = []
        for plan in plan_batches(units, self.max_batch_tokens, self.max_batch_size, self.max_kv_tokens):
            keys = {i.key for u in plan.units for i in u.items}
            batches.append(ScheduledBatch(plan.units, {k: copies[k] for k in keys if k in copies}))
        return batches

    def _window_full(self) -> bool:
        tokens = sum(i.num_tokens for i in self._ready)
        return tokens >= self.max_batch_tokens or len(self._ready) >= 4 * self.max_batch_size

    def _take_window(self) -> list[WorkItem]:
        """Ready items for one round of batches, at most ``4 x max_batch_tokens`` (past that, planning
        gains nothing): whole prompt groups taken by turns from each request, so a request that arrives
        while a large one is being scored joins the next round instead of waiting for all of it. The
        rest stay ready, in order. Called with ``_cond`` held."""
        budget = 4 * self.max_batch_tokens
        if sum(i.num_tokens for i in self._ready) <= budget:
            items, self._ready = self._ready, []
            return items
        requests: dict[int, dict[Any, list[WorkItem]]] = {}  # request -> its prompt groups and singles, in order
        for k, item in enumerate(self._ready):
            units = requests.setdefault(id(item.owner), {})
            units.setdefault(item.prefix_key or k, []).append(item)
        turns = [list(units.values()) for units in requests.values()]
        taken: set[int] = set()
        tokens = 0
        while tokens < budget:
            for units in turns:
                if units and tokens < budget:
                    unit = units.pop(0)
                    taken.update(id(i) for i in unit)
                    tokens += sum(i.num_tokens for i in unit)
            turns = [u for u in turns if u]
            if not turns:
                break
        items = [i for i in self._ready if id(i) in taken]
        self._ready = [i for i in self._ready if id(i) not in taken]
        return items
