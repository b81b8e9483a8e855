"""Prompt-cut sharing: samples with the same prompt share one rendering and tokenization of it.

The chat template is rendered once per prompt with a stand-in answer; the text is cut right after the
prompt's last special token (``<|im_start|>``), which the tokenizer splits out before anything else, so
no BPE merge can cross the cut and prompt ids + answer ids equal the whole conversation's ids. Only the
answer (with the template text around it) is tokenized per sample. Where that cannot be shown (a template
that does not insert the answer verbatim, a tokenizer that normalizes the cut token or appends at the end)
the group is None and samples are encoded whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..errors import SampleError
from .encoded import EncodedSample
from .pixel_codes import PixelCodes
from .tokens import IMAGE_TOKEN, VIDEO_TOKEN, token_type_ids

if TYPE_CHECKING:
    from .encoder import Encoder
    from .request_images import PreparedImage

# Stands in for the answer when the template is rendered once per prompt (private-use code points).
ANSWER = "\ue000rewardplug:answer\ue001"
PROBE = " \n\t\ue000probe\ue001 \n"  # whitespace at both ends: a template that strips or escapes fails


@dataclass
class PromptGroup:
    """A prompt shared by several samples: its tokens and positions, computed once."""

    ids: torch.Tensor  # prompt tokens up to and including its last special token, image runs expanded
    positions: torch.Tensor | None  # [3, P]
    next_position: int
    between: str  # template text from the cut to the answer ("assistant\n")
    after: str  # template text after the answer ("<|im_end|>\n")
    pixels: "torch.Tensor | PixelCodes | None"
    image_grid_thw: torch.Tensor | None
    digests: list[str]


def answer_text(answer: dict) -> str | None:
    """The final answer as plain text when it can be tokenized apart from its prompt, else None."""
    content = answer.get("content")
    if isinstance(content, str):
        return content
    if (
        isinstance(content, list)
        and len(content) == 1
        and isinstance(content[0], dict)
        and content[0].get("type") == "text"
        and isinstance(content[0].get("text"), str)
        and not any(k in content[0] for k in ("image", "image_url", "video"))
    ):
        return content[0]["text"]
    return None


def build_group(encoder: "Encoder", prompt: list[dict], answer: dict, prepared: list["PreparedImage"]) -> PromptGroup | None:
    """Render and tokenize a prompt once; None when the template does not allow the cut."""
    as_list = isinstance(answer["content"], list)

    def render(content: str) -> str:
        body = [{**answer["content"][0], "text": content}] if as_list else content
        return encoder.render(prompt + [{**answer, "content": body}])

    text = render(ANSWER)
    encoder.count(prompts_rendered=2)
    if text.count(ANSWER) != 1:
        return None
    head, after = text.split(ANSWER)
    if render(PROBE) != head + PROBE + after:  # the template must insert the answer verbatim
        return None
    cut = max((head.rfind(t) + len(t) for t in encoder.cut_tokens if t in head), default=-1)
    between = head[cut:] if cut >= 0 else ""
    if cut < 0 or any(t in between + after for t in (IMAGE_TOKEN, VIDEO_TOKEN)):
        return None
    ids, pixels, grid = encoder.ids_with_images(head[:cut], prepared, add_special_tokens=True)
    positions = encoder.positions(ids, grid)
    if positions is not None and not bool((positions[:, -1] == positions[0, -1]).all()):
        return None  # the prompt must end on a text token for the answer's positions to follow on
    next_position = int(positions[0, -1]) + 1 if positions is not None else 0
    return PromptGroup(ids, positions, next_position, between, after, pixels, grid, [p.digest for p in prepared])


def encode_in_group(encoder: "Encoder", group: PromptGroup, answer: str) -> EncodedSample:
    """A sample of the group: the group's prompt tokens and positions, then its own answer's."""
    suffix = encoder.tokenize(group.between + answer + group.after, add_special_tokens=False)
    if encoder.image_token_id in suffix or (encoder.video_token_id is not None and encoder.video_token_id in suffix):
        raise SampleError("the answer holds image or video tokens but no image of its own")
    suffix_ids = torch.tensor(suffix, dtype=torch.long)
    ids = torch.cat([group.ids, suffix_ids])
    encoder.check_length(len(ids))
    positions = None
    if group.positions is not None:
        tail = torch.arange(len(suffix), dtype=group.positions.dtype) + group.next_position
        positions = torch.cat([group.positions, tail.expand(3, -1)], dim=1)
    encoder.count(prompts_shared=1)
    return EncodedSample(
        input_ids=ids,
        mm_token_type_ids=token_type_ids(ids, encoder.image_token_id, encoder.video_token_id),
        pixels=group.pixels,
        image_grid_thw=group.image_grid_thw,
        image_digests=list(group.digests),
        position_ids=positions,
    )


def safe_cut_tokens(encoder: "Encoder") -> tuple[str, ...]:
    """Special tokens after which the text may be cut without changing the ids: split out before
    normalization and pre-tokenization (not normalized, no lstrip/rstrip), none the start of another,
    and a tokenizer that adds nothing at the end of a sequence."""
    tok = encoder.tokenizer
    added = {t.content: t for t in getattr(tok, "added_tokens_decoder", {}).values()}
    cut = added.get("<|im_start|>")
    if cut is None or cut.normalized or cut.lstrip or cut.rstrip or cut.single_word:
        return ()
    if any(other != cut.content and other.startswith(cut.content) for other in added):
        return ()
    probe = "a<|im_start|>b"
    plain = encoder.tokenize(probe, add_special_tokens=False)
    special = encoder.tokenize(probe, add_special_tokens=True)
    if special[len(special) - len(plain) :] != plain:  # something appended (an EOS): the cut would move it
        return ()
    return (cut.content,)
