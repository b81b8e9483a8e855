"""OpenRLHF 0.11's remote reward: its own executor and request code against rewardplug's reward_func file
and the /get_reward protocol logic. Queries are built by OpenRLHF itself (its dataset preprocessing, its VLM
prompt tokenization, its decode of the observation tokens); only the policy's generation is scripted."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from rewardplug import InvalidSampleError, RewardEngine
from rewardplug.errors import ScoringError
from rewardplug.serving.config import PoolConfig
from rewardplug.get_reward import GetRewardInvalidError, GetRewardRequestError, get_reward, parse_query

from conftest import random_image

agent = pytest.importorskip("openrlhf.utils.agent", reason="OpenRLHF: pip install --no-deps openrlhf pylatexenc")
from openrlhf.datasets.prompts_dataset import preprocess_data  # noqa: E402

import rewardplug.integrations.openrlhf as rp_openrlhf  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
REWARD_FILE = ROOT / "examples" / "openrlhf_reward_func.py"
TOL = 1e-5


def data_uri(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class ScriptedPolicy:
    """Stands in for OpenRLHF's vLLM engine: answers each prompt with a fixed text (the reward is under
    test, not the generation). ``finish_reason`` "length" and no end-of-turn token: a truncated answer."""

    def __init__(self, processor, answer: str, truncated: bool = False):
        tok = processor.tokenizer
        self.token_ids = tok.encode(answer, add_special_tokens=False)
        if not truncated:
            self.token_ids.append(tok.convert_tokens_to_ids("<|im_end|>"))
        self.answer, self.truncated = answer, truncated
        self.prompt_ids = None

    async def generate(self, prompt_token_ids, sampling_params, multi_modal_data=None):
        self.prompt_ids = list(prompt_token_ids)
        out = SimpleNamespace(token_ids=list(self.token_ids), text=self.answer, logprobs=None,
                              finish_reason="length" if self.truncated else "stop")  # fmt: skip
        return SimpleNamespace(outputs=[out])


def rollout(executor, processor, row: dict, answer: str, truncated: bool = False) -> dict:
    """One OpenRLHF single-turn rollout of a dataset row, with its reward fetched by the executor."""
    prompt, label = preprocess_data(row, input_key="prompt", label_key="label",
                                    apply_chat_template=processor.apply_chat_template)  # fmt: skip
    policy = ScriptedPolicy(processor, answer, truncated)
    params = SimpleNamespace(max_tokens=64, logprobs=None)
    return asyncio.run(executor.execute(prompt, label, params, 4096, processor, policy, images=row.get("images")))


def want(model, question: str, answer: str, images: list) -> float:
    """The model's own score of [user(images, question), assistant(answer)]."""
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
    return model.score([{"messages": [{"role": "user", "content": content},
                                      {"role": "assistant", "content": answer}], "images": images}])[0]  # fmt: skip


@pytest.fixture
def use_model(model):
    rp_openrlhf.use_scorer(model)
    yield model
    rp_openrlhf.use_scorer(None)


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    """Dataset rows in the documented layout: images for the policy, and the same in the label."""
    folder = tmp_path_factory.mktemp("openrlhf-images")
    a, b, c = random_image(90, 70, seed=11), random_image(64, 100, seed=12), random_image(120, 60, seed=13)
    path = folder / "b.png"
    b.save(path)
    return [
        ({"prompt": "<image>What is in the picture?", "images": [data_uri(a)],
          "label": json.dumps({"images": [data_uri(a)], "reference": "noise"})}, [a]),
        ({"prompt": [{"role": "user", "content": "<image><image>Compare the two pictures."}],
          "images": [str(path), data_uri(c)], "label": {"images": [str(path), data_uri(c)]}}, [b, c]),
        ({"prompt": "Say hello.", "label": "hello"}, []),
        ({"prompt": "<image>Which color dominates?", "images": [data_uri(c)], "label": [data_uri(c)]}, [c]),
    ]  # fmt: skip


def question_of(row) -> str:
    text = row["prompt"] if isinstance(row["prompt"], str) else row["prompt"][0]["content"]
    return text.replace("<image>", "").strip()


