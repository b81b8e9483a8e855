"""rewardplug as TRL reward_funcs: real GRPOTrainer / RLOOTrainer runs on the CPU with tiny policies."""

from __future__ import annotations

import logging
import math
import multiprocessing
import pickle
import sys
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from rewardplug import InvalidSampleError, RewardEngine, RewardModel, RewardPool
from rewardplug.errors import ScoringError
from rewardplug.integrations.trl import AsyncRewardFunction, RewardFunction, default_pool_name, rank_device
from rewardplug.serving.config import PoolConfig

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))

import common  # noqa: E402  (examples/common.py)

NAME = "skywork_vl_reward"


class Recording:
    """Wraps a reward function's class to keep every call's samples and the scores it returned."""

    def __init__(self, reward):
        self.calls = []  # (samples, returned values)
        self.completion_ids = []  # per call, what TRL passed
        original = type(reward).__call__
        owner = self

        if isinstance(reward, AsyncRewardFunction):

            class Recorded(type(reward)):
                async def __call__(self, prompts, completions, completion_ids=None, **kw):
                    out = await original(self, prompts, completions, completion_ids, **kw)
                    owner.calls.append((self.samples(prompts, completions, **kw), list(out)))
                    owner.completion_ids.append(completion_ids)
                    return out
        else:

            class Recorded(type(reward)):
                def __call__(self, prompts, completions, completion_ids=None, **kw):
                    out = original(self, prompts, completions, completion_ids, **kw)
                    owner.calls.append((self.samples(prompts, completions, **kw), list(out)))
                    owner.completion_ids.append(completion_ids)
                    return out

        reward.__class__ = Recorded


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    work = tmp_path_factory.mktemp("trl")
    policy, reward = common.tiny_paths(work)
    text_policy, _ = common.tiny_paths(work, text_policy=True)
    return {"policy": policy, "text_policy": text_policy, "reward": reward, "work": work}


@pytest.fixture(scope="module")
def reference(paths):
    """An independent RewardModel, for scoring what TRL sent."""
    return RewardModel.from_pretrained(paths["reward"], image_roots=None)


def _trainer(trainer_name: str, policy: str, reward, dataset, work: Path, steps: int = 2, others=(),
             callbacks=None, **config_options):  # fmt: skip
    import trl

    config_cls = getattr(trl, f"{trainer_name}Config")
    trainer_cls = getattr(trl, f"{trainer_name}Trainer")
    config = config_cls(
        output_dir=str(work / trainer_name), per_device_train_batch_size=4, num_generations=4,
        max_completion_length=10, max_steps=steps, learning_rate=1e-4, logging_steps=1, report_to="none",
        use_cpu=True, bf16=False, save_strategy="no", seed=0, **config_options,
    )  # fmt: skip
    return trainer_cls(model=policy, reward_funcs=[*others, reward], args=config, train_dataset=dataset,
                       callbacks=callbacks)  # fmt: skip


def _train(trainer_name: str, policy: str, reward, dataset, work: Path, steps: int = 2, **options):
    trainer = _trainer(trainer_name, policy, reward, dataset, work, steps, **options)
    trainer.train()
    return trainer


def _check_logged_rewards(trainer, recording: Recording, reference: RewardModel, steps: int = 2):
    """TRL's logged rewards equal the plugin's scores, which equal independent scoring."""
    assert len(recording.calls) == steps
    logged = [h[f"rewards/{NAME}/mean"] for h in trainer.state.log_history if f"rewards/{NAME}/mean" in h]
    assert len(logged) == steps
    for (samples, returned), step_mean in zip(recording.calls, logged):
        independent = [reference.score([s])[0] for s in samples]
        assert returned == pytest.approx(independent, abs=1e-4)
        assert step_mean == pytest.approx(sum(independent) / len(independent), abs=1e-4)
    per_completion = list(trainer._logs["rewards"][NAME])[-len(recording.calls[-1][1]) :]
    assert per_completion == pytest.approx(recording.calls[-1][1], abs=1e-5)


