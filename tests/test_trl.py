"""rewardplug as TRL reward_funcs: real GRPOTrainer / RLOOTrainer runs on the CPU with tiny policies."""

from __future__ import annotations

import math
import multiprocessing
import pickle
import sys
from pathlib import Path

import pytest
import torch

from rewardplug import InvalidSampleError, RewardEngine, RewardModel
from rewardplug.integrations.trl import AsyncRewardFunction, RewardFunction

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))

import common  # noqa: E402  (examples/common.py)

NAME = "skywork_vl_reward"


class Recording:
    """Wraps a reward function's class to keep every call's samples and the scores it returned."""

    def __init__(self, reward):
        self.calls = []
        original = type(reward).__call__
        owner = self

        if isinstance(reward, AsyncRewardFunction):

            class Recorded(type(reward)):
                async def __call__(self, prompts, completions, completion_ids=None, **kw):
                    out = await original(self, prompts, completions, completion_ids, **kw)
                    owner.calls.append((self.samples(prompts, completions, **kw), list(out)))
                    return out
        else:

            class Recorded(type(reward)):
                def __call__(self, prompts, completions, completion_ids=None, **kw):
                    out = original(self, prompts, completions, completion_ids, **kw)
                    owner.calls.append((self.samples(prompts, completions, **kw), list(out)))
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


def _train(trainer_name: str, policy: str, reward, dataset, work: Path, steps: int = 2):
    import trl

    config_cls = getattr(trl, f"{trainer_name}Config")
    trainer_cls = getattr(trl, f"{trainer_name}Trainer")
    config = config_cls(
        output_dir=str(work / trainer_name), per_device_train_batch_size=4, num_generations=4,
        max_completion_length=10, max_steps=steps, learning_rate=1e-4, logging_steps=1, report_to="none",
        use_cpu=True, bf16=False, save_strategy="no", seed=0,
    )  # fmt: skip
    trainer = trainer_cls(model=policy, reward_funcs=[reward], args=config, train_dataset=dataset)
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
    assert any(k.startswith(f"{NAME}/prefix_hits") for h in trainer.state.log_history for k in h)
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
    assert {"reward_model/latency_ms", "reward_model/invalid_frac", "reward_model/truncated_frac"} <= names


def test_contract_standard_strings_and_several_images(model, images):
    reward = RewardFunction(model, name="rm")
    out = reward(prompts=["Compare the two.", "Just text."], completions=["Left.", "Fine."],
                 images=[[images[0], images[1]], []])  # fmt: skip
    expected = model.score([{"prompt": "Compare the two.", "completion": "Left.", "images": images[:2]},
                            {"prompt": "Just text.", "completion": "Fine."}])  # fmt: skip
    assert out == pytest.approx(expected, abs=1e-5)


def test_invalid_sample_is_none_or_raises(model, images):
    bad = b"not an image"
    kwargs = {"images": [[images[0]], [bad]]}
    out = RewardFunction(model)(prompts=["a", "b"], completions=["x", "y"], **kwargs)
    assert out[1] is None and out[0] == pytest.approx(model.score([{"prompt": "a", "completion": "x",
                                                                      "images": [images[0]]}])[0], abs=1e-5)  # fmt: skip
    with pytest.raises(InvalidSampleError, match="sample 1: image 0"):
        RewardFunction(model, on_error="raise")(prompts=["a", "b"], completions=["x", "y"], **kwargs)


def test_truncated_completions_are_flagged(model):
    eos = model.processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    args = dict(prompts=["a", "b"], completions=["cut off", "done"], completion_ids=[[5, 6], [7, eos]])
    scored = RewardFunction(model)(**args)
    assert None not in scored
    assert RewardFunction(model, truncated="none")(**args)[0] is None
    penalized = RewardFunction(model, truncated=-5.0)(**args)
    assert penalized[0] == -5.0 and penalized[1] == pytest.approx(scored[1])
    logged = []
    RewardFunction(model)(**args, log_metric=lambda k, v: logged.append((k, v)))
    assert ("reward_model/truncated_frac", 0.5) in logged


def test_running_normalization_per_source_and_clip(model):
    reward = RewardFunction(model, normalize="running", normalize_by="data_source", clip=1.5)
    prompts, completions = ["q"] * 4, ["a", "bb b", "ccc cc", "d d d d d d"]
    raw = model.score([{"prompt": p, "completion": c} for p, c in zip(prompts, completions)])
    out = reward(prompts=prompts, completions=completions, data_source=["x", "x", "y", "y"])
    for pair, got in (((raw[0], raw[1]), out[:2]), ((raw[2], raw[3]), out[2:])):
        mean, std = sum(pair) / 2, abs(pair[0] - pair[1]) / math.sqrt(2)
        expected = [max(-1.5, min(1.5, (v - mean) / (std + 1e-6))) for v in pair]
        assert got == pytest.approx(expected, abs=1e-4)


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


def test_model_id_string_builds_a_pool(ray_cluster, paths, reference):
    reward = RewardFunction(paths["reward"], num_replicas=1, gpus_per_replica=0, image_roots=None)
    try:
        out = reward(prompts=["Sky?"], completions=["Blue."])
        assert out == pytest.approx(reference.score([{"prompt": "Sky?", "completion": "Blue."}]), abs=1e-4)
    finally:
        reward.scorer.shutdown()


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
