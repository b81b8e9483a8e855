"""Samples as users and trainers pass them, turned into one chat conversation each.

Accepted forms (plain dicts, or the ``Sample`` dataclass):

- ``{"messages": [...]}``: a whole conversation that ends with the assistant's answer. Content is a
  string or a list of items as qwen-vl-utils takes them (``{"type": "image", "image": src}``,
  ``{"type": "text", "text": ...}``). An optional ``"images"`` list fills ``{"type": "image"}``
  placeholders in order.
- ``{"prompt": str | messages, "completion": str | messages, "images": [...]}``: the way TRL passes
  them, standard (strings) or conversational (message lists). ``"image"`` (one) works too.

Images embedded in the messages win: the ``images`` column is used to fill placeholders, or, when the
messages hold no image at all, placed before the text of the first user turn (the model card's order).
TRL embeds the same images it also passes as a column, so they are not counted twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from .errors import SampleError
from .images import ImagePolicy, load_image


# Per-image size options qwen-vl-utils reads from an image item.
SIZE_KEYS = ("min_pixels", "max_pixels", "resized_height", "resized_width")


@dataclass
class Sample:
    """Typed form of a sample; ``to_dict()`` gives the plain dict form."""

    prompt: str | list[dict] | None = None
    completion: str | list[dict] | None = None
    images: list[Any] = field(default_factory=list)
    messages: list[dict] | None = None

    def to_dict(self) -> dict:
        if self.messages is not None:
            return {"messages": self.messages, "images": self.images}
        return {"prompt": self.prompt, "completion": self.completion, "images": self.images}


@dataclass
class Conversation:
    """One sample ready for the chat template: images decoded, in the order they appear."""

    messages: list[dict]
    images: list[Image.Image]
    sizes: list[dict] = field(default_factory=list)  # per image: qwen-vl-utils size keys given in its item


def to_conversation(sample: Any, policy: ImagePolicy | None) -> Conversation:
    """Normalize one sample; raise SampleError with the reason when it cannot be scored. Its images are
    read under ``policy``; with None they are placed but not read (a text model sees only the text)."""
    if isinstance(sample, Sample):
        sample = sample.to_dict()
    if not isinstance(sample, dict):
        raise SampleError(f"a sample must be a dict or rewardplug.Sample, got {type(sample).__name__}")
    column = _image_column(sample)

    if "messages" in sample:
        messages = _copy_messages(sample["messages"], "messages")
    elif "prompt" in sample or "completion" in sample:
        if sample.get("completion") is None:
            raise SampleError("sample has no 'completion' (the answer to score)")
        if sample.get("prompt") is None:
            raise SampleError("sample has no 'prompt'")
        messages = _prompt_messages(sample["prompt"]) + _completion_messages(sample["completion"])
    else:
        raise SampleError(f"sample needs 'messages', or 'prompt' and 'completion' (keys: {sorted(sample)})")

    if not messages:
        raise SampleError("the conversation is empty")
    if messages[-1]["role"] != "assistant":
        raise SampleError(
            f"the conversation must end with the assistant's answer; the last message has role "
            f"{messages[-1]['role']!r}"
        )
    _place_column_images(messages, column)
    images, sizes = [], []
    for item in _image_items(messages):
        if policy is not None:
            try:
                item["image"] = load_image(item["image"], policy)
            except SampleError as e:
                raise SampleError(f"image {len(images)}: {e}") from None
        images.append(item["image"])
        sizes.append({k: item[k] for k in SIZE_KEYS if k in item})
    return Conversation(messages, images, sizes)


def _image_column(sample: dict) -> list:
    images = sample.get("images")
    if images is None:
        images = sample.get("image")
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        return [im for im in images if im is not None]
    return [images]


def _prompt_messages(prompt: Any) -> list[dict]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return _copy_messages(prompt, "prompt")


def _completion_messages(completion: Any) -> list[dict]:
    if isinstance(completion, str):
        return [{"role": "assistant", "content": completion}]
    if isinstance(completion, dict):
        completion = [completion]
    messages = _copy_messages(completion, "completion")
    if not messages:
        raise SampleError("'completion' is an empty list of messages")
    return messages


ROLES = ("system", "user", "assistant")
ITEM_TYPES = ("text", "image", "image_url")


def _copy_messages(messages: Any, what: str) -> list[dict]:
    """Copy the caller's messages (never mutate them) and check their shape: known roles, content a
    string or a list of text and image items. Anything the chat template would silently drop (an audio
    item, an unknown role) is refused, naming the message and the item."""
    if not isinstance(messages, (list, tuple)):
        raise SampleError(f"'{what}' must be a string or a list of messages, got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise SampleError(f"'{what}' message {i} must be a dict with 'role' and 'content'")
        if not isinstance(m["role"], str) or m["role"] not in ROLES:
            raise SampleError(
                f"'{what}' message {i} has role {_short(m['role'])}; roles are 'system', 'user' and 'assistant'"
            )
        content = m["content"]
        if isinstance(content, (list, tuple)):
            content = [_check_item(item, f"'{what}' message {i} item {j}") for j, item in enumerate(content)]
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise SampleError(
                f"'{what}' message {i} content must be a string or a list of items, got {type(content).__name__}"
            )
        out.append({**m, "content": content})
    return out


def _check_item(item: Any, where: str) -> dict:
    """One content item, copied: a text item with a string, or an image item (source checked later)."""
    if isinstance(item, str):
        return {"type": "text", "text": item}
    if not isinstance(item, dict):
        raise SampleError(f"{where} must be a dict, got {type(item).__name__}")
    kind = item.get("type")
    if kind == "video" or "video" in item:
        raise SampleError(f"{where} holds a video; only images are supported")
    if kind is None:  # qwen-vl-utils style: the key says what it is
        kind = "image" if _is_image_item(item) else "text" if "text" in item else None
        if kind is None:
            raise SampleError(f"{where} has no 'type' and no 'text' or 'image' (keys: {_short(sorted(map(str, item)))})")
    if not isinstance(kind, str) or kind not in ITEM_TYPES:
        raise SampleError(f"{where} has type {_short(kind)}; only 'text', 'image' and 'image_url' items are supported")
    if kind == "text" and not isinstance(item.get("text"), str):
        got = "nothing" if item.get("text") is None else type(item["text"]).__name__
        raise SampleError(f"{where} is a text item whose 'text' must be a string, got {got}")
    return dict(item)


def _short(value: Any, limit: int = 60) -> str:
    """repr of a value from a sample, cut short (error messages never echo big payloads)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_image_item(item: dict) -> bool:
    return item.get("type") in ("image", "image_url") or "image" in item or "image_url" in item