def test_grpo_with_engine_logs_the_plugins_scores(paths, reference):
    reward = common.build_reward(paths["reward"])
    rec = Recording(reward)
    trainer = _train("GRPO", paths["policy"], reward, common.image_dataset(), paths["work"])
    _check_logged_rewards(trainer, rec, reference)
    samples = rec.calls[0][0]
    assert all(len(s["images"]) == 1 for s in samples)  # the image column came through
    # Per-completion raw scores and flags in TRL's completions table (log_extra; it keeps the last batch).
    extra = trainer._logs["extra"]
    returned = rec.calls[-1][1]
    assert list(extra[f"{NAME}/raw_score"]) == pytest.approx(returned, abs=1e-6)
    assert list(extra[f"{NAME}/invalid"]) == [False] * len(returned)
    assert len(extra[f"{NAME}/truncated"]) == len(returned)
    # Engine figures are per-step changes, not running totals: each step scored 4 samples.
    per_step = [h[f"{NAME}/samples"] for h in trainer.state.log_history if f"{NAME}/samples" in h]
    assert per_step == [4.0, 4.0]
    # raw_std is TRL's own std of this function's rewards (sample std, n - 1), step by step; no bad samples.
    steps = [h for h in trainer.state.log_history if f"{NAME}/raw_std" in h]
    assert len(steps) == 2
    for h in steps:
        assert h[f"{NAME}/raw_std"] == pytest.approx(h[f"rewards/{NAME}/std"], rel=1e-4)
        assert h[f"{NAME}/invalid_count"] == 0.0
    vision = [h[f"{NAME}/vision_hit_rate"] for h in trainer.state.log_history if f"{NAME}/vision_hit_rate" in h]
    assert len(vision) == 2 and all(0.0 <= v <= 1.0 for v in vision)
    reward.scorer.close()


def test_grpo_async_reward_function(paths, reference):
    reward = common.build_reward(paths["reward"], async_reward=True)
    rec = Recording(reward)
    trainer = _train("GRPO", paths["policy"], reward, common.image_dataset(), paths["work"])
    _check_logged_rewards(trainer, rec, reference)
    reward.scorer.close()


def test_grpo_text_only_policy(paths, reference):
    reward = common.build_reward(paths["reward"])
    rec = Recording(reward)
    trainer = _train("GRPO", paths["text_policy"], reward, common.text_dataset(), paths["work"])
    _check_logged_rewards(trainer, rec, reference)
    assert all(not s["images"] for s in rec.calls[0][0])
    reward.scorer.close()


def test_rloo_logs_the_plugins_scores(paths, reference):
    reward = common.build_reward(paths["reward"])
    rec = Recording(reward)
    trainer = _train("RLOO", paths["policy"], reward, common.image_dataset(), paths["work"])
    _check_logged_rewards(trainer, rec, reference)
    reward.scorer.close()


# ---- system failures, mixing, the policy's end-of-turn ids: real trainers ------------------------------


CUDA_ERROR = "CUDA error: an illegal memory access was encountered"


@pytest.mark.parametrize("scorer_kind", ["model", "engine"])
def test_grpo_device_error_fails_the_step_with_scoring_error(paths, scorer_kind):
    """A reward model whose forward raises a device error: the GRPO step fails with ScoringError (the
    cause kept); the reward function never hands TRL a value, so no None is masked into training."""
    rm = RewardModel.from_pretrained(paths["reward"], image_roots=None)

    def broken_device(module, args, kwargs):
        raise RuntimeError(CUDA_ERROR)

    rm.backbone.language_model.register_forward_pre_hook(broken_device, with_kwargs=True)
    scorer = RewardEngine(rm) if scorer_kind == "engine" else rm
    reward = RewardFunction(scorer, name=NAME)
    rec = Recording(reward)
    trainer = _trainer("GRPO", paths["text_policy"], reward, common.text_dataset(), paths["work"])
    with pytest.raises(ScoringError) as info:
        trainer.train()
    chain, error = [], info.value
    while error is not None:
        chain.append(str(error))
        error = error.__cause__
    assert any(CUDA_ERROR in text for text in chain)
    assert rec.calls == []  # nothing was returned to TRL
    assert trainer.state.global_step == 0
    if scorer_kind == "engine":
        scorer.close()


def test_async_function_device_error_raises_scoring_error(paths):
    import asyncio

    def broken_device(module, args, kwargs):
        raise RuntimeError(CUDA_ERROR)

    rm = RewardModel.from_pretrained(paths["reward"], image_roots=None)
    rm.backbone.language_model.register_forward_pre_hook(broken_device, with_kwargs=True)
    with RewardEngine(rm) as engine:
        for scorer in (rm, engine):
            with pytest.raises(ScoringError, match="CUDA error"):
                asyncio.run(AsyncRewardFunction(scorer)(prompts=["a"], completions=["x"]))


def _long_prompts(n: int = 8):
    from datasets import Dataset

    long = "Describe in detail, with every colour and every shape you can think of, " * 5
    return Dataset.from_dict({"prompt": [[{"role": "user", "content": f"{long} ({i})"}] for i in range(n)]})


def length_reward(completions, **kwargs):
    """A rule-based reward: a tenth of the completion's length in characters."""
    return [len(c[0]["content"]) / 10 for c in completions]