def test_reward_file_through_openrlhf_executor_scores_like_model(model, rows, use_model):
    executor = agent.SingleTurnAgentExecutor(remote_rm_url=str(REWARD_FILE))
    assert executor.reward_func is rp_openrlhf.reward_func
    for k, (row, images) in enumerate(rows):
        answer = f"Answer {k}: it shows colored noise."
        out = rollout(executor, model.processor, row, answer)
        expected = want(model, question_of(row), answer, images)
        assert out["reward"] == pytest.approx([expected], abs=TOL), k
        assert out["scores"] == out["reward"]
        assert out["extra_logs"] == {"rm_score": out["reward"], "rm_invalid": [0.0], "rm_truncated": [0.0]}


def test_reward_file_flags_truncated_answer_and_scores_it_as_is(model, rows, use_model):
    executor = agent.SingleTurnAgentExecutor(remote_rm_url=str(REWARD_FILE))
    row, images = rows[0]
    out = rollout(executor, model.processor, row, "It is a picture of", truncated=True)
    assert out["truncated"] is True
    assert out["extra_logs"]["rm_truncated"] == [1.0]
    assert out["reward"] == pytest.approx([want(model, question_of(row), "It is a picture of", images)], abs=TOL)


def test_query_decoded_by_openrlhf_parses_into_the_conversation(model, rows, use_model):
    """The query OpenRLHF decodes holds the expanded image pad run; parsing gives back one image item."""
    executor = agent.SingleTurnAgentExecutor(remote_rm_url=str(REWARD_FILE))
    seen = []
    original = rp_openrlhf.reward_func

    def spy(queries, prompts, labels):
        seen.append((queries, prompts, labels))
        return original(queries, prompts, labels)

    executor.reward_func = spy
    row, _ = rows[1]
    rollout(executor, model.processor, row, "Both are noise.")
    (queries, prompts, labels), = seen
    assert len(re.findall(r"(?:<\|image_pad\|>)+", queries[0])) == 2 and queries[0].count("<|image_pad|>") > 2
    parsed = parse_query(queries[0], prompts[0])
    assert parsed.messages[-1] == {"role": "assistant", "content": "Both are noise."}
    user = next(m for m in parsed.messages if m["role"] == "user")
    assert user["content"] == [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare the two pictures."}]
    assert not parsed.truncated


def _unscorable(rows):
    row, _ = rows[0]
    return {**row, "label": json.dumps({"reference": "noise"})}  # the prompt shows an image, the label has none


@pytest.mark.parametrize("env", ["REWARDPLUG_ON_INVALID", "REWARDPLUG_INVALID_REWARD"])  # the option, its old name
def test_unscorable_query_gets_the_on_invalid_reward_and_flag_others_scored(model, rows, use_model, monkeypatch, env):
    monkeypatch.delenv("REWARDPLUG_ON_INVALID", raising=False)
    monkeypatch.setenv(env, "-7.5")
    executor = agent.SingleTurnAgentExecutor(remote_rm_url=str(REWARD_FILE))
    with pytest.warns(DeprecationWarning) if env == "REWARDPLUG_INVALID_REWARD" else contextlib.nullcontext():
        out = rollout(executor, model.processor, _unscorable(rows), "A square.")
    assert out["reward"] == [-7.5] and out["extra_logs"]["rm_invalid"] == [1.0]
    # Several queries in one call: the bad one gets the fallback, the good one its score.
    good_row, good_images = rows[3]
    q_good = model.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question_of(good_row)}]},
         {"role": "assistant", "content": "Blue."}], tokenize=False)  # fmt: skip
    res = rp_openrlhf.reward_func([q_good, "no chat format here"], ["", ""], [good_row["label"], "x"])
    assert res["rewards"][0] == pytest.approx(want(model, question_of(good_row), "Blue.", good_images), abs=TOL)
    assert res["rewards"][1] == -7.5 and res["extra_logs"]["rm_invalid"] == [0.0, 1.0]


