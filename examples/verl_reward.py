"""Synchronous verl custom reward functions that score rollouts with a rewardplug HTTP service.

For verl 0.9 (rewards computed in ``verl.experimental.reward_loop``) prefer rewardplug's own doors in
``rewardplug.integrations.verl`` (see docs/verl.md and examples/verl_grpo_vl.sh):

- the reward manager, which reads each rollout's raw prompt messages and images itself and batches a
  worker's concurrent items into one request (a GRPO group together)::

      reward.reward_manager.source=importlib \\
      reward.reward_manager.module.path=pkg://rewardplug.integrations.verl \\
      reward.reward_manager.name=RewardPlugManager \\
      +reward.rewardplug.url=http://rm-host:8000     # or +reward.rewardplug.model=... +reward.rewardplug.pool_name=...

- or its ``async`` compute_score for verl's naive manager (awaited on the worker's loop, no thread per
  sample)::

      reward.custom_reward_function.path=pkg://rewardplug.integrations.verl \\
      reward.custom_reward_function.name=compute_score \\
      +reward.custom_reward_function.reward_kwargs.url=http://rm-host:8000

verl 0.9's reward loop has no ``batch`` reward manager (its registry holds naive, dapo, gdpo, limited and
remote), so ``compute_score_batch`` below only serves older verl releases that still have
``reward_model.reward_manager=batch``. ``compute_score`` here is the blocking per-sample form: verl 0.9 runs
it in a thread per sample.

Start the service where the reward model's GPU is (loopback by default; give it a key when it listens
on another address):

    REWARDPLUG_API_KEY=secret rewardplug serve --model Skywork/Skywork-VL-Reward-7B --host 0.0.0.0

and point verl at this file:

    reward.custom_reward_function.path=examples/verl_reward.py \\
    reward.custom_reward_function.name=compute_score

The service's address and key come from the environment of the processes that run the reward function:

    export REWARDPLUG_URL=http://rm-host:8000 REWARDPLUG_API_KEY=secret

or from ``+reward.custom_reward_function.reward_kwargs.url=...`` / ``...reward_kwargs.api_key=...``.

What is scored: the reward model sees [user(images, question), assistant(solution_str)]. verl hands the
reward function only ``data_source``, ``solution_str`` (the decoded response), ``ground_truth`` and the
row's ``extra_info`` dict, so put the question and the images in ``extra_info`` when you preprocess the
dataset (as verl's geo3k example does for the question):

    "extra_info": {"question": problem, "images": [{"bytes": png_bytes}]}   # or paths, or data URIs

Images may be ``{"bytes": ...}`` dicts (what parquet datasets hold), PIL images, raw bytes, data URIs,
or local paths. A path that exists on this machine is read here and sent inline, so the service does
not need to see the trainer's disk; set REWARDPLUG_SEND_PATHS=1 to send paths as they are instead (for a
service started with ``--image-root`` on shared storage). ``ground_truth`` is not used by the reward
model; mix in a rule-based score yourself if you have one.

A sample the service cannot score (no image where the question has one, an unreadable image, ...)
follows ``on_invalid``, the same option and default as in every adapter (docs/scores.md): "raise"
(default) raises rewardplug.InvalidSampleError naming it; a float (``reward_kwargs.on_invalid=-10``, or
REWARDPLUG_ON_INVALID=-10) gives such samples that score instead. "none" is refused: verl has no
per-sample mask for a reward. REWARDPLUG_INVALID_SCORE is the old spelling (DeprecationWarning).
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from typing import Any, Sequence

logger = logging.getLogger(__name__)

_clients: dict[tuple[str, str | None], Any] = {}
_lock = threading.Lock()

QUESTION_KEYS = ("question", "prompt", "problem", "query")


def _client(url: str | None, api_key: str | None):
    """One RewardClient per (url, key) and process: verl calls the function many times."""
    from rewardplug.serving.client import RewardClient

    url = url or os.environ.get("REWARDPLUG_URL", "http://127.0.0.1:8000")
    api_key = api_key if api_key is not None else os.environ.get("REWARDPLUG_API_KEY")
    with _lock:
        if (url, api_key) not in _clients:
            _clients[(url, api_key)] = RewardClient(url, api_key=api_key)
        return _clients[(url, api_key)]


def _image(source: Any) -> Any:
    """What goes over the wire for one image: bytes for local files (unless REWARDPLUG_SEND_PATHS)."""
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if isinstance(source, dict) and source.get("bytes") is None and source.get("path"):
        source = source["path"]
    if isinstance(source, str) and not os.environ.get("REWARDPLUG_SEND_PATHS"):
        path = source[len("file://"):] if source.startswith("file://") else source
        if "://" not in path[:16] and not path.startswith("data:") and os.path.isfile(path):
            with open(path, "rb") as f:
                return f.read()
    return source  # dict with bytes, PIL image, bytes, data URI: RewardClient turns them into data URIs


def _sample(solution_str: str, extra_info: dict | None) -> dict:
    info = extra_info or {}
    question = next((info[k] for k in QUESTION_KEYS if isinstance(info.get(k), str)), "")
    images = info.get("images", info.get("image"))
    if images is None:
        images = []
    elif not isinstance(images, list | tuple) and not hasattr(images, "tolist"):
        images = [images]
    return {"prompt": question, "completion": solution_str, "images": [_image(im) for im in list(images)]}


def _on_invalid(value: Any) -> str | float:
    """``on_invalid`` from the call, else REWARDPLUG_ON_INVALID, else the old REWARDPLUG_INVALID_SCORE."""
    from rewardplug.integrations.on_invalid import DEFAULT, parse_on_invalid
    from rewardplug.integrations.verl import NO_MASK

    if value is None:
        value = os.environ.get("REWARDPLUG_ON_INVALID")
    if value is None and os.environ.get("REWARDPLUG_INVALID_SCORE") is not None:
        warnings.warn("REWARDPLUG_INVALID_SCORE is deprecated: use REWARDPLUG_ON_INVALID=<float>", DeprecationWarning,
                      stacklevel=3)  # fmt: skip
        value = os.environ["REWARDPLUG_INVALID_SCORE"]
    return parse_on_invalid(DEFAULT if value is None else value, none_refused=NO_MASK)


def _score(samples: list[dict], url: str | None, api_key: str | None, on_invalid: Any = None,
           chunk: int = 256) -> list[float]:  # fmt: skip
    from rewardplug.errors import InvalidSampleError

    policy = _on_invalid(on_invalid)
    client = _client(url, api_key)
    out: list[float] = []
    for start in range(0, len(samples), chunk):
        part = samples[start : start + chunk]
        try:
            scores = client.score(part)
        except InvalidSampleError as e:
            if policy == "raise":
                raise
            logger.warning("rewardplug could not score %d samples (reward %s): %s", len(e.errors), policy, e)
            scores = client.score(part, on_invalid="none")
        out += [float(policy) if s is None else float(s) for s in scores]
    return out


def compute_score(data_source: str, solution_str: str, ground_truth: Any, extra_info: dict | None = None,
                  *, url: str | None = None, api_key: str | None = None, on_invalid: Any = None,
                  **kwargs: Any) -> float:  # fmt: skip
    """verl's per-sample reward function: the reward model's score of ``solution_str``."""
    return _score([_sample(solution_str, extra_info)], url, api_key, on_invalid)[0]


def compute_score_batch(data_sources: Sequence[str], solution_strs: Sequence[str], ground_truths: Sequence[Any],
                        extra_infos: Sequence[dict | None] | None = None, *, url: str | None = None,
                        api_key: str | None = None, on_invalid: Any = None, **kwargs: Any) -> list[float]:  # fmt: skip
    """Older verl's batched reward function (``reward_model.reward_manager=batch``; verl 0.9 has no batch
    manager): one score per response, in order.

    verl passes numpy object arrays; any sequence works."""
    solution_strs = list(solution_strs)
    extra_infos = list(extra_infos) if extra_infos is not None else [None] * len(solution_strs)
    if len(extra_infos) != len(solution_strs):
        raise ValueError(f"{len(solution_strs)} responses but {len(extra_infos)} extra_infos")
    return _score([_sample(s, e) for s, e in zip(solution_strs, extra_infos)], url, api_key, on_invalid)


if __name__ == "__main__":  # a quick check against a running service
    import sys

    from PIL import Image

    im = Image.new("RGB", (84, 56), (30, 60, 200))
    info = {"question": "What color is the picture?", "images": [im]}
    print("compute_score:", compute_score("demo", "It is blue.", "blue", info))
    print("compute_score_batch:", compute_score_batch(["demo"] * 2, ["It is blue.", "It is red."], ["blue"] * 2,
                                                      [info, info]))  # fmt: skip
    sys.exit(0)