def test_grpo_mixed_with_a_rule_reward_warns_once_that_none_counts_as_zero(paths, caplog):
    """Every sample is over the reward model's max_length (a bad sample): the reward function returns
    None, the rule reward scores the rows, TRL sums with nansum (None counts as 0): one warning."""
    engine = RewardEngine(RewardModel.from_pretrained(paths["reward"], image_roots=None, max_length=120))
    reward = RewardFunction(engine, name=NAME, on_invalid="none")
    rec = Recording(reward)
    with caplog.at_level(logging.WARNING, logger="rewardplug.integrations.trl"):
        trainer = _train("GRPO", paths["text_policy"], reward, _long_prompts(), paths["work"], others=[length_reward])
    assert all(v is None for _, out in rec.calls for v in out)
    counts = [h[f"{NAME}/invalid_count"] for h in trainer.state.log_history if f"{NAME}/invalid_count" in h]
    assert counts == [4.0, 4.0]  # every row of each step, as a count (and invalid_frac 1.0)
    warnings = [r for r in caplog.records if "other reward function" in r.getMessage()]
    assert len(warnings) == 1 and "on_invalid=<float>" in warnings[0].getMessage()
    for h in (h for h in trainer.state.log_history if "reward" in h and "rewards/length_reward/mean" in h):
        assert h["reward"] == pytest.approx(h["rewards/length_reward/mean"], abs=1e-6)  # the RM added 0
    assert list(trainer._logs["extra"][f"{NAME}/invalid"]) == [True] * 4

    # With a fixed fallback, the rows get that value and there is nothing to warn about.
    caplog.clear()
    reward = RewardFunction(engine, name=NAME, on_invalid=-1.0)
    rec = Recording(reward)
    with caplog.at_level(logging.WARNING, logger="rewardplug.integrations.trl"):
        trainer = _train("GRPO", paths["text_policy"], reward, _long_prompts(), paths["work"], others=[length_reward])
    assert all(v == -1.0 for _, out in rec.calls for v in out)
    assert not [r for r in caplog.records if "other reward function" in r.getMessage()]
    for h in (h for h in trainer.state.log_history if "rewards/length_reward/mean" in h):
        assert h["reward"] == pytest.approx(h["rewards/length_reward/mean"] - 1.0, abs=1e-5)
    engine.close()


def test_grpo_default_on_invalid_fails_the_step_naming_the_bad_samples(paths, caplog):
    """The default on_invalid="raise" (the same in every adapter): a bad sample fails the GRPO step with
    InvalidSampleError naming each sample and its reason, and the log says what to choose instead."""
    engine = RewardEngine(RewardModel.from_pretrained(paths["reward"], image_roots=None, max_length=120))
    reward = RewardFunction(engine, name=NAME)
    assert reward.on_invalid == "raise"
    trainer = _trainer("GRPO", paths["text_policy"], reward, _long_prompts(), paths["work"])
    with caplog.at_level(logging.ERROR, logger="rewardplug.integrations.trl"), pytest.raises(InvalidSampleError) as info:
        trainer.train()
    assert sorted(info.value.errors) == [0, 1, 2, 3] and "max_length" in str(info.value)
    assert trainer.state.global_step == 0
    assert "RewardFunction(on_invalid=<float>)" in caplog.text and "sample 0:" in caplog.text
    engine.close()


LLAMA3_TEMPLATE = (
    "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def make_llama_style_policy(path: Path) -> tuple[Path, int, int]:
    """A tiny random Llama policy with Llama-3 style turns: its end-of-turn id (<|eot_id|>) and pad id
    (<|end_of_text|>) are not the reward model's <|im_end|> / <|endoftext|>."""
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    from rewardplug.testing import make_tiny_text_policy

    make_tiny_text_policy(path)
    tok = AutoTokenizer.from_pretrained(path)
    tok.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                                                         "<|end_of_text|>"]})  # fmt: skip
    tok.eos_token, tok.pad_token, tok.chat_template = "<|eot_id|>", "<|end_of_text|>", LLAMA3_TEMPLATE
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         bos_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)  # fmt: skip
    torch.manual_seed(3)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    for old in path.glob("*.safetensors"):
        old.unlink()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path, tok.eos_token_id, tok.pad_token_id


def test_grpo_non_qwen_policy_truncation_judged_with_the_policys_end_ids(paths, model):
    policy, eos, pad = make_llama_style_policy(paths["work"] / "llama-policy")
    rm_end_ids = {model.processor.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}
    assert eos not in rm_end_ids and pad not in rm_end_ids
    engine = RewardEngine(RewardModel.from_pretrained(paths["reward"], image_roots=None))
    reward = RewardFunction(engine, name=NAME)
    rec = Recording(reward)
    # A bias on <|eot_id|> makes the random policy end some completions and run others to the limit.
    trainer = _train("GRPO", str(policy), reward, common.text_dataset(), paths["work"],
                     generation_kwargs={"sequence_bias": [[[eos], 4.0]]})  # fmt: skip
    ids = [c for call in rec.completion_ids for c in call]
    expected = [c[-1] not in (eos, pad) for c in ids]
    assert any(expected) and not all(expected)  # both kinds occurred
    assert list(trainer._logs["extra"][f"{NAME}/truncated"]) == expected[-4:]  # TRL keeps the last batch
    # Our fraction is TRL's own clipped_ratio, step by step.
    history = [h for h in trainer.state.log_history if f"{NAME}/truncated_frac" in h]
    assert len(history) == 2
    for h in history:
        assert h[f"{NAME}/truncated_frac"] == pytest.approx(h["completions/clipped_ratio"], abs=1e-6)
    engine.close()