def test_unscorable_query_fails_by_default_naming_it(model, rows, use_model, monkeypatch, caplog):
    """on_invalid defaults to "raise", as in every adapter: OpenRLHF's own request code gets
    InvalidSampleError naming the query and the reason; its executor then leaves the reward empty (the
    step fails when rewards are gathered), and rewardplug's log says why and what to set instead."""
    monkeypatch.delenv("REWARDPLUG_ON_INVALID", raising=False)
    monkeypatch.delenv("REWARDPLUG_INVALID_REWARD", raising=False)
    executor = agent.SingleTurnAgentExecutor(remote_rm_url=str(REWARD_FILE))
    prompt, label = preprocess_data(_unscorable(rows), input_key="prompt", label_key="label",
                                    apply_chat_template=model.processor.apply_chat_template)  # fmt: skip
    query = prompt.replace("<|image_pad|>", "<|image_pad|>" * 4) + "A square.<|im_end|>"
    with pytest.raises(InvalidSampleError, match="sample 0: .*image") as info:
        asyncio.run(executor._fetch_rewards_via_func([query], [prompt], [label]))
    assert list(info.value.errors) == [0]
    with caplog.at_level("ERROR", logger="rewardplug.integrations.openrlhf"):
        out = rollout(executor, model.processor, _unscorable(rows), "A square.")
    assert out["reward"] is None and out["scores"] is None  # never a made-up number
    assert "REWARDPLUG_ON_INVALID=<float>" in caplog.text and "sample 0:" in caplog.text


def test_on_invalid_none_is_refused_because_openrlhf_cannot_mask_a_reward(rows, use_model, monkeypatch):
    monkeypatch.setenv("REWARDPLUG_ON_INVALID", "none")
    with pytest.raises(ValueError, match="no per-sample mask"):
        rp_openrlhf.reward_func(["no chat format here"], [""], ["x"])


def test_reward_file_system_failure_raises_never_a_reward(model, rows):
    engine = RewardEngine(model)
    engine.close()  # a scorer that can never score again: a system failure, not a bad sample
    rp_openrlhf.use_scorer(engine)
    try:
        executor = agent.SingleTurnAgentExecutor(remote_rm_url=str(REWARD_FILE))
        row, _ = rows[2]
        prompt, label = preprocess_data(row, input_key="prompt", label_key="label",
                                        apply_chat_template=model.processor.apply_chat_template)  # fmt: skip
        query = prompt + "Hello!<|im_end|>"
        with pytest.raises(RuntimeError):  # ScoringError is a RuntimeError
            asyncio.run(executor._fetch_rewards_via_func([query], [prompt], [label]))
        # OpenRLHF's executor logs it and leaves the reward empty (None): never a made-up 0.0.
        out = rollout(executor, model.processor, row, "Hello!")
        assert out["reward"] is None and out["scores"] is None
    finally:
        rp_openrlhf.use_scorer(None)


# ---- the /get_reward protocol logic (what the HTTP app calls), with a real engine as `score` -------------


def engine_score(engine):
    from rewardplug import InvalidSampleError

    async def score(samples):
        try:
            return await engine.ascore(samples, on_invalid="raise"), {}
        except InvalidSampleError as e:
            return e.scores, {str(i): r for i, r in e.errors.items()}  # the HTTP app's key type

    return score


