"""Where offline scores come from: an engine over a model loaded here (the default), a named pool on
a Ray cluster, or any object with the engine's ``submit`` that the caller passes in."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from concurrent.futures import Future
from typing import Any, Iterator, Sequence

logger = logging.getLogger(__name__)

def load_model(model: str, *, base_dir: str | None = None, **model_options: Any):
    """``named_models.load`` (a hub id, a folder or a built-in name), with relative image paths read from ``base_dir`` (the data's
    folder) and local images allowed from there and the current folder unless told otherwise."""
    import os

    from .. import named_models

    if base_dir is not None:
        model_options.setdefault("image_roots", [base_dir, os.getcwd()])
    rm = named_models.load(model, **model_options)
    if base_dir is not None:
        rm.encoder.policy = dataclasses.replace(rm.encoder.policy, base_dir=base_dir)
    return rm


@contextlib.contextmanager
def open_scorer(
    *,
    model: str | None = None,
    pool: str | None = None,
    scorer: Any = None,
    base_dir: str | None = None,
    model_options: dict | None = None,
    engine_options: dict | None = None,
    address: str | None = None,
) -> Iterator[Any]:
    """Yield something with ``submit(samples, on_invalid=...) -> Future``: ``scorer`` as given (left
    open), a named RewardPool (detached at the end), or a RewardEngine over ``model`` (closed at the
    end). Exactly one of the three."""
    if sum(x is not None for x in (model, pool, scorer)) != 1:
        raise ValueError("give exactly one of model=, pool= or scorer=")
    if scorer is not None:
        yield scorer
    elif pool is not None:
        from ..serving.pool import RewardPool

        handle = RewardPool.connect(pool, address=address) if address else RewardPool.connect(pool)
        try:
            yield handle
        finally:
            handle.close()
    else:
        from ..engine import RewardEngine

        rm = load_model(model, base_dir=base_dir, **(model_options or {}))
        with RewardEngine(rm, **(engine_options or {})) as engine:
            yield engine


def submit(scorer: Any, samples: Sequence[Any]) -> Future:
    """Queue samples; bad samples are reported per sample (see ``settle``)."""
    return scorer.submit(list(samples), on_invalid="raise")


def settle(future: Future) -> tuple[list, dict[int, str]]:
    """(scores, errors) of a submitted request: a bad sample gets None and its reason in ``errors``;
    a system failure (ScoringError and anything else) propagates."""
    from ..errors import InvalidSampleError

    try:
        return list(future.result()), {}
    except InvalidSampleError as e:
        if e.scores is None:  # nothing was scored: the caller's request as a whole was refused
            raise
        return list(e.scores), dict(e.errors)


def score_with_errors(scorer: Any, samples: Sequence[Any]) -> tuple[list, dict[int, str]]:
    """Score ``samples`` through ``scorer``; see ``settle``."""
    return settle(submit(scorer, samples))
