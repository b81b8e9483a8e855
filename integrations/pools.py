"""The reward pool of an adapter, from its options: one ``PoolConfig`` (``rewardplug.serving.config``).

Every adapter (TRL, verl, OpenRLHF, RLlib) takes ``pool=``: a ``PoolConfig`` (the pool it describes,
found or made on the cluster) or a running ``RewardPool`` (used as is). Options that arrive as keywords
or from a config file (TRL's ``**options``, verl's ``pool_options``, OpenRLHF's
``REWARDPLUG_POOL_OPTIONS``) become a PoolConfig in one place, ``PoolConfig.from_kwargs``, which splits
them into pool, model and engine options and names every unknown one in a single TypeError. A name
alone attaches to a running pool (``connect_pool``), which takes only this handle's own options.
"""

from __future__ import annotations

from dataclasses import MISSING, fields
from typing import Any

from ..serving.config import HANDLE_FIELDS, PoolConfig

POOL_FIELDS = frozenset(f.name for f in fields(PoolConfig))
# What a handle attaching to a running pool may set: the rest was fixed when the pool was made.
CONNECT_OPTIONS = tuple(k for k in HANDLE_FIELDS if k not in ("name", "address"))


def open_pool(pool: Any) -> Any:
    """A RewardPool from ``pool``: a PoolConfig's pool (get-or-create by its name; without a name a
    private pool, removed with this handle), or a running RewardPool as it is."""
    from ..serving.pool import RewardPool

    if isinstance(pool, RewardPool):
        return pool
    if isinstance(pool, PoolConfig):
        return RewardPool(config=pool)
    raise TypeError(f"pool must be a rewardplug PoolConfig or a running RewardPool, got {type(pool).__name__}")


def connect_options(name: str, options: dict | None) -> dict:
    """``options`` for attaching to the running pool ``name``: only this handle's own
    (``CONNECT_OPTIONS``); the others describe a pool to make, which needs its model (a TypeError)."""
    options = dict(options or {})
    refused = sorted(set(options) - set(CONNECT_OPTIONS))
    if refused:
        raise TypeError(f"pool options {refused} describe a pool to make, which needs its model; attaching to the "
                        f"running pool {name!r} takes only {list(CONNECT_OPTIONS)}")  # fmt: skip
    return options


def connect_pool(name: str, *, address: str | None = None, options: dict | None = None) -> Any:
    """Attach to the running pool ``name`` with this handle's ``options`` (``connect_options``)."""
    from ..serving.pool import RewardPool

    return RewardPool.connect(name, address=address, **connect_options(name, options))


def config_options(config: PoolConfig) -> dict:
    """``config`` as the keywords a caller would pass for it (what TRL's default pool name hashes): the
    fields other than model and name that differ from their defaults, the model and engine options
    spread among them, except one whose name is also a pool field (the engine's ``busy``)."""
    out: dict[str, Any] = {}
    for f in fields(PoolConfig):
        if f.name in ("model", "name", "model_options", "engine_options"):
            continue
        value = getattr(config, f.name)
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        if value != default:
            out[f.name] = value
    for key in ("model_options", "engine_options"):
        options = getattr(config, key)
        out.update({k: v for k, v in options.items() if k not in POOL_FIELDS})
        clashing = {k: v for k, v in options.items() if k in POOL_FIELDS}  # engine's busy: kept apart
        if clashing:
            out[key] = clashing
    return out
