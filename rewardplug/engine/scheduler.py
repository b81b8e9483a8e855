"""Token-budget batching with prompt groups kept together.

A ``Unit`` is what the runner computes in one go: one sample, or several samples that share a prompt
prefix (same tokens up to the final assistant turn, same images), whose prefix is encoded once. Units
are sorted by length and packed greedily so that padded tokens stay under ``max_batch_tokens``.

Prefix sharing has a memory cost of its own: each suffix row attends to a copy of its prefix's
key/value cache (expanded per row), plus its own suffix. The planner counts those tokens,
``suffix rows x (longest prefix + longest suffix)``, and keeps them under ``max_kv_tokens``, so the
expanded key/value of a batch is bounded in bytes before it runs (never found by running out of memory).
"""

from __future__ import annotations

import hashlib
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


def make_item(encoded: EncodedSample, im_start_id: int, owner: Any = None, index: int = 0) -> WorkItem:
    """Compute identity and prefix keys.

    The shareable prefix ends at the last ``<|im_start|>`` (inclusive): a special token is always a token
    of its own, so the tokens before it never depend on the answer. Samples with image tokens after it
    (images in the answer) share nothing.
    """
    ids = encoded.input_ids
    images = "|".join(encoded.image_digests).encode()
    key = hashlib.blake2b(ids.numpy().tobytes() + b"#" + images, digest_size=16).digest()
    starts = (ids == im_start_id).nonzero()
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

    def kv_tokens_with(self, unit: Unit) -> int:
        """Key/value tokens the suffix passes hold at most if ``unit`` were added: every suffix row
        attends to the padded prefix (expanded per row) and to its own padded suffix."""
        _, _, _, pmax, n, nmax = self._dims_with(unit)
        return n * (pmax + nmax)

    @property
    def kv_tokens(self) -> int:
        return self.suffixes * (self.prefix_max + self.suffix_max)

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

    max_kv_tokens: bound on ``BatchPlan.kv_tokens`` (expanded prefix key/value plus suffixes);
    default ``max_batch_tokens``. A unit that is over a budget on its own runs alone; a shared group
    over a budget is split into sub-groups that fit (each encodes the prefix again); a sub-group of one
    row is scored as a plain sample (no expansion).
    """
    max_kv_tokens = max_batch_tokens if max_kv_tokens is None else max_kv_tokens
    plans: list[BatchPlan] = []
    current = BatchPlan()
    for unit in _split_oversized(units, max_batch_tokens, max_batch_size, max_kv_tokens):
        padded, rows = current.padded_with(unit)
        over = padded > max_batch_tokens or rows > max_batch_size or current.kv_tokens_with(unit) > max_kv_tokens
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
        return padded > max_batch_tokens or rows > max_batch_size or BatchPlan().kv_tokens_with(unit) > max_kv_tokens

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
