"""Group encoding: a request's image and prompt work done once, with the ids, positions and pixels of
each whole conversation encoded alone (the processor's own way)."""

from __future__ import annotations

import base64
import threading

import pytest
import torch
from conftest import png_bytes, random_image, text_of_length
from qwen_vl_utils import fetch_image

import rewardplug.images
from rewardplug.encoding import Encoder, PixelCache, token_type_ids
from rewardplug.errors import ScoringError
from rewardplug.samples import to_conversation
from rewardplug.testing import QWEN2_VL_CHAT_TEMPLATE, SPECIAL_TOKENS, _byte_symbols

# Answers that start or end where a tokenizer could merge across the prompt/answer join.
ANSWERS = ["A cat.", "\nLeading newline.", "\n\nTwo newlines", " leading space", "  two spaces", "\t tab",
           "", " ", "\n", "trailing newline\n", "trailing spaces  ", "the the the", "assistant", "émoji ✓ 猫",
           "ends with im_end text <|im_end|>", text_of_length(300, seed=5)]  # fmt: skip


def processor_encoding(processor, rope_index, sample, policy):
    """The reference: the whole conversation through the processor, as the model card does it."""
    conv = to_conversation(sample, policy)
    text = processor.apply_chat_template(conv.messages, tokenize=False, add_generation_prompt=False)
    images = [fetch_image({"image": im, **size}, image_patch_size=14) for im, size in zip(conv.images, conv.sizes)]
    out = processor(text=[text], images=images or None, return_tensors="pt")
    ids, mm = out["input_ids"][0], out["mm_token_type_ids"][0]
    positions = rope_index(ids[None], mm[None], out.get("image_grid_thw"))[:, 0]
    return ids, mm, positions, out.get("pixel_values")


@pytest.fixture(scope="module")
def card_processor(tiny_path):
    from transformers import AutoImageProcessor, AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_path)
    processor.image_processor = AutoImageProcessor.from_pretrained(tiny_path, backend="pil")
    return processor


