"""OpenRLHF's remote reward protocol (``POST /get_reward`` and ``reward_func(queries, prompts, labels)``):
its requests turned into samples and its answers assembled. An input format, not serving: the HTTP door
(``rewardplug.serving.http``) and the in-process OpenRLHF adapter (``rewardplug.integrations.openrlhf``)
both use it.

OpenRLHF 0.11 sends ``{"query": [...], "prompts": [...], "labels": [...]}``, usually one query per
request, and never any images:

- ``query``: ``decode(prompt_ids + response_ids, skip_special_tokens=False)``: the policy's
  chat-formatted prompt (each image's pad run expanded) followed by the response and, when the policy
  finished its turn, its end-of-turn token.
- ``prompts``: the chat-formatted prompt before generation (one pad token per image).
- ``labels``: the dataset's ``--data.label_key`` column. **This is where the images come from.**

Dataset layout (the label of a row), any of:

- a JSON object, or a string holding one: ``{"images": ["/data/cat.png", "data:image/png;base64,..."],
  "reference": "a cat"}``. ``images`` are local paths, ``file://`` URIs, data URIs or (when allowed)
  http(s) URLs, in the order the prompt shows them; ``reference`` is optional and not read by the reward
  model (keep it for rule-based rewards);
- a list of image references (e.g. ``--data.label_key images``, the same column the policy reads);
- anything else (a plain answer string, null): a sample without images.

The query is re-rendered into the reward model's own template: the policy's turns are parsed back into
messages (ChatML as Qwen2/2.5/3-VL use it, Llama 3, Gemma), each image placeholder becomes an image item
filled from the label, the response becomes the assistant turn. A query that cannot be scored (an unknown
chat format, fewer images in the label than placeholders in the prompt, an unreadable image) follows
``on_invalid``: "raise" (the default) fails the request with every bad query's reason
(``GetRewardInvalidError``, answered 422); a float is that query's reward, with ``rm_invalid = 1`` in
``extra_logs`` and the others in the request scored as usual.
A system failure (``ScoringError``) propagates: the HTTP app answers 5xx and OpenRLHF retries.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from .errors import InvalidSampleError, RewardPlugError, SampleError
from .on_invalid import DEFAULT as ON_INVALID_DEFAULT
from .on_invalid import RAISE, parse_on_invalid

logger = logging.getLogger(__name__)

# extra_logs keys: OpenRLHF turns each into a per-sample tensor in its experience info (logged as means).
LOG_SCORE, LOG_INVALID, LOG_TRUNCATED = "rm_score", "rm_invalid", "rm_truncated"


class GetRewardRequestError(RewardPlugError, ValueError):
    """The request body itself is malformed (not one sample): the HTTP app answers 422."""


class GetRewardInvalidError(InvalidSampleError):
    """Some queries cannot be scored and on_invalid is "raise": the HTTP app answers 422 with the reasons."""


@dataclass(frozen=True)
class ChatFormat:
    """How one family of chat templates marks turns, their ends and image placeholders."""

    name: str
    marker: str  # a string only this format's rendered text holds
    turn_start: re.Pattern  # group "role"; the content runs to the next turn start
    turn_ends: tuple[str, ...]  # tokens that close a turn (or end generation)
    image: re.Pattern  # one image placeholder (an expanded pad run counts once)
    video: re.Pattern | None = None
    roles: dict = field(default_factory=dict)  # the template's role names -> user/assistant/system
    strip: tuple[str, ...] = ()  # tokens to drop wherever they are (begin-of-text)


FORMATS = (
    ChatFormat(
        "chatml",  # Qwen2-VL, Qwen2.5-VL, Qwen3-VL, and other ChatML templates
        "<|im_start|>",
        re.compile(r"<\|im_start\|>(?P<role>[^\n<]*)\n"),
        ("<|im_end|>", "<|endoftext|>"),
        re.compile(r"<\|vision_start\|>(?:<\|image_pad\|>)+<\|vision_end\|>|(?:<\|image_pad\|>)+"),
        re.compile(r"<\|vision_start\|>(?:<\|video_pad\|>)+<\|vision_end\|>|<\|video_pad\|>"),
    ),
    ChatFormat(
        "llama3",  # Llama 3 / 3.2-Vision
        "<|start_header_id|>",
        re.compile(r"<\|start_header_id\|>(?P<role>[^<]*)<\|end_header_id\|>\n\n"),
        ("<|eot_id|>", "<|end_of_text|>", "<|eom_id|>"),
        re.compile(r"<\|image\|>"),
        strip=("<|begin_of_text|>",),
    ),
    ChatFormat(
        "gemma",  # Gemma 3 (system text is folded into the first user turn by its template)
        "<start_of_turn>",
        re.compile(r"<start_of_turn>(?P<role>[^\n<]*)\n"),
        ("<end_of_turn>", "<eos>"),
        # The processor wraps each image as "\n\n<start_of_image>" + soft tokens + "<end_of_image>\n\n".
        re.compile(r"(?:\n\n)?<start_of_image>(?:<image_soft_token>)*<end_of_image>(?:\n\n)?|<start_of_image>"),
        roles={"model": "assistant"},
        strip=("<bos>",),
    ),
)


@dataclass
class Label:
    """What a dataset label holds for the reward model."""

    images: list
    reference: Any = None


@dataclass
class ParsedQuery:
    """A query turned back into a conversation for the reward model."""

    messages: list[dict]  # prompt turns (images as {"type": "image"} placeholders) + the assistant answer
    truncated: bool  # the response ended without an end-of-turn token (it hit the length limit)
    format: str


def parse_label(label: Any) -> Label:
    """Images (and the optional reference answer) from one dataset label; see the module docstring."""
    if isinstance(label, str):
        text = label.strip()
        if text[:1] in "{[":
            try:
                label = json.loads(text)
            except json.JSONDecodeError:
                return Label([], label)  # an answer that happens to start with a bracket
        else:
            return Label([], label or None)
    if isinstance(label, dict):
        images = label.get("images", label.get("image"))
        if images is None:
            images = []
        elif not isinstance(images, list | tuple):
            images = [images]
        return Label([im for im in images if im is not None], label.get("reference"))
    if isinstance(label, list | tuple):
        return Label([im for im in label if im is not None])
    return Label([], label)


def detect_format(text: str) -> ChatFormat | None:
    """The chat format whose markers appear first in ``text``, or None."""
    found = [(text.find(f.marker), f) for f in FORMATS if f.marker in text]
    return min(found, key=lambda pair: pair[0])[1] if found else None


def parse_query(query: str, prompt: str | None = None) -> ParsedQuery:
    """Split a policy's decoded query into prompt messages and the answer; SampleError if it can't.

    The answer is what follows the prompt: ``prompt`` (OpenRLHF's ``prompts`` entry) when it is a
    prefix of the query up to the image pad runs, else the last assistant turn of the query. Text the
    prompt prefills into the assistant turn (e.g. Qwen3's empty ``<think></think>``) belongs to the answer.
    """
    fmt = detect_format(query)
    if fmt is None:
        raise SampleError("the query has no chat turns of a known format (ChatML, Llama 3, Gemma)")
    query, prompt = _collapse(query, fmt), _collapse(prompt, fmt) if prompt else None
    if prompt and query.startswith(prompt) and fmt.turn_start.search(prompt):
        head, answer = prompt, query[len(prompt):]  # fmt: skip
    else:
        head, answer = _split_last_assistant(query, fmt)
    messages = _turns(head, fmt)
    if messages and messages[-1]["role"] == "assistant":  # the generation prompt, maybe with prefilled text
        prefilled = messages.pop()["content"]
        if not isinstance(prefilled, str):
            raise SampleError("the prompt prefills an image into the assistant turn")
        answer = prefilled + answer
    answer, finished = _strip_turn_end(answer, fmt)
    if IMAGE in answer:
        raise SampleError("the response holds an image placeholder")
    messages.append({"role": "assistant", "content": answer})
    return ParsedQuery(messages, truncated=not finished, format=fmt.name)


IMAGE = "\x00"  # one image placeholder after _collapse (a NUL never appears in decoded chat text)


def _collapse(text: str, fmt: ChatFormat) -> str:
    """Drop begin-of-text tokens; each image placeholder (expanded or not) becomes one IMAGE mark."""
    for token in fmt.strip:
        text = text.replace(token, "")
    return fmt.image.sub(IMAGE, text.replace(IMAGE, ""))


def _split_last_assistant(query: str, fmt: ChatFormat) -> tuple[str, str]:
    for m in reversed(list(fmt.turn_start.finditer(query))):
        if _role(m.group("role"), fmt) == "assistant":
            return query[: m.end()], query[m.end():]  # fmt: skip
    raise SampleError(f"the query ({fmt.name} format) has no assistant turn to score")


def _strip_turn_end(text: str, fmt: ChatFormat) -> tuple[str, bool]:
    """The text before its first end-of-turn token (and any padding after it); whether it had one."""
    positions = [text.find(t) for t in fmt.turn_ends if t in text]
    if not positions:
        return text, False
    return text[: min(positions)], True


def _role(name: str, fmt: ChatFormat) -> str:
    name = name.strip()
    return fmt.roles.get(name, name)


def _turns(head: str, fmt: ChatFormat) -> list[dict]:
    """The prompt's turns as messages (the last one may be the open assistant turn)."""
    starts = list(fmt.turn_start.finditer(head))
    if not starts:
        raise SampleError(f"the prompt ({fmt.name} format) has no turns")
    messages = []
    for k, m in enumerate(starts):
        end = starts[k + 1].start() if k + 1 < len(starts) else len(head)
        body, _ = _strip_turn_end(head[m.end() : end], fmt)
        messages.append({"role": _role(m.group("role"), fmt), "content": _content(body, fmt)})
    return messages


def _content(body: str, fmt: ChatFormat) -> str | list[dict]:
    if fmt.video is not None and fmt.video.search(body):
        raise SampleError("the query holds a video; only images are supported")
    parts = body.split(IMAGE)
    if len(parts) == 1:
        return body
    items: list[dict] = []
    for k, text in enumerate(parts):
        if k:
            items.append({"type": "image"})
        if text:
            items.append({"type": "text", "text": text})
    return items


def build_sample(query: str, prompt: str | None, label: Any) -> tuple[dict, bool]:
    """The reward model's sample for one OpenRLHF query, and its truncation flag; SampleError if none."""
    if not isinstance(query, str):
        raise SampleError(f"the query must be a string, got {type(query).__name__}")
    parsed = parse_query(query, prompt if isinstance(prompt, str) else None)
    images = parse_label(label).images
    placeholders = sum(
        1 for m in parsed.messages if isinstance(m["content"], list) for it in m["content"] if it["type"] == "image"
    )
    if placeholders and placeholders != len(images):
        raise SampleError(f"the query shows {placeholders} images but its label gives {len(images)}")
    # No placeholder (a text-only prompt) but images in the label: they go before the first user text.
    return {"messages": parsed.messages, "images": images}, parsed.truncated


@dataclass
class RewardBatch:
    """Samples of one request, with what is known before scoring."""

    samples: list[dict | None]  # None: could not be built
    truncated: list[bool]
    errors: dict[int, str]

    @property
    def to_score(self) -> list[int]:
        return [i for i, s in enumerate(self.samples) if s is not None]


def build_batch(queries: list, prompts: list | None, labels: list | None) -> RewardBatch:
    """One sample per query; a query that cannot be turned into one gets its reason in ``errors``."""
    n = len(queries)
    prompts = list(prompts) if prompts is not None else [None] * n
    labels = list(labels) if labels is not None else [None] * n
    if len(prompts) != n or len(labels) != n:
        raise GetRewardRequestError(f"{n} queries but {len(prompts)} prompts and {len(labels)} labels")
    batch = RewardBatch([None] * n, [False] * n, {})
    for i, (query, prompt, label) in enumerate(zip(queries, prompts, labels)):
        try:
            batch.samples[i], batch.truncated[i] = build_sample(query, prompt, label)
        except SampleError as e:
            batch.errors[i] = str(e)
    return batch


def assemble(batch: RewardBatch, scores: dict[int, float], errors: dict[int, str], fallback: float) -> dict:
    """The OpenRLHF answer: rewards, scores (the same), per-query logs, and the reasons of bad queries."""
    errors = {**batch.errors, **errors}
    n = len(batch.samples)
    raw = [scores.get(i) for i in range(n)]
    rewards = [float(fallback) if (r is None or i in errors) else float(r) for i, r in enumerate(raw)]
    for i, reason in list(errors.items())[:5]:
        logger.warning("get_reward: query %d not scored (reward %s): %s", i, fallback, reason)
    return {
        "rewards": rewards,
        "scores": rewards,
        "extra_logs": {
            # JSON has no NaN: an unscored query logs the fallback here and 1 in rm_invalid.
            LOG_SCORE: rewards,
            LOG_INVALID: [float(i in errors) for i in range(n)],
            LOG_TRUNCATED: [float(t) for t in batch.truncated],
        },
        "errors": {str(i): reason for i, reason in sorted(errors.items())},
    }


def _check_body(body: Any) -> tuple[list, list | None, list | None]:
    if not isinstance(body, dict):
        raise GetRewardRequestError("the body must be a JSON object")
    queries = body.get("query")
    if not isinstance(queries, list):
        raise GetRewardRequestError("'query' must be a list of strings")
    prompts, labels = body.get("prompts"), body.get("labels")
    for name, value in (("prompts", prompts), ("labels", labels)):
        if value is not None and not isinstance(value, list):
            raise GetRewardRequestError(f"'{name}' must be a list (one entry per query)")
    return queries, prompts, labels


ScoreFn = Callable[[list], Awaitable[tuple[list, dict]]]


async def get_reward(body: dict, score: ScoreFn, *, on_invalid: str | float = ON_INVALID_DEFAULT) -> dict:
    """Answer one OpenRLHF ``/get_reward`` request.

    body: the parsed JSON body ``{"query": [...], "prompts": [...], "labels": [...]}``.
    score: ``await score(samples) -> (scores, errors)``: one score (None for a bad sample) per sample and
        ``{index: reason}`` (int or str keys) for the bad ones; it raises on a system failure.
    on_invalid: a query that cannot be scored: "raise" (default) raises GetRewardInvalidError naming every
        bad query and its reason; a float is its reward (flagged ``rm_invalid = 1`` in ``extra_logs``).

    Returns ``{"rewards", "scores", "extra_logs": {"rm_score", "rm_invalid", "rm_truncated"}, "errors"}``.
    Raises GetRewardRequestError for a malformed body (answer 422), and lets ``score``'s system errors
    through (answer 5xx).
    """
    on_invalid = parse_on_invalid(on_invalid, none_refused="OpenRLHF cannot mask a reward")
    queries, prompts, labels = _check_body(body)
    batch = build_batch(queries, prompts, labels)
    index = batch.to_score
    scores: dict[int, float] = {}
    errors: dict[int, str] = {}
    if index:
        values, bad = await score([batch.samples[i] for i in index])
        if len(values) != len(index):
            raise RuntimeError(f"score() returned {len(values)} scores for {len(index)} samples")
        for k, value in enumerate(values):
            if value is not None:
                scores[index[k]] = value
        errors = {index[int(k)]: reason for k, reason in bad.items()}
        for k, value in enumerate(values):  # a None without a reason is still not a score
            if value is None and index[k] not in errors:
                errors[index[k]] = "not scored"
    if on_invalid == RAISE and (errors or batch.errors):
        raise GetRewardInvalidError({**batch.errors, **errors})
    return assemble(batch, scores, errors, on_invalid)
