"""Qwen2-VL / Qwen2.5-VL with a sequence-classification ``score`` head instead of a value head file.

transformers 5 has no ``Qwen2_5_VLForSequenceClassification``; such checkpoints hold the backbone's
weights and ``score.weight`` [1, hidden] (no bias), with the class named in ``architectures``. Scores
are what ``GenericForSequenceClassification`` (the class transformers builds every text model's
``*ForSequenceClassification`` from) computes over this backbone: the ``score`` linear in the model's
dtype on the last hidden state, at the last token that is not ``config.pad_token_id``
(``rewardplug.testing.vision_seq_cls_class`` composes that class for tests). Everything else (images,
positions, prefix sharing) is the value-head model's.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from ..checkpoint import _main_head_tensors
from ..encoding import EncodedSample
from ..errors import CheckpointError
from ..model import RewardModel


class ScoreHeadVisionModel(RewardModel):
    """A Qwen2-VL / Qwen2.5-VL sequence classifier with one label, scored as its class pools."""

    @classmethod
    def _read_head(cls, folder, value_head: str | None, hidden: int) -> tuple[torch.Tensor, None]:
        tensors = _main_head_tensors(folder)
        weight = tensors.get("score.weight")
        if weight is None or tuple(weight.shape) != (1, hidden):
            found = {k: list(v.shape) for k, v in tensors.items()} or "no head keys"
            raise CheckpointError(
                f"{str(folder)!r}: expected 'score.weight' [1, {hidden}] in the main weights; found {found}"
            )
        return weight.clone(), None

    @classmethod
    def _make_head(cls, weight, bias, hidden: int, dtype: torch.dtype, device) -> nn.Linear:
        """``score``: a linear without bias in the model's dtype, as the class has it."""
        head = nn.Linear(hidden, 1, bias=False, dtype=dtype, device=device)
        if weight is not None:
            with torch.no_grad():
                head.weight.copy_(weight)
        return head.eval()

    @property
    def pool_pad_token_id(self) -> int | None:
        return self.backbone.config.get_text_config().pad_token_id

    def encode(self, sample: Any) -> EncodedSample:
        return drop_trailing_pad(super().encode(sample), self.pool_pad_token_id)

    def encode_many(self, samples: Sequence[Any]) -> tuple[list[EncodedSample | None], dict[int, str]]:
        encoded, errors = super().encode_many(samples)
        pad = self.pool_pad_token_id
        return [None if e is None else drop_trailing_pad(e, pad) for e in encoded], errors


def drop_trailing_pad(encoded: EncodedSample, pad: int | None) -> EncodedSample:
    """The sample up to the token its class pools at: the last one that is not ``pad`` (a causal model's
    hidden state there does not depend on what follows)."""
    ids = encoded.input_ids
    if pad is None or int(ids[-1]) != pad:
        return encoded
    keep = (ids != pad).nonzero()
    end = int(keep[-1]) + 1 if len(keep) else 1
    return EncodedSample(
        input_ids=ids[:end],
        mm_token_type_ids=encoded.mm_token_type_ids[:end],
        pixels=encoded.pixels,
        image_grid_thw=encoded.image_grid_thw,
        image_digests=list(encoded.image_digests),
        position_ids=None if encoded.position_ids is None else encoded.position_ids[:, :end],
    )