def test_get_reward_with_engine_matches_model_and_flags_bad_queries(model, rows):
    queries, prompts, labels, expected = [], [], [], []
    for k, (row, images) in enumerate(rows):
        prompt, label = preprocess_data(row, input_key="prompt", label_key="label",
                                        apply_chat_template=model.processor.apply_chat_template)  # fmt: skip
        answer = f"Answer {k}."
        ids = []
        if images:  # OpenRLHF's own VLM tokenization: pad runs expanded by the processor
            from openrlhf.utils.vlm_utils import process_prompt_with_images

            ids, _, _ = process_prompt_with_images(model.processor, prompt, row["images"])
        else:
            ids = model.processor.tokenizer.encode(prompt, add_special_tokens=False)
        ids += model.processor.tokenizer.encode(answer + "<|im_end|>", add_special_tokens=False)
        queries.append(model.processor.tokenizer.decode(ids, skip_special_tokens=False))
        prompts.append(prompt)
        labels.append(label)
        expected.append(want(model, question_of(row), answer, images))
    # A bad image in one label: that query alone gets the fallback.
    queries.append(queries[0])
    prompts.append(prompts[0])
    labels.append(json.dumps({"images": ["data:image/png;base64,bm90IGFuIGltYWdl"]}))
    with RewardEngine(model) as engine:
        out = asyncio.run(get_reward({"query": queries, "prompts": prompts, "labels": labels},
                                     engine_score(engine), on_invalid=-3.0))  # fmt: skip
        # The default, on_invalid="raise": the request fails naming the bad query and why (the HTTP app: 422).
        with pytest.raises(GetRewardInvalidError) as e:
            asyncio.run(get_reward({"query": queries, "prompts": prompts, "labels": labels}, engine_score(engine)))
    assert out["rewards"][:-1] == pytest.approx(expected, abs=TOL)
    assert out["rewards"][-1] == -3.0 and out["scores"] == out["rewards"]
    assert out["extra_logs"]["rm_invalid"] == [0.0] * len(expected) + [1.0]
    assert list(out["errors"]) == [str(len(expected))] and "image" in out["errors"][str(len(expected))]
    assert list(e.value.errors) == [len(expected)] and "image" in e.value.errors[len(expected)]


def test_get_reward_on_invalid_uses_the_adapters_vocabulary_and_refuses_none():
    """/get_reward takes on_invalid as every adapter does ("raise" default, a float), refuses "none"
    (OpenRLHF cannot mask a reward); HttpSettings(invalid_reward=x) still works, deprecated."""
    from rewardplug.integrations import on_invalid as adapters_on_invalid
    from rewardplug.on_invalid import parse_on_invalid
    from rewardplug.serving.http import HttpSettings

    assert adapters_on_invalid.parse_on_invalid is parse_on_invalid
    assert HttpSettings().on_invalid == "raise"
    assert HttpSettings(on_invalid="-2.5").on_invalid == -2.5
    with pytest.raises(ValueError, match="none"):
        HttpSettings(on_invalid="none")
    with pytest.raises(ValueError, match="none"):
        asyncio.run(get_reward({"query": ["x"]}, None, on_invalid="none"))
    with pytest.warns(DeprecationWarning, match="on_invalid"):
        old = HttpSettings(invalid_reward=0.0)
    assert old.on_invalid == 0.0 and old.invalid_reward is None


def test_get_reward_malformed_body_is_a_request_error_and_system_failure_propagates(model):
    async def failing(samples):
        raise ScoringError("replica lost")

    with pytest.raises(GetRewardRequestError):
        asyncio.run(get_reward({"query": "not a list"}, failing))
    with pytest.raises(GetRewardRequestError):
        asyncio.run(get_reward({"query": ["a", "b"], "labels": ["x"]}, failing))
    q = model.processor.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}],
                                           tokenize=False)  # fmt: skip
    with pytest.raises(ScoringError):
        asyncio.run(get_reward({"query": [q]}, failing))


# ---- other policies' chat formats ------------------------------------------------------------------------


def test_llama3_and_gemma_queries_rerender_into_the_reward_models_template(model):
    im = random_image(80, 80, seed=21)
    llama = ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|>What is it?<|eot_id|>"
             "<|start_header_id|>assistant<|end_header_id|>\n\nNoise.<|eot_id|>")  # fmt: skip
    gemma = ("<bos><start_of_turn>user\n\n\n<start_of_image>" + "<image_soft_token>" * 4
             + "<end_of_image>\n\nWhat is it?<end_of_turn>\n<start_of_turn>model\nNoise.<end_of_turn>")  # fmt: skip
    expected = want(model, "What is it?", "Noise.", [im])
    for query in (llama, gemma):
        res = _score_with_model(model, [query], [[data_uri(im)]])
        assert res["rewards"] == pytest.approx([expected], abs=TOL), query[:30]
        assert res["extra_logs"]["rm_invalid"] == [0.0]


def _score_with_model(model, queries, labels):
    rp_openrlhf.use_scorer(model)
    try:
        return rp_openrlhf.reward_func(queries, [None] * len(queries), labels)
    finally:
        rp_openrlhf.use_scorer(None)


