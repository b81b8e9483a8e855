"""PoolConfig: every option of a reward pool in one dataclass, used by ``RewardPool``, the CLI
(``rewardplug pool start``, ``rewardplug serve``) and the trainer adapters.

Two kinds of fields: the pool's identity (what its replicas are built from and how they are placed;
two processes asking for one name must agree on these) and per-handle behavior (``HANDLE_FIELDS``:
how this process waits, splits and times out; free to differ between processes).

Admission, one bound: a replica holds at most ``max_ongoing_requests`` parts (Serve enforces it, for
every sender and door); more parts wait in Serve's router queue. A handle keeps at most
``max_pending_samples`` samples unanswered; beyond that ``submit`` waits (``busy="wait"``) or raises
PoolBusyError (``busy="raise"``).
"""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from .http import HttpSettings

DEFAULT_PART_SAMPLES = 64  # samples per call to a replica: small enough to spread, big enough to batch

HANDLE_FIELDS = ("busy", "request_timeout_s", "hedge_after_s", "part_samples", "max_pending_samples",
                 "ready_timeout_s", "address", "name")  # fmt: skip


@dataclass(frozen=True)
class PoolConfig:
    """Options of a reward pool.

    model: hub id or checkpoint folder (readable from every node).
    name: a pool shared by every process of the cluster that uses the name (get-or-create); None: a
        private pool removed with the handle that made it.
    address: an existing Ray cluster ("ray://host:10001", "host:6379"); None: the cluster this process
        is connected to, else ``ray.init()``'s choice, as "auto": RAY_ADDRESS, else the last ``ray start``
        cluster of this machine (maybe another job's), else a new local one (which ends with this
        process). "local": always a new local one (docs/troubleshooting.md).
    num_replicas: default one per GPU the cluster has free (``gpus_per_replica`` each), 1 without GPUs.
    gpus_per_replica: 1; >1 splits one replica over that many GPUs of one node (balanced device map);
        a fraction (0.5) shares a GPU with a trainer (set num_replicas too: the default puts 1/0.5 = 2
        copies on each GPU); 0 runs on CPUs.
    placement: "pack" (Serve's default) or "spread" (at most one replica per node).
    max_ongoing_requests, max_pending_samples, busy: admission (above).
    request_timeout_s: a request not answered by then fails with PoolTimeoutError naming the replicas.
    hedge_after_s: a part waiting this long is sent again (to another replica if its own is stalled).
    autoscale: None (fixed size) or (min_replicas, max_replicas): Serve scales on ongoing parts.
    http_port, http_host, http: the HTTP door (its HttpSettings: API key, limits, roots); without a
        port no HTTP proxy is started.
    part_samples: samples per call to a replica (a prompt group larger than this is cut).
    runtime_env: Ray runtime environment of the replicas (env vars such as HF_HOME, pip packages).
    model_options, engine_options: RewardModel.from_pretrained and RewardEngine options.
    """

    model: str
    name: str | None = None
    address: str | None = None
    num_replicas: int | None = None
    gpus_per_replica: float = 1
    cpus_per_replica: float = 1
    placement: str = "pack"
    max_ongoing_requests: int = 8
    request_timeout_s: float = 600.0
    hedge_after_s: float = 30.0
    busy: str = "wait"
    ready_timeout_s: float = 600.0
    autoscale: tuple[int, int] | None = None
    http_port: int | None = None
    http_host: str = "127.0.0.1"
    http: HttpSettings = field(default_factory=HttpSettings)
    part_samples: int = DEFAULT_PART_SAMPLES
    max_pending_samples: int = 65536
    runtime_env: dict | None = None
    model_options: dict = field(default_factory=dict)
    engine_options: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.placement not in ("pack", "spread"):
            raise ValueError(f"placement must be 'pack' or 'spread', got {self.placement!r}")
        if self.busy not in ("wait", "raise"):
            raise ValueError(f"busy must be 'wait' or 'raise', got {self.busy!r}")
        a = self.autoscale
        if a is not None and not (len(a) == 2 and 0 <= a[0] <= a[1] and a[1] > 0):
            raise ValueError(f"autoscale must be (min_replicas, max_replicas) with 0 <= min <= max, got {a!r}")
        if not (0 < self.request_timeout_s < float("inf")):
            raise ValueError(f"request_timeout_s must be a positive finite number of seconds, got {self.request_timeout_s!r}")
        if not (0 < self.hedge_after_s):
            raise ValueError(f"hedge_after_s must be positive, got {self.hedge_after_s!r}")
        if isinstance(self.http, dict):
            object.__setattr__(self, "http", HttpSettings(**self.http))
        if a is not None:
            object.__setattr__(self, "autoscale", tuple(a))

    @classmethod
    def from_kwargs(cls, model: Any, **kwargs: Any) -> "PoolConfig":
        """RewardPool's keyword arguments: pool fields by name, the rest split into model options
        (``RewardModel.from_pretrained``) and engine options (``RewardEngine``)."""
        own = {f.name for f in fields(cls)}
        if "max_inflight_per_replica" in kwargs:
            raise TypeError("max_inflight_per_replica was replaced by max_ongoing_requests: parts (of at most "
                            "part_samples samples) one replica holds at once")  # fmt: skip
        from ..named_models import RANDOM_7B

        pool = {k: v for k, v in kwargs.items() if k in own}
        given_model, given_engine = pool.pop("model_options", {}), pool.pop("engine_options", {})
        random_7b = {k: kwargs.pop(k) for k in ("layers", "seed") if str(model) == RANDOM_7B and k in kwargs}
        model_options, engine_options = split_options({k: v for k, v in kwargs.items() if k not in own})
        return cls(model=str(model), **pool, model_options={**given_model, **random_7b, **model_options},
                   engine_options={**given_engine, **engine_options})  # fmt: skip

    def with_(self, **changes: Any) -> "PoolConfig":
        return replace(self, **changes)

    def identity(self) -> dict:
        """What two processes sharing the pool must agree on (the API key only as present or not)."""
        out = {k: v for k, v in asdict(self).items() if k not in HANDLE_FIELDS}
        out["autoscale"] = list(self.autoscale) if self.autoscale else None
        if out["http"].get("api_key"):
            out["http"] = {**out["http"], "api_key": "<set>"}
        return out


def split_options(options: dict) -> tuple[dict, dict]:
    """Model options and engine options of a RewardPool call; unknown names are a TypeError."""
    from ..engine import RewardEngine
    from ..model import RewardModel

    model_keys = set(inspect.signature(RewardModel.from_pretrained).parameters) - {"name_or_path", "cls"}
    engine_keys = set(inspect.signature(RewardEngine.__init__).parameters) - {"self", "model", "on_invalid"}
    unknown = set(options) - model_keys - engine_keys
    if unknown:
        raise TypeError(f"unknown RewardPool options {sorted(unknown)}; "
                        f"model options: {sorted(model_keys)}; engine options: {sorted(engine_keys)}")  # fmt: skip
    return ({k: v for k, v in options.items() if k in model_keys}, {k: v for k, v in options.items() if k in engine_keys})
