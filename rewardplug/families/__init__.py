"""Reward-model families: what the engine needs from a model, one implementation per family.

``ScoringModel`` is the protocol (encode, vision features if any, a full pass, prefix and suffix passes
over a key/value cache, the head); ``RewardModel.from_pretrained`` picks the implementation from what
the checkpoint holds (``rewardplug.checkpoint.detect_checkpoint``):

  value_head      RewardModel            Qwen2-VL / Qwen2.5-VL + value_head.safetensors (Skywork-VL-Reward)
  vision_seq_cls  ScoreHeadVisionModel   the same backbone with a sequence-classification ``score`` head
  text_seq_cls    TextRewardModel        text *ForSequenceClassification, num_labels == 1 (Llama, Qwen2,
                                         Qwen3, Gemma 2)

Imports the model layer and below (encoding, checkpoint, errors); never the engine or serving.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .protocol import ScoringModel

if TYPE_CHECKING:
    from ..checkpoint import CheckpointKind

__all__ = ["ScoringModel", "model_class"]


def model_class(found: "CheckpointKind") -> type:
    """The class that loads and scores a checkpoint of this kind."""
    if found.kind == "value_head":
        from ..model import RewardModel

        return RewardModel
    if found.kind == "vision_seq_cls":
        from .vision_score import ScoreHeadVisionModel

        return ScoreHeadVisionModel
    if found.kind == "text_seq_cls":
        from .text import TextRewardModel

        return TextRewardModel
    raise ValueError(f"no model class for checkpoint kind {found.kind!r}")
