"""The pool directory: one detached Ray actor per cluster that knows every named pool.

It does what Serve does not: a get-or-create that many processes may race (``claim`` runs one call at
a time, so exactly one caller creates a pool and the others attach or learn that the options differ),
and each replica's latest figures (reported on Serve's routing-stats and health-check calls), read by
``RewardPool.stats()`` and ``rewardplug pool status``. Bounded: one entry per pool, one report per
live replica; reports older than ``STALE_S`` are dropped.
"""

from __future__ import annotations

import time
from typing import Any

NAMESPACE = "rewardplug"
ACTOR_NAME = "rewardplug-directory"
STALE_S = 60.0


class PoolDirectory:
    def __init__(self):
        self.pools: dict[str, dict[str, Any]] = {}

    def claim(self, name: str, request: dict) -> dict:
        """First caller for ``name`` gets role "create"; later ones "attach" with the pool's identity
        (``request``: the options callers compare)."""
        entry = self.pools.get(name)
        if entry is None or entry["state"] == "failed":
            self.pools[name] = {"request": request, "state": "deploying", "error": None, "replicas": {}}
            return {"role": "create"}
        return {"role": "attach", "request": entry["request"], "state": entry["state"], "error": entry["error"]}

    def set_state(self, name: str, state: str, error: str | None = None) -> None:
        if name in self.pools:
            self.pools[name].update(state=state, error=error)

    def get(self, name: str) -> dict | None:
        entry = self.pools.get(name)
        if entry is None:
            return None
        return {k: v for k, v in entry.items() if k != "replicas"}

    def remove(self, name: str) -> bool:
        return self.pools.pop(name, None) is not None

    def names(self) -> list[str]:
        return sorted(self.pools)

    def report(self, name: str, replica: str, info: dict) -> None:
        entry = self.pools.get(name)
        if entry is not None:
            entry["replicas"][replica] = {**info, "reported_at": time.time()}

    def replicas(self, name: str) -> dict[str, dict]:
        entry = self.pools.get(name)
        if entry is None:
            return {}
        now = time.time()
        for key in [k for k, r in entry["replicas"].items() if now - r["reported_at"] > STALE_S]:
            del entry["replicas"][key]
        return {k: {**r, "age_s": now - r["reported_at"]} for k, r in entry["replicas"].items()}


def directory():
    """The cluster's directory actor (created on first use, lives as long as the cluster)."""
    import ray

    return (
        ray.remote(PoolDirectory)
        .options(name=ACTOR_NAME, namespace=NAMESPACE, lifetime="detached", get_if_exists=True, num_cpus=0,
                 max_restarts=-1)  # fmt: skip
        .remote()
    )