def test_async_grpo_rollout_worker_scores_a_group_and_logs_without_log_metric(paths, reference):
    """trl.experimental.async_grpo's own rollout loop scores a group with the function (no log_metric,
    no trainer): rewards are the model's, and the figures go to log_to, truncation judged with the
    policy's ids given as eos_token_ids."""
    pytest.importorskip("aiohttp")
    from transformers import AutoTokenizer
    from trl.experimental.async_grpo.async_rollout_worker import RolloutGroup, TrainingSequence, _AsyncRolloutLoop

    tok = AutoTokenizer.from_pretrained(paths["text_policy"])
    tok.response_schema = {"type": "object"}  # only for parsing tool calls, which this group has none of
    from accelerate.state import PartialState

    PartialState()  # as TRL's rollout child does before building the loop (its logger needs it)
    ctx = multiprocessing.get_context("spawn")
    figures = []
    engine = RewardEngine(RewardModel.from_pretrained(paths["reward"], image_roots=None))
    reward = AsyncRewardFunction(engine, name=NAME, eos_token_ids=[tok.eos_token_id, tok.pad_token_id],
                                 log_to=lambda k, v: figures.append((k, v)))  # fmt: skip
    loop = _AsyncRolloutLoop(
        model_name="policy", dataset=common.text_dataset(), reward_funcs=[reward], processing_class=tok,
        eos_token_ids=[tok.eos_token_id], rollout_buffer=ctx.Queue(), model_version_value=ctx.Value("i", 0),
        heartbeat_value=ctx.Value("d", 0.0), failed_event=ctx.Event(), exception_info_queue=ctx.Queue(maxsize=1),
        metrics_queue=ctx.Queue(), num_generations=2,
    )  # fmt: skip
    answers = ["Blue.", "Green, I think"]
    ids = [tok.encode(answers[0]) + [tok.eos_token_id], tok.encode(answers[1])]  # the second hit the limit
    group = RolloutGroup(
        prompts=[[{"role": "user", "content": "Sky?"}]] * 2, reward_kwargs={},
        completions=[[{"role": "assistant", "content": a}] for a in answers], completions_ids=ids,
        completions_sequences=[[TrainingSequence(i, [1] * len(i), [0.0] * len(i), f"r{k}")] for k, i in enumerate(ids)],
        tool_call_counts=[0, 0], tool_failure_counts=[0, 0], model_version=0, group_id=0,
        env_rewards=[None, None], rollout_rewards=[None, None],
    )  # fmt: skip
    try:
        samples = loop._loop.run_until_complete(loop._score_group(group))
    finally:
        engine.close()
    expected = reference.score([{"prompt": "Sky?", "completion": a} for a in answers])
    assert [s.metrics[f"rewards/{NAME}"] for s in samples] == pytest.approx(expected, abs=1e-5)
    logged = dict(figures)
    assert logged[f"{NAME}/truncated_frac"] == 0.5 and logged[f"{NAME}/invalid_frac"] == 0.0
    assert logged[f"{NAME}/raw_mean"] == pytest.approx(sum(expected) / 2, abs=1e-5)


# ---- the call contract, with TRL-shaped arguments --------------------------------------------------


