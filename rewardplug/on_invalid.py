"""``on_invalid``: what a bad sample becomes in a trainer. One option, one default, the same values in
every adapter (TRL, verl, OpenRLHF, RLlib) and at the HTTP door's ``/get_reward``; docs/scores.md says
why. It lives in the core so the serving layer can use it; ``rewardplug.integrations.on_invalid``
re-exports it for the adapters.

A bad sample is ``InvalidSampleError``'s kind (an unreadable image, a sample over ``max_length``, a
label with fewer images than the prompt shows): the sample's problem, named with its reason. A system
failure (``ScoringError``) is never governed by this option: it always fails the step.

- ``"raise"`` (the default everywhere, as for ``RewardModel.score``): the step fails with
  ``InvalidSampleError`` naming each bad sample and its reason.
- ``"none"``: the reward model gives that sample no reward, and the framework's own meaning of "no
  reward" applies: TRL masks the row (None becomes NaN; next to other reward functions it counts as 0),
  RLlib keeps the environment's reward. verl and OpenRLHF (so ``/get_reward`` too) have no such meaning
  (verl's GRPO takes each group's ``torch.mean``/``torch.std``, OpenRLHF's ``group_norm``
  ``rewards.mean(-1)``, so one NaN makes every advantage of its group NaN, and a None fails the step),
  so they refuse ``"none"``.
- a finite float: that fixed reward, returned as is (not normalized, not clipped).
"""

from __future__ import annotations

import math
from typing import Any

RAISE = "raise"
NONE = "none"
DEFAULT = RAISE
WORDS = (RAISE, NONE)


def parse_on_invalid(value: Any, *, where: str = "on_invalid", none_refused: str | None = None) -> str | float:
    """``"raise"``, ``"none"`` or a finite float, from a value or its text (an environment variable, a
    hydra override). ``none_refused``: why this framework cannot take ``"none"`` (then it is refused)."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text in WORDS:
            value = text
        else:
            try:
                value = float(text)
            except ValueError:
                raise ValueError(f"{where} must be 'raise', 'none' or a float reward, got {value!r}") from None
    if value == NONE and none_refused:
        raise ValueError(f"{where}='none' is not available here: {none_refused}. Use 'raise' (the default) or a "
                         "float reward for unscorable samples, below the scores you see (docs/scores.md)")  # fmt: skip
    if value in WORDS:
        return value
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    raise ValueError(f"{where} must be 'raise', 'none' or a finite float reward, got {value!r}")


def raise_hint(setting: str, masks: bool = True) -> str:
    """The line a failed step shows after the bad samples' reasons: what the user can choose instead.
    ``setting``: how this framework sets the option, with ``{}`` for the value (``"on_invalid={}"``)."""
    none = f", or {setting.format(repr(NONE))} to mask them" if masks else ""
    return (f"on_invalid is 'raise' (the default), so the step fails on a bad sample. Fix the data, or give "
            f"unscorable samples a reward with {setting.format('<float>')} (below the scores you see){none}; "
            "see docs/scores.md")  # fmt: skip
