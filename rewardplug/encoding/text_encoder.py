"""Samples -> token ids for a text reward model, exactly as its own recipe and TRL compute them.

The recipe of a text ``*ForSequenceClassification`` reward model (Skywork-Reward-V2's card, TRL's
model reward path): ``tokenizer.apply_chat_template(messages, tokenize=False)`` over the conversation
(user turns, then the assistant's answer), then the tokenizer with ``add_special_tokens=False`` (the
template already writes any BOS). A text model sees no images: image items of a turn are left out and
its text items joined with newlines, so the same samples a vision-language run passes can be scored.

The model's class pools at the last token that is not the pad token (``config.pad_token_id``); the
encoder drops trailing pad tokens (a template that ends a turn with the pad token, as a Llama model
whose pad token is ``<|eot_id|>`` does), so a sample ends on its pooled token and a causal model's
hidden state there is unchanged. Positions are 0..L-1 (the form of ``EncodedSample.position_ids``,
three equal rows), so padding and prefix sharing never change them.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..errors import SampleError, ScoringError
from ..samples import Conversation, to_conversation
from .encoded import EncodedSample


@dataclass
class TextProcessor:
    """A text model's processor: its tokenizer (the engine reads ``processor.tokenizer``)."""

    tokenizer: Any

    def apply_chat_template(self, messages: list[dict], **kwargs: Any) -> Any:
        return self.tokenizer.apply_chat_template(messages, **kwargs)


@dataclass
class TextEncoderCounters:
    samples: int = 0
    trailing_pad_dropped: int = 0  # samples whose template ended with pad tokens (pooled before them)

    def snapshot(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class TextEncoder:
    """Encodes samples with a text reward model's tokenizer and chat template.

    pool_pad_token_id: the model config's pad token, where its class pools (None: the last token).
    max_length: samples with more tokens are refused (a SampleError) instead of scored.
    A sample is checked by ``samples.to_conversation`` as for a vision model; its images are never
    read (a text model sees only the text: an image path need not exist, a URL is not fetched).
    """

    tokenizer: Any
    pool_pad_token_id: int | None = None
    max_length: int | None = None
    counters: TextEncoderCounters = field(default_factory=TextEncoderCounters)

    def __post_init__(self):
        self._lock = threading.Lock()
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template: a text reward model scores conversations")

    def encode(self, sample: Any) -> EncodedSample:
        encoded, errors = self.encode_many([sample])
        if errors:
            raise SampleError(errors[0])
        return encoded[0]

    def encode_many(self, samples: Sequence[Any]) -> tuple[list[EncodedSample | None], dict[int, str]]:
        """Encoded samples (None for a bad one) and ``{index: reason}``; anything that is not the sample's
        fault raises ScoringError."""
        out: list[EncodedSample | None] = []
        errors: dict[int, str] = {}
        for i, sample in enumerate(samples):
            try:
                out.append(self._encode(sample))
            except SampleError as e:
                out.append(None)
                errors[i] = str(e)
            except Exception as e:  # noqa: BLE001 - not the sample's fault: fail the request loudly
                raise ScoringError(f"encoding sample {i} failed: {type(e).__name__}: {e}") from e
        with self._lock:
            self.counters.samples += len(samples)
        return out, errors

    def _encode(self, sample: Any) -> EncodedSample:
        if isinstance(sample, dict) and "input_ids" in sample:
            raise SampleError(
                "a text reward model takes text samples (prompt/completion or messages): token ids of another "
                "model's tokenizer cannot be scored by its own tokenizer"
            )
        messages = text_messages(to_conversation(sample, None))
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        except Exception as e:  # jinja's TemplateError: the template refuses this conversation
            if type(e).__name__ in ("TemplateError", "TemplateSyntaxError", "UndefinedError"):
                raise SampleError(f"the chat template refuses this conversation: {e}") from None
            raise
        ids = self.tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        if not ids:
            raise SampleError("the conversation renders to no tokens")
        pad = self.pool_pad_token_id
        if pad is not None and ids[-1] == pad:
            end = len(ids)
            while end > 1 and ids[end - 1] == pad:
                end -= 1
            ids = ids[:end]  # all pad: the class pools at position 0, as here
            with self._lock:
                self.counters.trailing_pad_dropped += 1
        if self.max_length is not None and len(ids) > self.max_length:
            raise SampleError(f"sample has {len(ids)} tokens, over max_length={self.max_length}")
        ids_t = torch.tensor(ids, dtype=torch.long)
        return EncodedSample(
            input_ids=ids_t,
            mm_token_type_ids=torch.zeros_like(ids_t),
            position_ids=torch.arange(len(ids), dtype=torch.long).expand(3, -1),
        )


def text_messages(sample: Any) -> list[dict]:
    """A sample's conversation as plain-text chat messages ending with the assistant's answer.

    sample: ``samples.to_conversation``'s Conversation, or a sample it takes (then its shape is
    checked there: one validation, one set of messages for every family; its images are not read).
    Image items are left out and a turn's text items joined with newlines."""
    if not isinstance(sample, Conversation):
        sample = to_conversation(sample, None)
    return [{"role": m["role"], "content": _text(m["content"])} for m in sample.messages]


def _text(content: str | list[dict]) -> str:
    """A turn's text: to_conversation leaves content a string or a list of text items and image items
    (each image item normalized to ``type="image"``)."""
    if isinstance(content, str):
        return content
    return "\n".join(item["text"] for item in content if item.get("type") != "image")