def _image_items(messages: list[dict]) -> list[dict]:
    """Image items in template order, each normalized to ``{"type": "image", "image": src}``."""
    found = []
    for m in messages:
        if not isinstance(m["content"], list):
            continue
        for item in m["content"]:
            if not _is_image_item(item):
                continue
            src = item.get("image")
            if src is None and item.get("image_url") is not None:
                src = item.pop("image_url")
                src = src.get("url") if isinstance(src, dict) else src
            item["type"] = "image"
            item["image"] = src
            found.append(item)
    return found


def _place_column_images(messages: list[dict], column: list) -> None:
    items = _image_items(messages)
    placeholders = [item for item in items if item["image"] is None]
    if placeholders:
        if len(placeholders) != len(column):
            raise SampleError(
                f"the messages have {len(placeholders)} image placeholders but {len(column)} images were given"
            )
        for item, image in zip(placeholders, column):
            item["image"] = image
        return
    if items or not column:
        return  # images embedded in the messages win over the column (TRL passes both)
    first_user = next((m for m in messages if m["role"] == "user"), None)
    if first_user is None:
        raise SampleError("images were given but the conversation has no user message to hold them")
    content = first_user["content"]
    text = [{"type": "text", "text": content}] if isinstance(content, str) else content
    first_user["content"] = [{"type": "image", "image": im} for im in column] + text


def token_samples(input_ids: Any, images: list | None = None, attention_mask: Any = None) -> list[dict]:
    """Samples from token ids a policy already holds (PPO-style loops): no decode and re-tokenize.

    input_ids: a list of id lists, or a 2-D tensor (padding removed with ``attention_mask``), each the
        whole conversation in the reward model's chat format (a Qwen2.5-VL policy's prompt ids plus its
        completion ids). images: one list of images per row (or None).
    """
    rows = input_ids.tolist() if hasattr(input_ids, "tolist") else list(input_ids)
    masks = attention_mask.tolist() if hasattr(attention_mask, "tolist") else attention_mask
    out = []
    for r, ids in enumerate(rows):
        if masks is not None:
            ids = [t for t, m in zip(ids, masks[r]) if m]
        out.append({"input_ids": ids, "images": list(images[r] or []) if images is not None else []})
    return out
