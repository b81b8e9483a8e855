"""Serve request router of the pool: a prompt group's content key first, Serve's queue lengths second.

The pool handle sends each part with ``handle.options(session_id=<content key>)``. Its preferred replica
is chosen by rendezvous hashing of the key over the live replicas' ids, so every process (every trainer
rank) prefers the same replica for the same group without sharing state, and a replica that leaves
moves only its own keys. The preference holds while that replica's queue (Serve's own queue-length
figure: what this router sent it and has not seen complete, corrected by the replica's answers) is at
most ``imbalance`` requests longer than the shortest; otherwise two random replicas are drawn and the
shorter queue wins (power of two choices), as in Ray Serve LLM's prefix-aware router.

A replica is passed over while it looks stalled to this router: requests sent from here are
outstanding there and none has completed for ``stall_s`` (a hung device or host, a SIGSTOPped process). The pool re-sends
the parts that wait on it after its hedge delay, and they land elsewhere; Serve's health check removes
the replica later.

Admission: a replica refuses a part beyond ``max_parts`` (the pool's ``max_ongoing_requests``), and
``transport.send`` sends it again after a short backoff; the router only ranks (a group's preferred
replica while below ``max_parts``, else the shorter queue), never filters on its cached queue lengths.
Serve's own bound is ``max_parts`` plus ``CONTROL_SLOTS``, so control calls never wait behind parts: a
``session_id`` of ``replica:<id>`` reaches that replica only (stats, sleep/wake on every replica),
``replica:`` any one.

Each router belongs to one DeploymentHandle, so its state is per handle (no process-global registry).
"""

from __future__ import annotations

import hashlib
import random
import threading
import time
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

TO_REPLICA = "replica:"


def _weight(key: str, replica_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{key}|{replica_id}".encode(), digest_size=8).digest(), "big")


class ContentKeyRouter(RequestRouter):
    def initialize_state(self, imbalance: int = 2, stall_s: float = 30.0, max_parts: int = 8, **kwargs) -> None:
        self.imbalance = imbalance
        self.max_parts = max_parts
        self.stall_s = stall_s
        self._outstanding: dict[ReplicaID, int] = {}  # requests sent from here and not completed
        self._since: dict[ReplicaID, float] = {}  # when it last completed one, or got one while idle
        self._lock = threading.Lock()  # completion callbacks may run on another thread than routing

    def _stalled(self, replica: RunningReplica, now: float) -> bool:
        with self._lock:
            held = self._outstanding.get(replica.replica_id, 0)
            return held > 0 and now - self._since.get(replica.replica_id, now) > self.stall_s

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if pending_request is None:
            return [candidate_replicas]
        # No tiers here: when nothing below is free, Serve backs off before asking again (else it spins
        # on its routing loop, which every router of the process shares).
        pending_request.routing_context.should_backoff = True
        key = pending_request.metadata.session_id or ""
        if key.startswith(TO_REPLICA):
            target = key[len(TO_REPLICA):]
            return [[r for r in candidate_replicas if r.replica_id.unique_id == target or not target]]
        now = time.monotonic()
        healthy = [r for r in candidate_replicas if not self._stalled(r, now)] or candidate_replicas
        if len(healthy) <= 1:
            return [healthy]
        queue = {r.replica_id: self.replica_queue_len_cache.get(r.replica_id) or 0 for r in healthy}
        shortest = min(queue.values())
        if key:
            preferred = max(healthy, key=lambda r: _weight(key, r.replica_id.unique_id))
            if queue[preferred.replica_id] - shortest <= self.imbalance and queue[preferred.replica_id] < self.max_parts:
                return [[preferred], [r for r in healthy if r is not preferred]]
        return [random.sample(healthy, 2), healthy]

    def on_send_request(self, replica_id: ReplicaID) -> None:
        super().on_send_request(replica_id)  # Serve's queue-length figure
        with self._lock:
            held = self._outstanding.get(replica_id, 0)
            if held == 0:
                self._since[replica_id] = time.monotonic()
            self._outstanding[replica_id] = held + 1

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        with self._lock:
            if self._outstanding.get(replica_id, 0) > 0:
                self._outstanding[replica_id] -= 1
                self._since[replica_id] = time.monotonic()

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        with self._lock:
            self._outstanding.pop(replica_id, None)
            self._since.pop(replica_id, None)