def grouped_request(images) -> list[dict]:
    """Several prompt groups (text only, one image, two images, conversational), every answer form."""
    samples = []
    for k, prompt_images in enumerate([[], [images[0]], [images[1], images[2]]]):
        for answer in ANSWERS:
            samples.append({"prompt": f"Question {k}: what is shown?", "completion": answer, "images": prompt_images})
    convo = [{"role": "system", "content": "Be brief."},
             {"role": "user", "content": [{"type": "image", "image": images[0]}, {"type": "text", "text": "Hi"}]},
             {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Describe it."}]  # fmt: skip
    for answer in ANSWERS[:6]:
        samples.append({"prompt": convo, "completion": [{"role": "assistant", "content": answer}]})
        samples.append({"prompt": convo, "completion": [{"role": "assistant", "content": [{"type": "text", "text": answer}]}]})
    return samples


def assert_same_encoding(got, ids, mm, positions, pixels):
    assert torch.equal(got.input_ids, ids)
    assert torch.equal(got.mm_token_type_ids, mm)
    assert torch.equal(got.position_ids, positions)
    if pixels is None:
        assert got.pixel_values is None
    else:
        assert torch.equal(got.pixel_values, pixels)


def test_group_encoding_equals_each_whole_conversation_through_the_processor(model, card_processor, images):
    samples = grouped_request(images)
    before = model.encoder.counters.snapshot()
    encoded, errors = model.encode_many(samples)
    after = model.encoder.counters.snapshot()
    assert not errors
    # Every sample took the shared-prompt path (so this test checks that path, not the fallback).
    assert after["prompts_shared"] - before["prompts_shared"] == len(samples)
    assert after["whole_conversations"] == before["whole_conversations"]
    for sample, got in zip(samples, encoded):
        reference = processor_encoding(card_processor, model.encoder.rope_index, sample, model.encoder.policy)
        assert_same_encoding(got, *reference)


def test_group_scores_equal_whole_conversation_scores(model, images):
    samples = grouped_request(images)[:: 3]
    grouped = model.score(samples)
    model.encoder.share_prompts = False
    try:
        whole = model.score(samples)
    finally:
        model.encoder.share_prompts = True
    assert max(abs(a - b) for a, b in zip(grouped, whole)) <= 1e-5


# ---- a tokenizer with merges: the join between prompt and answer can merge --------------------------


@pytest.fixture(scope="module")
def merging_processor(model):
    """The tiny tokenizer plus BPE merges of newlines, spaces and a few words, under Qwen's
    pre-tokenizer: "assistant\\n" + "\\nHi" tokenizes differently from "assistant\\n\\nHi" cut in two."""
    from transformers import Qwen2Tokenizer, Qwen2_5_VLProcessor

    merges = [("Ċ", "Ċ"), ("Ġ", "Ġ"), ("ĠĠ", "Ġ"), ("ĊĊ", "Ċ"), ("t", "h"), ("th", "e"), ("Ġ", "the"), ("a", "s"),
              ("as", "s"), ("ass", "istant"), ("i", "s"), ("is", "t"), ("ist", "a"), ("ista", "n"), ("istan", "t"),
              ("Ġ", "Ċ"), ("ĉ", "Ġ")]  # fmt: skip
    merged = []
    for a, b in merges:
        if a + b not in merged:
            merged.append(a + b)
    vocab = {ch: i for i, ch in enumerate(_byte_symbols() + merged + SPECIAL_TOKENS)}
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None)
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    return Qwen2_5_VLProcessor(image_processor=model.image_processor, tokenizer=tok,
                               video_processor=model.processor.video_processor, chat_template=QWEN2_VL_CHAT_TEMPLATE)


def merging_encoder(model, processor, **kw) -> Encoder:
    return Encoder(processor=processor, policy=model.encoder.policy, image_processor=model.image_processor,
                   rope_index=model.encoder.rope_index, **kw)  # fmt: skip


def test_the_merging_tokenizer_really_merges_across_the_join(merging_processor):
    tok = merging_processor.tokenizer
    whole = tok.encode("<|im_start|>assistant\n\nHi", add_special_tokens=False)
    naive = tok.encode("<|im_start|>assistant\n", add_special_tokens=False) + tok.encode("\nHi", add_special_tokens=False)
    assert whole != naive  # a prompt tokenized up to the answer, joined to the answer's tokens, would be wrong
    assert tok.convert_tokens_to_ids("ĊĊ") in whole


def test_group_encoding_with_merges_equals_the_processor(model, merging_processor, images):
    encoder = merging_encoder(model, merging_processor)
    samples = grouped_request(images)
    encoded, errors = encoder.encode_many(samples)
    assert not errors
    assert encoder.counters.prompts_shared == len(samples) and encoder.counters.whole_conversations == 0
    for sample, got in zip(samples, encoded):
        assert_same_encoding(got, *processor_encoding(merging_processor, encoder.rope_index, sample, encoder.policy))


@pytest.mark.parametrize("template", [
    # No special token between the prompt and the answer: the cut is unsafe, so every sample is whole.
    "{% for m in messages %}{{ m['role'] }}: {% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if 'image' in c %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}\n{% endfor %}",
    # The answer is not inserted verbatim (trimmed): the probe rendering catches it.
    QWEN2_VL_CHAT_TEMPLATE.replace("{{ message['content'] }}", "{{ message['content'] | trim }}"),
], ids=["no_special_token_before_answer", "answer_trimmed"])  # fmt: skip
def test_templates_that_forbid_the_cut_fall_back_to_whole_conversations(model, merging_processor, images, template):
    from transformers import Qwen2_5_VLProcessor

    processor = Qwen2_5_VLProcessor(image_processor=model.image_processor, tokenizer=merging_processor.tokenizer,
                                    video_processor=model.processor.video_processor,
                                    chat_template=template)  # fmt: skip
    encoder = merging_encoder(model, processor)
    samples = [s for s in grouped_request(images) if isinstance(s["completion"], str)]
    encoded, errors = encoder.encode_many(samples)
    assert not errors
    assert encoder.counters.prompts_shared == 0 and encoder.counters.whole_conversations == len(samples)
    for sample, got in zip(samples, encoded):
        assert_same_encoding(got, *processor_encoding(processor, encoder.rope_index, sample, encoder.policy))


# ---- images: each distinct source once ----------------------------------------------------------


def test_each_distinct_image_source_is_decoded_and_resized_once(model, tmp_path, monkeypatch):
    decodes = []
    real_decode = rewardplug.images._decode
    monkeypatch.setattr(rewardplug.images, "_decode", lambda data, *a: decodes.append(len(data)) or real_decode(data, *a))
    pictures = [random_image(90 + 10 * k, 70, seed=40 + k) for k in range(5)]
    path = tmp_path / "p.png"
    path.write_bytes(png_bytes(pictures[1]))
    uri = "data:image/png;base64," + base64.b64encode(png_bytes(pictures[2])).decode()
    raw = png_bytes(pictures[3])
    sources = [pictures[0], str(path), uri, raw, pictures[4]]
    samples = []
    for k, source in enumerate(sources):
        for g in range(8):
            # new objects with the same content each time (bytes copies; PIL copies, as datasets hands
            # them out): one decode, one resize per content
            src = bytes(bytearray(source)) if isinstance(source, bytes) else source
            src = src.copy() if k == 4 else src
            samples.append({"prompt": f"q{k}", "completion": f"answer {g}", "images": [src]})
    before = model.encoder.counters.snapshot()
    encoded, errors = model.encode_many(samples)
    after = model.encoder.counters.snapshot()
    assert not errors
    assert len(decodes) == 3  # path, data URI, bytes; the PIL image needs no decoding
    assert after["images_decoded"] - before["images_decoded"] == 3
    assert after["images_resized"] - before["images_resized"] == 5
    assert after["prompts_rendered"] - before["prompts_rendered"] == 2 * 5  # once per group (answer + probe)
    for k in range(5):
        group = encoded[8 * k : 8 * k + 8]
        assert all(e.pixels is group[0].pixels for e in group)  # shared, not copied


def test_bad_image_source_is_the_samples_error_and_the_others_are_scored(model):
    image = random_image(64, 64, seed=3)
    samples = [{"prompt": "q", "completion": "a", "images": [image]},
               {"prompt": "q", "completion": "b", "images": [b"not an image"]},
               {"prompt": "q", "completion": "c", "images": [image]}]  # fmt: skip
    encoded, errors = model.encode_many(samples)
    assert list(errors) == [1] and "image 0" in errors[1] and "could not be decoded" in errors[1]
    assert encoded[0] is not None and encoded[2] is not None


def test_a_failure_that_is_not_the_samples_raises_scoring_error(tiny_path):
    """A broken chat template is the system's fault: the request fails with the cause, no sample is
    blamed."""
    from rewardplug import RewardModel

    rm = RewardModel.from_pretrained(tiny_path, dtype="float32", device="cpu")
    rm.processor.chat_template = "{{ messages[0]['content'] | no_such_filter }}"
    with pytest.raises(ScoringError, match="encoding sample 0 failed") as info:
        rm.encode_many([{"prompt": "q", "completion": "a"}])
    assert info.value.__cause__ is not None


# ---- threads --------------------------------------------------------------------------------------


def test_encode_many_from_several_threads_gives_the_single_thread_result(model, images):
    requests = [[{"prompt": f"q{r}", "completion": text_of_length(10 + 7 * g, seed=r * 10 + g),
                  "images": [images[r % 3].copy()]} for g in range(6)] for r in range(12)]  # fmt: skip
    expected = [model.encode_many(r)[0] for r in requests]
    results: dict[int, list] = {}
    failures = []

    def work(worker: int):
        try:
            for _ in range(3):
                for r in range(worker, len(requests), 4):
                    results[r] = model.encode_many(requests[r])[0]
        except Exception as e:  # noqa: BLE001 - reported below
            failures.append(e)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures
    for r, want in enumerate(expected):
        for got, ref in zip(results[r], want):
            assert torch.equal(got.input_ids, ref.input_ids) and torch.equal(got.position_ids, ref.position_ids)
            assert torch.equal(got.pixel_values, ref.pixel_values)


# ---- pixel cache and token types -------------------------------------------------------------------


def test_pixel_cache_is_bounded_in_bytes(model):
    one = fetch_image({"image": random_image(112, 112, seed=1)})
    sizer = PixelCache(model.image_processor)
    sizer.get(one, "one")
    size = sizer.bytes  # uint8 codes (8 x 8 patches of 3 x 14 x 14), the 3 x 256 table and the grid
    assert size == 64 * 3 * 14 * 14 + 3 * 256 * 4 + 3 * 8
    cache = PixelCache(model.image_processor, max_bytes=int(2.5 * size))
    for k in range(6):
        cache.get(fetch_image({"image": random_image(112, 112, seed=k)}), f"d{k}")
        assert cache.bytes <= cache.max_bytes
    assert len(cache) == 2 and cache.bytes == 2 * size
    cache.get(one, "d5")  # the most recent is kept
    assert cache.hits == 1
    big = fetch_image({"image": random_image(448, 448, seed=9)})
    cache.get(big, "big")  # over the whole budget: processed, not kept, nothing evicted for it
    assert len(cache) == 2 and cache.bytes <= cache.max_bytes
    assert len(PixelCache(model.image_processor, max_bytes=0).get(one, "x")) == 2


def test_pixel_cache_budget_is_an_option_of_from_pretrained(tiny_path):
    from rewardplug import RewardModel

    rm = RewardModel.from_pretrained(tiny_path, dtype="float32", device="cpu", pixel_cache_mb=1)
    assert rm.encoder.pixel_cache.max_bytes == 2**20
    samples = [{"prompt": "q", "completion": "a", "images": [random_image(224, 224, seed=k)]} for k in range(8)]  # 153 KiB of codes each
    rm.encode_many(samples)
    assert 0 < rm.encoder.pixel_cache.bytes <= 2**20 and 1 < len(rm.encoder.pixel_cache) < 8


def test_mm_token_type_ids_come_from_the_image_token_ids(model, images):
    tok = model.processor.tokenizer
    image_id, video_id = tok.convert_tokens_to_ids("<|image_pad|>"), tok.convert_tokens_to_ids("<|video_pad|>")
    ids = torch.tensor([1, image_id, image_id, 2, video_id, 3])
    assert token_type_ids(ids, image_id, video_id).tolist() == [0, 1, 1, 0, 2, 0]
    text_sample = {"prompt": "q", "completion": "a", "images": [images[0]]}
    token_sample = {"input_ids": model.encode(text_sample).input_ids.tolist(), "images": [images[0]]}
    for sample in (text_sample, token_sample):
        e = model.encode(sample)
        assert torch.equal(e.mm_token_type_ids, (e.input_ids == image_id).long())
        assert int(e.mm_token_type_ids.sum()) == int(e.image_grid_thw.prod()) // 4


def test_processor_is_left_as_loaded(model):
    """The encoder calls its image processor itself; the processor keeps the image processor it was
    loaded with (no wrapper in its place)."""
    assert model.processor.image_processor is not model.image_processor
    assert type(model.image_processor).__name__ == "Qwen2VLImageProcessorPil"
    assert type(model.processor.image_processor).__name__ == "Qwen2VLImageProcessor"


@pytest.mark.parametrize("size", [(448, 448), (336, 168), (28, 504), (1008, 196), (56, 56), (392, 504)])
def test_exact_pixel_table_gives_the_image_processors_bits(model, size):
    from rewardplug.encoding import ExactPixels

    fast = ExactPixels(model.image_processor)
    assert fast.enabled
    image = fetch_image({"image": random_image(*size, seed=sum(size))}, image_patch_size=14)
    got = fast(image)
    assert got is not None
    ref = model.image_processor(images=[image], return_tensors="pt")
    assert torch.equal(got[0].values(), ref["pixel_values"]) and torch.equal(got[1], ref["image_grid_thw"])


def test_pixel_codes_cross_to_the_device_as_bytes_and_expand_there_to_the_processors_bits(model):
    from rewardplug.encoding import PixelCodes, pixel_values

    image = fetch_image({"image": random_image(336, 168, seed=11)}, image_patch_size=14)
    encoded = model.encode({"prompt": "What is it?", "completion": "A cat.", "images": [image]})
    assert isinstance(encoded.pixels, PixelCodes) and encoded.pixels.codes.dtype == torch.uint8
    moved = []

    def move(tensor):  # stands in for the copy to the model's device
        moved.append((tensor.dtype, tensor.numel()))
        return tensor.clone()

    got = pixel_values(encoded.pixels, move)
    ref = model.image_processor(images=[image], return_tensors="pt")["pixel_values"]
    assert torch.equal(got, ref)
    patches = ref.shape[0]
    assert moved == [(torch.uint8, patches * 3 * 14 * 14), (torch.float32, 3 * 256)]  # 1 byte per value, then the table
    assert encoded.pixels.nbytes - 3 * 256 * 4 == ref.numel() // 2  # an eighth of the float bytes (4 bytes x 2 frames)


def test_exact_pixel_table_declines_what_it_does_not_reproduce(model, tiny_path):
    from transformers import AutoImageProcessor

    from rewardplug.encoding import ExactPixels

    fast = ExactPixels(model.image_processor)
    assert fast(random_image(100, 150, seed=1)) is None  # the processor would resize it (not multiples of 28)
    assert fast(random_image(56, 56, seed=1, mode="RGBA")) is None
    assert not ExactPixels(AutoImageProcessor.from_pretrained(tiny_path, backend="torchvision")).enabled


def test_odd_image_sources_are_the_samples_errors_not_system_failures(model):
    import numpy as np

    samples = [{"prompt": "q", "completion": "a", "images": [{"bytes": [None]}]},
               {"input_ids": [97, 98], "images": np.zeros((28, 28, 3), dtype=np.uint8)},
               {"prompt": "q", "completion": "a", "images": [[1, 2]]},
               {"prompt": "q", "completion": "fine"}]  # fmt: skip
    encoded, errors = model.encode_many(samples)
    assert sorted(errors) == [0, 1, 2] and encoded[3] is not None
    assert "image placeholders" in errors[1]


def test_an_image_seen_by_an_earlier_request_is_not_resized_again(tiny_path):
    from rewardplug import RewardModel

    rm = RewardModel.from_pretrained(tiny_path, dtype="float32", device="cpu")
    picture = random_image(300, 200, seed=21)
    first, _ = rm.encode_many([{"prompt": "q", "completion": "a", "images": [picture]}])
    before = rm.encoder.counters.snapshot()
    copy = picture.copy()  # another object with the same pixels, as a dataset hands out per row
    second, _ = rm.encode_many([{"prompt": "q", "completion": "b", "images": [copy]}])
    after = rm.encoder.counters.snapshot()
    assert after["images_resized"] == before["images_resized"]
    assert second[0].image_digests == first[0].image_digests
    assert torch.equal(second[0].pixel_values, first[0].pixel_values)
    rm.encode_many([{"prompt": "q", "completion": "b", "images": [random_image(300, 200, seed=22)]}])
    assert rm.encoder.counters.images_resized == after["images_resized"] + 1  # another picture is resized