def test_example_launch_script_uses_only_flags_openrlhf_defines():
    script = (ROOT / "examples" / "openrlhf_grpo_vl.sh").read_text()
    flags = set(re.findall(r"^\s+(--[\w.]+)", script, flags=re.M))
    source = Path(agent.__file__).resolve().parent.parent.joinpath("cli", "train_ppo_ray.py").read_text()
    defined = set(re.findall(r'"(--[\w.]+)"', source))
    assert flags and flags <= defined, flags - defined


# ---- through a named pool, as the reward file finds it from the environment --------------------------------


POOL_OPTIONS = {"num_replicas": 1, "gpus_per_replica": 0, "part_samples": 2, "request_timeout_s": 77.0,
                "max_ongoing_requests": 3, "dtype": "float32", "device": "cpu"}  # fmt: skip


def test_pool_options_from_env_become_one_pool_config_and_unknown_ones_fail_naming_them(tiny_path, monkeypatch):
    monkeypatch.setenv("REWARDPLUG_MODEL", str(tiny_path))
    monkeypatch.setenv("REWARDPLUG_POOL", "p")
    monkeypatch.setenv("REWARDPLUG_POOL_OPTIONS", json.dumps({"num_replica": 1, "bogus": 2}))
    with pytest.raises(TypeError, match=r"\['bogus', 'num_replica'\]"):  # before any cluster is touched
        rp_openrlhf.scorer_from_env()
    monkeypatch.delenv("REWARDPLUG_MODEL")  # attach to a running pool: only a handle's options
    monkeypatch.setenv("REWARDPLUG_POOL_OPTIONS", json.dumps({"num_replicas": 1, "request_timeout_s": 5}))
    with pytest.raises(TypeError, match=r"\['num_replicas'\] describe a pool to make"):
        rp_openrlhf.scorer_from_env()
    with pytest.raises(TypeError, match="PoolConfig or a running RewardPool"):
        rp_openrlhf.use_pool({"model": str(tiny_path)})


@pytest.mark.timeout(600)
def test_reward_file_scores_through_named_pool_from_env(model, tiny_path, rows, monkeypatch):
    ray = pytest.importorskip("ray")
    from rewardplug import RewardPool

    monkeypatch.setenv("REWARDPLUG_MODEL", str(tiny_path))
    monkeypatch.setenv("REWARDPLUG_POOL", "openrlhf-test-pool")
    monkeypatch.setenv("REWARDPLUG_POOL_OPTIONS", json.dumps(POOL_OPTIONS))
    rp_openrlhf.use_scorer(None)
    ray.init(num_cpus=2, include_dashboard=False, namespace="rewardplug-openrlhf-test")
    try:
        executor = agent.SingleTurnAgentExecutor(remote_rm_url=str(REWARD_FILE))
        for k, (row, images) in enumerate(rows[:2]):
            out = rollout(executor, model.processor, row, f"Pool answer {k}.")
            assert out["reward"] == pytest.approx([want(model, question_of(row), f"Pool answer {k}.", images)], abs=TOL)
            assert out["extra_logs"]["rm_invalid"] == [0.0]
        handle = rp_openrlhf._current_scorer()
        assert isinstance(handle, RewardPool)
        assert (handle.config.part_samples, handle.config.request_timeout_s) == (2, 77.0)
        pool = RewardPool.connect("openrlhf-test-pool")
        assert pool.config.max_ongoing_requests == 3  # the pool was made with the options' bound

        # use_pool: the same pool as one PoolConfig (another handle timeout); opened on the first call
        config = PoolConfig.from_kwargs(tiny_path, name="openrlhf-test-pool",
                                        **{**POOL_OPTIONS, "request_timeout_s": 55.0})  # fmt: skip
        rp_openrlhf.use_pool(config)
        row, images = rows[3]
        out = rollout(executor, model.processor, row, "Green.")
        assert out["reward"] == pytest.approx([want(model, question_of(row), "Green.", images)], abs=TOL)
        assert rp_openrlhf._current_scorer().config == config
        pool.shutdown()
    finally:
        rp_openrlhf.use_scorer(None)
        ray.shutdown()