def _trl_kwargs(images, logged):
    return {"image": images, "trainer_state": None, "log_metric": lambda k, v: logged.append((k, v)),
            "log_extra": lambda *a: None, "data_source": ["a", "b"] * (len(images) // 2)}  # fmt: skip


def test_contract_conversational_embedded_images_not_counted_twice(model, images):
    reward = RewardFunction(model)
    assert not isinstance(reward, torch.nn.Module) and reward.__name__ == "reward_model"
    from trl.data_utils import prepare_multimodal_messages

    prompt = [{"role": "user", "content": "What is it?"}]
    prompts = [prepare_multimodal_messages(prompt, images=[images[0]]) for _ in range(2)]  # as TRL sends them
    completions = [[{"role": "assistant", "content": "A picture."}], [{"role": "assistant", "content": "Noise."}]]
    logged = []
    out = reward(prompts=prompts, completions=completions, completion_ids=[[1, 2], [3, 4]],
                 **_trl_kwargs([images[0], images[0]], logged))  # fmt: skip
    expected = model.score([{"prompt": "What is it?", "completion": c[0]["content"], "images": [images[0]]}
                            for c in completions])  # fmt: skip
    assert out == pytest.approx(expected, abs=1e-5)
    names = {k for k, _ in logged}
    assert {"reward_model/latency_ms", "reward_model/invalid_frac", "reward_model/raw_mean"} <= names


def test_contract_standard_strings_and_several_images(model, images):
    reward = RewardFunction(model, name="rm")
    out = reward(prompts=["Compare the two.", "Just text."], completions=["Left.", "Fine."],
                 images=[[images[0], images[1]], []])  # fmt: skip
    expected = model.score([{"prompt": "Compare the two.", "completion": "Left.", "images": images[:2]},
                            {"prompt": "Just text.", "completion": "Fine."}])  # fmt: skip
    assert out == pytest.approx(expected, abs=1e-5)


def test_invalid_sample_on_invalid_none_raise_or_fallback(model, images):
    bad = b"not an image"
    kwargs = {"images": [[images[0]], [bad]]}
    good = model.score([{"prompt": "a", "completion": "x", "images": [images[0]]}])[0]
    out = RewardFunction(model, on_invalid="none")(prompts=["a", "b"], completions=["x", "y"], **kwargs)
    assert out[1] is None and out[0] == pytest.approx(good, abs=1e-5)
    with pytest.raises(InvalidSampleError, match="sample 1: image 0"):  # the default, as in every adapter
        RewardFunction(model)(prompts=["a", "b"], completions=["x", "y"], **kwargs)
    fallback = RewardFunction(model, on_invalid=-2.5)(prompts=["a", "b"], completions=["x", "y"], **kwargs)
    assert fallback[1] == -2.5 and fallback[0] == pytest.approx(good, abs=1e-5)
    with pytest.raises(ValueError, match="on_invalid"):
        RewardFunction(model, on_invalid="skip")


def test_on_error_is_a_deprecated_alias_of_on_invalid(model, images):
    with pytest.warns(DeprecationWarning, match="on_invalid"):
        reward = RewardFunction(model, on_error="raise")
    assert reward.on_invalid == "raise"
    with pytest.raises(InvalidSampleError):
        reward(prompts=["a"], completions=["x"], images=[[b"not an image"]])


def test_fallback_reward_is_not_normalized(model, images):
    reward = RewardFunction(model, on_invalid=-1.0, normalize="running")
    out = reward(prompts=["a", "b", "c"], completions=["x", "yy", "z z"], images=[[], [b"bad"], []])
    raw = model.score([{"prompt": "a", "completion": "x"}, {"prompt": "c", "completion": "z z"}])
    mean, std = sum(raw) / 2, abs(raw[0] - raw[1]) / math.sqrt(2)
    assert out[1] == -1.0
    assert [out[0], out[2]] == pytest.approx([(v - mean) / (std + 1e-6) for v in raw], abs=1e-4)


def test_truncation_uses_the_given_policy_end_ids(model):
    eos = 7  # a policy whose end-of-turn id is 7: nothing to do with the reward model's tokenizer
    args = dict(prompts=["a", "b"], completions=["cut off", "done"], completion_ids=[[5, 6], [8, eos]])
    scored = RewardFunction(model, eos_token_ids=[eos])(**args)
    assert None not in scored
    assert RewardFunction(model, truncated="none", eos_token_ids=[eos])(**args)[0] is None
    penalized = RewardFunction(model, truncated=-5.0, eos_token_ids=[eos])(**args)
    assert penalized[0] == -5.0 and penalized[1] == pytest.approx(scored[1])
    logged, extra = [], {}
    RewardFunction(model, eos_token_ids=[eos])(**args, log_metric=lambda k, v: logged.append((k, v)),
                                               log_extra=lambda c, v: extra.setdefault(c, v))  # fmt: skip
    assert ("reward_model/truncated_frac", 0.5) in logged
    assert extra["reward_model/truncated"] == [True, False] and extra["reward_model/invalid"] == [False, False]


def test_truncation_not_judged_without_policy_ids(model, caplog):
    im_end = model.processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    args = dict(prompts=["a"], completions=["done"], completion_ids=[[5, im_end]])
    logged = []
    with caplog.at_level(logging.WARNING, logger="rewardplug.integrations.trl"):
        RewardFunction(model)(**args, log_metric=lambda k, v: logged.append(k))
    assert "reward_model/truncated_frac" not in logged and "eos_token_ids" in caplog.text
    with pytest.raises(ValueError, match="eos_token_ids"):
        RewardFunction(model, truncated="none")(**args)


def test_running_normalization_per_source_and_clip(model):
    reward = RewardFunction(model, normalize="running", normalize_by="data_source", clip=1.5)
    prompts, completions = ["q"] * 4, ["a", "bb b", "ccc cc", "d d d d d d"]
    raw = model.score([{"prompt": p, "completion": c} for p, c in zip(prompts, completions)])
    out = reward(prompts=prompts, completions=completions, data_source=["x", "x", "y", "y"])
    for pair, got in (((raw[0], raw[1]), out[:2]), ((raw[2], raw[3]), out[2:])):
        mean, std = sum(pair) / 2, abs(pair[0] - pair[1]) / math.sqrt(2)
        expected = [max(-1.5, min(1.5, (v - mean) / (std + 1e-6))) for v in pair]
        assert got == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("normalize", [None, "running"])
def test_clip_low_high_clips_both_bounds(model, normalize):
    """clip=(low, high), asymmetric, with values beyond each bound: the lowest is raised to low, the
    highest lowered to high, the ones between pass unchanged (after normalization when asked)."""
    prompts, completions = ["q"] * 4, ["a", "bb b", "ccc cc", "d d d d d d"]
    raw = model.score([{"prompt": p, "completion": c} for p, c in zip(prompts, completions)])
    unclipped = RewardFunction(model, normalize=normalize)(prompts=prompts, completions=completions)
    order = sorted(range(4), key=lambda i: unclipped[i])
    lo, hi = unclipped[order[0]], unclipped[order[-1]]
    assert len(set(raw)) == 4 and lo < unclipped[order[1]] < unclipped[order[2]] < hi
    low = unclipped[order[0]] + (unclipped[order[1]] - unclipped[order[0]]) / 3  # between the lowest two
    high = unclipped[order[2]] + (unclipped[order[3]] - unclipped[order[2]]) / 2  # between the highest two
    assert abs(low) != pytest.approx(abs(high))  # asymmetric: (-c, c) would not pass
    out = RewardFunction(model, normalize=normalize, clip=(low, high))(prompts=prompts, completions=completions)
    expected = list(unclipped)
    expected[order[0]], expected[order[-1]] = low, high
    assert out == pytest.approx(expected, abs=1e-6)
    # A float c clips to [-c, c]: both bounds again.
    c = min(abs(lo), abs(hi)) / 2
    out = RewardFunction(model, normalize=normalize, clip=c)(prompts=prompts, completions=completions)
    assert out == pytest.approx([max(-c, min(c, v)) for v in unclipped], abs=1e-6)


def test_engine_figures_are_changes_since_the_previous_call(model, images):
    """TRL averages what it is given per step: the engine's counters are logged as per-call changes."""
    with RewardEngine(model) as engine:
        reward = RewardFunction(engine)
        logged = []
        log = lambda k, v: logged.append((k, v))  # noqa: E731
        kwargs = dict(prompts=["What?", "What?"], completions=["A.", "B."], images=[[images[0]], [images[0]]])
        reward(**kwargs, log_metric=log)
        first = dict(logged)
        logged.clear()
        reward(**kwargs, log_metric=log)
        second = dict(logged)
        assert first["reward_model/samples"] == 2.0 and second["reward_model/samples"] == 2.0
        # The picture was seen in the first call; the second call's lookups all hit.
        assert second["reward_model/vision_hit_rate"] == 1.0
        assert second["reward_model/vision_hits"] == engine.stats()["vision_hits"] - first["reward_model/vision_hits"]


def test_without_log_metric_figures_go_to_log_to_or_logging(model, caplog):
    """AsyncGRPOTrainer's rollout worker passes no log_metric: figures are averaged over log_every
    calls and sent to log_to, else to one logging line."""
    got = []
    reward = RewardFunction(model, log_every=2, log_to=lambda k, v: got.append((k, v)))
    reward(prompts=["a"], completions=["x"])
    assert got == []
    reward(prompts=["b"], completions=["y y"])
    figures = dict(got)
    raw = model.score([{"prompt": "a", "completion": "x"}, {"prompt": "b", "completion": "y y"}])
    assert figures["reward_model/raw_mean"] == pytest.approx(sum(raw) / 2, abs=1e-5)
    assert figures["reward_model/invalid_frac"] == 0.0
    with caplog.at_level(logging.INFO, logger="rewardplug.integrations.trl"):
        RewardFunction(model, name="rm")(prompts=["a"], completions=["x"])
    assert "rm: latency_ms=" in caplog.text and "raw_mean=" in caplog.text


def test_default_pool_name_is_the_same_for_the_same_model_and_options():
    a = default_pool_name("org/model", {"num_replicas": 2, "image_roots": None})
    assert a == default_pool_name("org/model", {"image_roots": None, "num_replicas": 2})
    assert a.startswith("rewardplug-") and len(a) == len("rewardplug-") + 12
    assert a != default_pool_name("org/model", {"num_replicas": 1, "image_roots": None})
    assert a != default_pool_name("org/other", {"num_replicas": 2, "image_roots": None})


def test_a_nameless_pool_config_gets_the_name_its_options_as_keywords_get():
    from rewardplug.integrations.trl import shared_config

    keywords = {"num_replicas": 2, "gpus_per_replica": 0.5, "request_timeout_s": 120.0, "autoscale": (1, 4),
                "image_roots": None, "dtype": "bfloat16", "max_wait_ms": 2.0}  # fmt: skip
    config = PoolConfig.from_kwargs("org/model", **keywords)
    assert shared_config(config).name == default_pool_name("org/model", keywords)
    assert shared_config(config.with_(name="mine")).name == "mine"
    assert shared_config(config.with_(part_samples=8)).name != shared_config(config).name


def test_rank_device_is_this_ranks_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert rank_device() == "cuda:3"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # the launcher shows each rank its own GPU
    assert rank_device() == "cuda:0"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert rank_device() == "cpu"


def test_model_id_without_pool_builds_an_engine_on_this_ranks_device(paths, reference):
    reward = RewardFunction(paths["reward"], pool_name=None, image_roots=None, max_wait_ms=1.0)
    try:
        assert isinstance(reward.scorer, RewardEngine) and str(reward.scorer.model.device) == rank_device()
        out = reward(prompts=["Sky?"], completions=["Blue."])
        assert out == pytest.approx(reference.score([{"prompt": "Sky?", "completion": "Blue."}]), abs=1e-5)
    finally:
        reward.close()
    with pytest.raises(TypeError, match="model id"):
        RewardFunction(reference, num_replicas=2)


def test_engine_backed_function_refuses_to_pickle(model):
    with RewardEngine(model) as engine:
        with pytest.raises(TypeError, match="RewardPool"):
            pickle.dumps(RewardFunction(engine))


# ---- with a Ray pool ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=4, namespace="rewardplug", log_to_driver=False, include_dashboard=False)
    yield ray
    ray.shutdown()


def _score_in_spawned_process(payload: bytes, samples, queue):
    reward = pickle.loads(payload)  # connects to the pool's cluster
    queue.put(reward(prompts=[s["prompt"] for s in samples], completions=[s["completion"] for s in samples]))


def test_pool_backed_grpo_and_pickle_round_trip(ray_cluster, paths, reference):
    reward = common.build_reward(paths["reward"], use_pool=True)
    rec = Recording(reward)
    trainer = _train("GRPO", paths["policy"], reward, common.image_dataset(), paths["work"])
    _check_logged_rewards(trainer, rec, reference)
    # Step N logs step N's pool counters (asked of the replica after the answer: not a step late).
    logged = [h for h in trainer.state.log_history if f"{NAME}/samples" in h]
    assert [h[f"{NAME}/samples"] for h in logged] == [4.0, 4.0]
    assert logged[0][f"{NAME}/batches"] >= 1 and logged[0][f"{NAME}/vision_misses"] >= 1  # step 1's first image

    # As TRL's AsyncGRPOTrainer does: the function crosses into a spawned process without CUDA.
    function = RewardFunction(reward.scorer, name=NAME)
    samples = [{"prompt": "Hello?", "completion": "Hi there."}, {"prompt": "Sky?", "completion": "Blue."}]
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_score_in_spawned_process, args=(pickle.dumps(function), samples, queue))
    proc.start()
    got = queue.get(timeout=180)
    proc.join(60)
    assert got == pytest.approx(reference.score(samples), abs=1e-4)
    reward.scorer.shutdown()


def test_model_id_string_builds_one_named_pool(ray_cluster, paths, reference):
    options = dict(num_replicas=1, gpus_per_replica=0, image_roots=None)
    reward = RewardFunction(paths["reward"], **options)
    try:
        assert reward.scorer.name == default_pool_name(paths["reward"], options)
        out = reward(prompts=["Sky?"], completions=["Blue."])
        assert out == pytest.approx(reference.score([{"prompt": "Sky?", "completion": "Blue."}]), abs=1e-4)
        # A second function (as another rank would make) finds the same pool and its one replica.
        again = RewardFunction(paths["reward"], **options)
        assert again.scorer.name == reward.scorer.name
        assert again(prompts=["Sky?"], completions=["Blue."]) == pytest.approx(out, abs=1e-6)
        assert len(again.scorer.stats()["replicas"]) == 1
        again.close()
    finally:
        reward.scorer.shutdown()


def test_unknown_options_fail_with_one_type_error_naming_them(paths, model):
    with pytest.raises(TypeError, match=r"\['bogus', 'num_replica'\]"):  # before any cluster is touched
        RewardFunction(paths["reward"], num_replica=2, bogus=1)
    with pytest.raises(TypeError, match=r"in this process.*\['num_replicas'\]"):
        RewardFunction(paths["reward"], pool_name=None, num_replicas=2)
    with pytest.raises(TypeError, match=r"\['num_replicas'\] belong in the pool's PoolConfig"):
        RewardFunction(pool=PoolConfig(model=paths["reward"]), num_replicas=2)
    with pytest.raises(TypeError, match="one of them"):
        RewardFunction(model, pool=PoolConfig(model=paths["reward"]))
    with pytest.raises(TypeError, match="PoolConfig or a running RewardPool"):
        RewardFunction(pool={"model": paths["reward"]})


def test_pool_config_reaches_the_pool_under_the_keyword_paths_default_name(ray_cluster, paths, reference):
    keywords = dict(num_replicas=1, gpus_per_replica=0, part_samples=2, request_timeout_s=77.0,
                    max_ongoing_requests=3, image_roots=None)  # fmt: skip
    config = PoolConfig(model=paths["reward"], num_replicas=1, gpus_per_replica=0, part_samples=2,
                        request_timeout_s=77.0, max_ongoing_requests=3,
                        model_options={"image_roots": None})  # fmt: skip
    reward = RewardFunction(pool=config, name=NAME)
    try:
        pool = reward.scorer
        assert pool.name == default_pool_name(paths["reward"], keywords)  # ranks passing keywords attach to it
        assert pool.config == config.with_(name=pool.name)
        assert RewardPool.connect(pool.name).config.max_ongoing_requests == 3  # what its replicas were made with
        def engine_requests():  # calls the replicas' engines took
            return sum(r["engine"]["requests"] for r in pool.stats(fresh=True)["replicas"])

        before = engine_requests()
        samples = [{"prompt": f"Question {i}?", "completion": f"Answer {i}."} for i in range(6)]
        out = reward(prompts=[s["prompt"] for s in samples], completions=[s["completion"] for s in samples])
        assert out == pytest.approx(reference.score(samples), abs=1e-5)
        assert engine_requests() - before == 3  # 6 lone samples, part_samples=2
    finally:
        reward.scorer.shutdown()


class EventRecorder(TrainerCallback):
    """Writes the trainer's step events into a shared list (to see where the pool calls fall)."""

    def __init__(self, events):
        self.events = events

    def on_step_begin(self, args, state, control, **kw):
        self.events.append("step_begin")

    def on_pre_optimizer_step(self, args, state, control, **kw):
        self.events.append("pre_optimizer_step")

    def on_optimizer_step(self, args, state, control, **kw):
        self.events.append("optimizer_step")


def test_colocation_callback_offloads_for_the_optimizer_step_only(ray_cluster, paths, reference):
    from rewardplug import RewardPool
    from rewardplug.integrations.trl import PoolColocationCallback

    pool = RewardPool(paths["reward"], name="trl-colocation-test", num_replicas=1, gpus_per_replica=0,
                      image_roots=None)  # fmt: skip
    events = []
    for method in ("offload", "onload"):
        original = getattr(pool, method)
        setattr(pool, method, lambda *a, _m=method, _f=original, **k: (events.append(_m), _f(*a, **k))[1])
    try:
        reward = RewardFunction(pool, name=NAME)
        rec = Recording(reward)
        scored = type(reward).__call__

        def scoring(self, *a, **k):
            events.append("score")
            return scored(self, *a, **k)

        type(reward).__call__ = scoring
        trainer = _train("GRPO", paths["policy"], reward, common.image_dataset(), paths["work"],
                         callbacks=[EventRecorder(events), PoolColocationCallback(pool)])  # fmt: skip
        step = ["score", "pre_optimizer_step", "offload", "optimizer_step"]
        assert events == ["step_begin", *step, "step_begin", "onload", *step, "onload"]
        # Offloading and onloading the weights left the scores exactly the model's.
        _check_logged_rewards(trainer, rec, reference)
        assert all(r.get("offloaded") is False for r in pool.stats()["replicas"])
    finally:
        pool.shutdown()


def test_examples_custom_loop_overlaps_and_scores_tokens(paths, reference):
    import custom_loop

    result = custom_loop.main(["--tiny", "--tokens", "--steps", "2", "--output-dir", str(paths["work"] / "loop")])
    results = result["results"]
    assert set(results) == {"sequential", "overlap"}
    # The token route (the policy's own prompt ids + completion ids) gives the text route's score.
    # (Random policies emit bytes that do not decode to text, so use known answers here.)
    policy, rows = result["policy"], result["rows"]
    tok = policy.processor.tokenizer
    row = rows[0]
    messages = [{"role": "user", "content": [{"type": "image", "image": row["image"]},
                                             {"type": "text", "text": row["prompt"][0]["content"]}]}]  # fmt: skip
    text = policy.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt_ids = policy.processor(text=[text], images=[row["image"]], return_tensors="pt")["input_ids"][0].tolist()
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    answers = ["It is red.", "A round shape\nin the middle.", "Blue!"]
    rm = RewardModel.from_pretrained(paths["work"] / "loop" / "tiny-reward", image_roots=None)
    by_tokens = rm.score_tokens([prompt_ids + tok.encode(a) + [im_end] for a in answers], images=[[row["image"]]] * 3)
    by_text = rm.score([{"prompt": row["prompt"], "completion": a, "images": [row["image"]]} for a in answers])
    assert by_tokens == pytest.approx(by_text, abs=1e-5)
    result["scorer"].close()


def test_examples_grpo_and_rloo_run():
    import grpo_vlm
    import rloo

    assert len(grpo_vlm.main(["--tiny", "--steps", "1"])["history"]) == 1
    assert len(rloo.main(["--tiny", "--steps", "1"])["history"]) == 1
