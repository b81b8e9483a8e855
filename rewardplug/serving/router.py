"""Serve request router of the pool: prompt-group affinity, else least outstanding tokens.

Each call carries ``route_key`` (a content digest of its prompt group), ``tokens`` (its estimated cost)
and ``sender`` (this process, ``SENDER``) as keyword arguments. The preferred replica of a key is chosen
by rendezvous hashing over the live replicas' ids, so every process (every trainer rank) prefers the
same replica for the same group without sharing any state, and a replica that leaves moves only its
own keys. The preference holds while that replica is not overloaded: its outstanding tokens exceed the
least loaded replica's by at most ``imbalance_tokens`` (default 2048, about what a group's cached image
and prompt save). Otherwise the request goes to the least loaded replica: a bigger gap costs more time
than the cache hits save. Requests without a key (HTTP requests) go by least outstanding tokens.

A replica's outstanding tokens, as this router sees them: what this process has sent it and not yet
got back (counted when the router chooses, so a burst of parts sent at once spreads, and released by
the pool handle when a part's answer arrives: ``part_done``), plus what the replica last reported
holding for other senders (Serve's routing stats, about once a second). A replica's report of this
process's own tokens is never used: after a burst it is stale, and it would send the whole next burst
to the other replicas.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from typing import Any

from ray.serve.request_router import FIFOMixin, PendingRequest, ReplicaID, RequestRouter, RunningReplica


SENDER = f"{socket.gethostname()}:{os.getpid()}"  # this process, as replicas count their senders

# This process's parts in flight (shared by its routers: handles of one pool on several event loops).
_lock = threading.Lock()
_parts: dict[str, tuple[str, int]] = {}  # part id -> (replica id, tokens)
_tokens: dict[str, int] = {}  # replica id -> tokens of this process's parts in flight there


def part_sent(part_id: str, replica_id: str, tokens: int) -> None:
    with _lock:
        _forget(part_id)  # chosen again (Serve retried the choice): counted once, where it goes now
        _parts[part_id] = (replica_id, tokens)
        _tokens[replica_id] = _tokens.get(replica_id, 0) + tokens


def part_done(part_id: str) -> None:
    """The part's answer (or failure) arrived: it no longer loads its replica. Idempotent."""
    with _lock:
        _forget(part_id)


def _forget(part_id: str) -> None:
    sent = _parts.pop(part_id, None)
    if sent is not None:
        left = _tokens.get(sent[0], 0) - sent[1]
        if left > 0:
            _tokens[sent[0]] = left
        else:
            _tokens.pop(sent[0], None)


def own_tokens(replica_id: str) -> int:
    with _lock:
        return _tokens.get(replica_id, 0)


def _weight(key: str, replica_id: Any) -> int:
    return int.from_bytes(hashlib.blake2b(f"{key}|{replica_id}".encode(), digest_size=8).digest(), "big")


class PromptGroupRouter(FIFOMixin, RequestRouter):
    def initialize_state(self, imbalance_tokens: int = 2048, **kwargs) -> None:
        self.imbalance_tokens = imbalance_tokens
        self._part_of: dict[str, str] = {}  # Serve's request id -> our part id (released on completion)

    def _load(self, replica: RunningReplica) -> int:
        stats = replica.routing_stats or {}
        others = sum(v for sender, v in (stats.get("outstanding_by_sender") or {}).items() if sender != SENDER)
        return int(others) + own_tokens(replica.replica_id.unique_id)

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        kwargs = pending_request.kwargs if pending_request is not None else {}
        key = kwargs.get("route_key")
        by_load = sorted(candidate_replicas, key=self._load)
        ranks = [[r] for r in by_load]
        if key:
            preferred = max(candidate_replicas, key=lambda r: _weight(key, r.replica_id.unique_id))
            if self._load(preferred) - self._load(by_load[0]) <= self.imbalance_tokens:
                ranks = [[preferred], [r for r in by_load if r is not preferred]]
        if pending_request is not None:
            self._count(pending_request, ranks[0][0].replica_id)
        return ranks

    def _count(self, pending_request: PendingRequest, replica_id: ReplicaID) -> None:
        """Count a request on the replica it goes to, from the moment it is chosen."""
        request_id = pending_request.metadata.internal_request_id
        part_id = pending_request.kwargs.get("part") or request_id
        self._part_of[request_id] = part_id
        part_sent(part_id, replica_id.unique_id, int(pending_request.kwargs.get("tokens") or 0))

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        self._count(pending_request, replica_id)  # where Serve sent it (called only with strict rejection)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        part_id = self._part_of.pop(internal_request_id, None)
        if part_id is not None:
            part_done(part_id)
