"""rewardplug in verl 0.9's reward loop: verl's own RewardLoopWorker (and RewardLoopManager under Ray) with a
hydra-composed ppo_trainer config, on CPU, scoring DataProto items with images.

verl pins transformers below 5.11, so these tests run in their own environment (.venv-verl, built by
.ci/run); where verl is not installed they skip."""

from __future__ import annotations

import io
import math
import os
import re
import shlex
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

verl = pytest.importorskip("verl", reason="verl runs in its own environment (.venv-verl, see .ci/run)")

from hydra import compose, initialize_config_dir  # noqa: E402
from verl import DataProto  # noqa: E402
from verl.experimental.reward_loop.reward_loop import RewardLoopWorker  # noqa: E402
from verl.utils.dataset.rl_dataset import RLHFDataset  # noqa: E402

import rewardplug.integrations.verl as rp_verl  # noqa: E402
from rewardplug import InvalidSampleError  # noqa: E402

from conftest import random_image  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
TOL = 1e-5
MANAGER = [
    "reward.reward_manager.source=importlib",
    "reward.reward_manager.module.path=pkg://rewardplug.integrations.verl",
    "reward.reward_manager.name=RewardPlugManager",
]


def compose_config(tiny_path, *overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return compose("ppo_trainer", overrides=[f"actor_rollout_ref.model.path={tiny_path}", *overrides])


def engine_options(tiny_path, prefix: str = "+reward.rewardplug") -> list[str]:
    return [f"{prefix}.backend=engine", f"{prefix}.model={tiny_path}",
            f"{prefix}.model_options.dtype=float32", f"{prefix}.model_options.device=cpu"]  # fmt: skip


def png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def raw_prompt(row: dict) -> list[dict]:
    """verl's own RLHFDataset._build_messages: "<image>" tags in the row replaced by its images."""
    holder = SimpleNamespace(image_key="images", video_key="videos", audio_key="audios", processor=object())
    return RLHFDataset._build_messages(holder, {k: (list(v) if isinstance(v, list) else v) for k, v in row.items()},
                                       "prompt")  # fmt: skip


def score_batch(worker, data: DataProto) -> list[dict]:
    """What verl's Ray actor does with a batch: compute_score_batch on the worker's event loop."""
    return worker.loop.run_until_complete(worker.compute_score_batch(data))


def rollout_batch(tokenizer, rows: list[dict]) -> DataProto:
    """A rollout batch as verl's trainer hands it to the reward loop: left-padded prompts, right-padded
    responses, the row's raw_prompt and (when given) multi_modal_data, data_source and reward_model."""
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad = tokenizer.pad_token_id or 0
    prompts = [tokenizer.encode(r["prompt_text"], add_special_tokens=False) for r in rows]
    responses = [tokenizer.encode(r["answer"], add_special_tokens=False) + ([] if r.get("truncated") else [im_end])
                 for r in rows]  # fmt: skip
    p_len, r_len = max(map(len, prompts)), max(map(len, responses)) + 3
    p_ids = torch.tensor([[pad] * (p_len - len(p)) + p for p in prompts])
    r_ids = torch.tensor([r + [pad] * (r_len - len(r)) for r in responses])
    mask = torch.tensor([[0] * (p_len - len(p)) + [1] * len(p) + [1] * len(r) + [0] * (r_len - len(r))
                         for p, r in zip(prompts, responses)])  # fmt: skip

    def column(values):
        out = np.empty(len(values), dtype=object)
        out[:] = values
        return out

    non_tensors = {
        "raw_prompt": column([r["raw_prompt"] for r in rows]),
        "data_source": column(["vqa"] * len(rows)),
        "reward_model": column([{"ground_truth": ""} for _ in rows]),
        "extra_info": column([r.get("extra_info", {}) for r in rows]),
    }
    if any("multi_modal_data" in r for r in rows):
        non_tensors["multi_modal_data"] = column([r.get("multi_modal_data") for r in rows])
    return DataProto.from_dict(tensors={"prompts": p_ids, "responses": r_ids, "attention_mask": mask},
                               non_tensors=non_tensors)  # fmt: skip


def grpo_rows(model, group: int = 3) -> tuple[list[dict], list[dict]]:
    """Two GRPO groups: images embedded in raw_prompt by verl's dataset code (verl 0.9), and images in
    multi_modal_data filling {"type": "image"} placeholders (older datasets); one truncated response.
    Returns the rows and the sample the reward model should see for each."""
    a, b = random_image(96, 72, seed=31), random_image(64, 120, seed=32)
    rows, expected = [], []
    for k in range(group):
        answer = f"Answer {k}: " + "noise " * (k + 1)
        messages = raw_prompt({"prompt": [{"role": "user", "content": "<image>What is in the picture?"}],
                               "images": [{"bytes": png(a)}]})  # fmt: skip
        rows.append({"raw_prompt": messages, "answer": answer, "prompt_text": "What is in the picture?",
                     "truncated": k == group - 1})  # fmt: skip
        expected.append({"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text",
                         "text": "What is in the picture?"}]}], "completion": answer, "images": [a]})  # fmt: skip
    for k in range(group):
        answer = f"Two pictures, take {k}."
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                                 {"type": "text", "text": "Compare them."}]}]  # fmt: skip
        rows.append({"raw_prompt": messages, "multi_modal_data": {"image": [a, b]}, "answer": answer,
                     "prompt_text": "Compare them."})  # fmt: skip
        expected.append({"messages": messages + [{"role": "assistant", "content": answer}], "images": [a, b]})
    return rows, expected


def test_engine_scores_like_model_under_verls_transformers(model):
    """The root of every score below: under verl's transformers pin (<5.11) the engine's image-feature
    path must give the model's own score (transformers 5.10 has no ``mm_encoder_outputs`` and drops it)."""
    import transformers

    from rewardplug import RewardEngine

    sample = {"prompt": "What is it?", "completion": "Noise.", "images": [random_image(96, 72, seed=30)]}
    with RewardEngine(model) as engine:
        got = engine.score([sample])
    assert got == pytest.approx(model.score([sample]), abs=TOL), transformers.__version__


def test_reward_loop_worker_scores_like_model_in_one_request(model, tiny_path):
    cfg = compose_config(tiny_path, *MANAGER, *engine_options(tiny_path))
    worker = RewardLoopWorker(cfg)
    assert isinstance(worker.reward_manager, rp_verl.RewardPlugManager)
    rows, expected = grpo_rows(model)
    outputs = score_batch(worker, rollout_batch(worker.input_tokenizer, rows))
    want = model.score(expected)
    assert [o["reward_score"] for o in outputs] == pytest.approx(want, abs=TOL)
    infos = [o["reward_extra_info"] for o in outputs]
    assert [i["rm_score"] for i in infos] == pytest.approx(want, abs=TOL)
    assert [i["rm_truncated"] for i in infos] == [0.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    assert [i["rm_invalid"] for i in infos] == [0.0] * 6
    (batcher,) = worker.reward_manager._batchers.values()
    assert batcher.requests == 1  # both GRPO groups went out together
    # verl's own assembly of the per-sample rewards into the token-level rm_scores tensor
    data = rollout_batch(worker.input_tokenizer, rows)
    rm = worker.reward_manager.assemble_rm_scores(data, [o["reward_score"] for o in outputs])
    assert rm.sum(-1).tolist() == pytest.approx(want, abs=TOL)


def test_grpo_step_goes_out_as_one_engine_request_sharing_each_groups_prompt(model, tiny_path):
    """verl calls run_single once per rollout: the manager's batcher sends a step as one request, so the
    engine encodes each group's prompt and pictures once (one request per item, measured against this
    in benchmarks/bench_verl.py, loses throughput and prefix sharing)."""
    from rewardplug import RewardEngine

    worker = RewardLoopWorker(compose_config(tiny_path, *MANAGER, *engine_options(tiny_path)))
    rows, expected = grpo_rows(model, group=4)  # 2 groups of 4
    with RewardEngine(model, metrics=None) as engine:
        worker.reward_manager.scorer = engine
        outputs = score_batch(worker, rollout_batch(worker.input_tokenizer, rows))
        stats = engine.stats()
    assert [o["reward_extra_info"]["rm_score"] for o in outputs] == pytest.approx(model.score(expected), abs=TOL)
    assert stats["requests"] == 1 and stats["samples"] == 8
    assert stats["prefix_hits"] == 6  # each group's 3 later answers reuse its first one's prompt


def _broken_rows(model):
    rows, expected = grpo_rows(model, group=2)
    broken = dict(rows[-1], multi_modal_data={"image": [rows[-1]["multi_modal_data"]["image"][0]]})  # 2 slots, 1 image
    return rows[:-1] + [broken], expected[:-1]


def test_unscorable_item_fails_the_step_by_default_naming_it(model, tiny_path, caplog):
    """on_invalid defaults to "raise", as in every adapter: verl's worker fails with InvalidSampleError
    naming the item (its data_source) and the reason, and the log says what to set instead."""
    rows, _ = _broken_rows(model)
    cfg = compose_config(tiny_path, *MANAGER, *engine_options(tiny_path))
    worker = RewardLoopWorker(cfg)
    assert worker.reward_manager.options.on_invalid == "raise"
    with caplog.at_level("ERROR", logger="rewardplug.integrations.verl"):
        with pytest.raises(InvalidSampleError, match=r"placeholder.*data_source=vqa"):
            score_batch(worker, rollout_batch(worker.input_tokenizer, rows))
    assert "+reward.rewardplug.on_invalid=<float>" in caplog.text


def test_unscorable_item_gets_the_on_invalid_reward_and_flag_others_scored(model, tiny_path):
    rows, expected = _broken_rows(model)
    want = model.score(expected)
    for option in ("+reward.rewardplug.on_invalid=-4.0", "+reward.rewardplug.invalid_score=-4.0"):  # new, old
        cfg = compose_config(tiny_path, *MANAGER, *engine_options(tiny_path), option)
        if "invalid_score" in option:
            with pytest.warns(DeprecationWarning, match="on_invalid"):
                worker = RewardLoopWorker(cfg)
        else:
            worker = RewardLoopWorker(cfg)
        outputs = score_batch(worker, rollout_batch(worker.input_tokenizer, rows))
        assert [o["reward_score"] for o in outputs[:-1]] == pytest.approx(want, abs=TOL)
        assert outputs[-1]["reward_score"] == -4.0
        info = outputs[-1]["reward_extra_info"]
        assert info["rm_invalid"] == 1.0 and math.isnan(info["rm_score"])
        # verl's own assembly of rm_scores and its GRPO advantage: finite for every item of both groups.
        data = rollout_batch(worker.input_tokenizer, rows)
        rm_scores = worker.reward_manager.assemble_rm_scores(data, [o["reward_score"] for o in outputs])
        advantages, _ = _grpo_advantages(rm_scores, data, groups=[0, 0, 1, 1])
        assert torch.isfinite(advantages).all()


def _grpo_advantages(rm_scores, data, groups):
    from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage

    response_mask = data.batch["attention_mask"][:, data.batch["prompts"].shape[1] :].float()
    return compute_grpo_outcome_advantage(rm_scores, response_mask, np.array(groups))


def test_on_invalid_none_is_refused_because_verl_cannot_mask_a_reward(model, tiny_path):
    """What verl does with a NaN reward (why "none" is refused): its GRPO advantage turns the whole group NaN."""
    cfg = compose_config(tiny_path, *MANAGER, *engine_options(tiny_path), "+reward.rewardplug.on_invalid=none")
    with pytest.raises(ValueError, match="no per-sample mask"):
        RewardLoopWorker(cfg)
    rows, _ = _broken_rows(model)
    data = rollout_batch(worker_tokenizer(tiny_path), rows)
    rm_scores = rp_verl.RewardPlugManager.assemble_rm_scores(data, [0.5, -0.5, 0.3, float("nan")])
    advantages, _ = _grpo_advantages(rm_scores, data, groups=[0, 0, 1, 1])
    per_item = advantages.sum(-1)
    assert torch.isfinite(per_item[:2]).all() and torch.isnan(per_item[2:]).all()  # the NaN's whole group


def worker_tokenizer(tiny_path):
    from verl.utils import hf_tokenizer

    return hf_tokenizer(str(tiny_path))


def test_truncated_score_replaces_reward_of_truncated_responses(model, tiny_path):
    rows, expected = grpo_rows(model, group=2)
    cfg = compose_config(tiny_path, *MANAGER, *engine_options(tiny_path), "+reward.rewardplug.truncated_score=-1.5")
    worker = RewardLoopWorker(cfg)
    outputs = score_batch(worker, rollout_batch(worker.input_tokenizer, rows[:2]))
    assert outputs[1]["reward_extra_info"]["rm_truncated"] == 1.0 and outputs[1]["reward_score"] == -1.5
    assert outputs[1]["reward_extra_info"]["rm_score"] == pytest.approx(model.score([expected[1]])[0], abs=TOL)
    assert outputs[0]["reward_score"] == pytest.approx(model.score([expected[0]])[0], abs=TOL)


def test_system_failure_fails_the_batch_never_a_reward(model, tiny_path):
    cfg = compose_config(tiny_path, *MANAGER, *engine_options(tiny_path))
    key = rp_verl.VerlRewardOptions.from_mapping(cfg.reward.rewardplug).scorer_key()
    rp_verl._scorers.pop(key, None)  # this worker gets an engine of its own, closed below
    worker = RewardLoopWorker(cfg)
    worker.reward_manager.scorer.close()  # it can never score again: a system failure, not a bad sample
    try:
        rows, _ = grpo_rows(model, group=2)
        with pytest.raises(RuntimeError):  # ScoringError (EngineClosedError) is a RuntimeError
            score_batch(worker, rollout_batch(worker.input_tokenizer, rows))
    finally:
        rp_verl._scorers.pop(key, None)


def test_async_compute_score_through_verls_naive_manager(model, tiny_path):
    im = random_image(80, 60, seed=33)
    kw = "+reward.custom_reward_function.reward_kwargs"
    cfg = compose_config(tiny_path, "reward.custom_reward_function.path=pkg://rewardplug.integrations.verl",
                         "reward.custom_reward_function.name=compute_score", *engine_options(tiny_path, kw))  # fmt: skip
    worker = RewardLoopWorker(cfg)
    assert type(worker.reward_manager).__name__ == "NaiveRewardManager" and worker.reward_manager.is_async_reward_score
    rows = [{"raw_prompt": [{"role": "user", "content": "What is it?"}], "prompt_text": "What is it?",
             "answer": f"Noise {k}.", "extra_info": {"question": "What is it?", "images": [{"bytes": png(im)}]}}
            for k in range(3)]  # fmt: skip
    outputs = score_batch(worker, rollout_batch(worker.input_tokenizer, rows))
    want = model.score([{"prompt": "What is it?", "completion": f"Noise {k}.", "images": [im]} for k in range(3)])
    assert [o["reward_score"] for o in outputs] == pytest.approx(want, abs=TOL)
    assert [o["reward_extra_info"]["rm_invalid"] for o in outputs] == [0.0] * 3
    assert [b.requests for b in rp_verl._fn_batchers.values()] == [1]  # three calls, one request


def test_options_reject_unknown_keys(tiny_path):
    cfg = compose_config(tiny_path, *MANAGER, *engine_options(tiny_path), "+reward.rewardplug.modle=x")
    with pytest.raises(ValueError, match="modle"):
        RewardLoopWorker(cfg)


POOL_OPTIONS = {"num_replicas": 1, "gpus_per_replica": 0, "part_samples": 2, "request_timeout_s": 77.0,
                "max_ongoing_requests": 3, "dtype": "float32", "device": "cpu"}  # fmt: skip


def pool_overrides(tiny_path, name: str) -> list[str]:
    return [f"+reward.rewardplug.model={tiny_path}", f"+reward.rewardplug.pool_name={name}",
            *(f"+reward.rewardplug.pool_options.{k}={v}" for k, v in POOL_OPTIONS.items())]  # fmt: skip


def test_pool_options_become_one_pool_config_and_unknown_ones_fail_naming_them(tiny_path):
    from rewardplug.serving.config import PoolConfig

    options = rp_verl.VerlRewardOptions.from_mapping(
        compose_config(tiny_path, *pool_overrides(tiny_path, "p")).reward.rewardplug
    )
    assert options.pool_config() == PoolConfig(model=str(tiny_path), name="p", num_replicas=1, gpus_per_replica=0,
                                               part_samples=2, request_timeout_s=77.0, max_ongoing_requests=3,
                                               model_options={"dtype": "float32", "device": "cpu"})  # fmt: skip
    wrong = ["+reward.rewardplug.pool_options.num_replica=2", "+reward.rewardplug.pool_options.bogus=1"]
    with pytest.raises(TypeError, match=r"\['bogus', 'num_replica'\]"):  # when verl builds the worker
        RewardLoopWorker(compose_config(tiny_path, *MANAGER, *pool_overrides(tiny_path, "p"), *wrong))
    with pytest.raises(TypeError, match=r"\['num_replicas'\] describe a pool to make"):
        rp_verl.VerlRewardOptions(pool_name="p", pool_options={"num_replicas": 1, "part_samples": 2}).check_source()
    with pytest.raises(TypeError, match=r"\['model'\] in its PoolConfig"):
        rp_verl.VerlRewardOptions(model="m", pool=PoolConfig(model="m")).check_source()
    with pytest.raises(TypeError, match="PoolConfig or a running RewardPool, got dict"):
        rp_verl.VerlRewardOptions(pool={"model": "m"}).check_source()


def test_example_launch_config_composes(tiny_path):
    """Every override in examples/verl_grpo_vl.sh exists in verl's ppo_trainer config (hydra refuses
    unknown keys), and the reward settings load RewardPlugManager's options."""
    script = (ROOT / "examples" / "verl_grpo_vl.sh").read_text()
    command = script[script.index("python3 -m verl.trainer.main_ppo"):]
    words = shlex.split(re.sub(r"\\\n", " ", command.split('"$@"')[0]))
    env = {"POLICY": str(tiny_path), "REWARD_MODEL": "Skywork/Skywork-VL-Reward-7B", "DATA": "/data"}
    overrides = [re.sub(r"\$\{?(\w+)(:-[^}]*)?\}?", lambda m: env.get(m.group(1), "x"), w)
                 for w in words[3:] if "=" in w]  # fmt: skip
    assert any(o.startswith("reward.reward_manager.name=RewardPlugManager") for o in overrides)
    cfg = compose_config(tiny_path, *overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # no deprecated option (invalid_score) in the example
        options = rp_verl.VerlRewardOptions.from_mapping(cfg.reward.rewardplug)
    assert options.backend == "pool" and options.pool_name and options.model
    assert options.on_invalid == "raise"
    assert cfg.reward.reward_manager.module.path == "pkg://rewardplug.integrations.verl"


# ---- through a real pool, with verl's RewardLoopManager starting its workers as Ray actors ------------------


@pytest.mark.timeout(600)
def test_reward_loop_manager_with_named_pool(model, tiny_path):
    ray = pytest.importorskip("ray")
    from verl.experimental.reward_loop.reward_loop import RewardLoopManager

    from rewardplug import RewardPool

    ray.init(num_cpus=4, include_dashboard=False, namespace="rewardplug-verl-test")
    try:
        cfg = compose_config(tiny_path, *MANAGER, "reward.num_workers=2", *pool_overrides(tiny_path, "verl-test-pool"))
        manager = RewardLoopManager(cfg)
        rows, expected = grpo_rows(model)
        from verl.utils import hf_tokenizer

        out = manager.compute_rm_score(rollout_batch(hf_tokenizer(str(tiny_path)), rows))
        want = model.score(expected)
        assert out.batch["rm_scores"].sum(-1).tolist() == pytest.approx(want, abs=TOL)
        assert out.non_tensor_batch["rm_score"].tolist() == pytest.approx(want, abs=TOL)
        assert out.non_tensor_batch["rm_truncated"].tolist() == [0.0, 0.0, 1.0, 0.0, 0.0, 0.0]
        assert set(out.meta_info["reward_extra_keys"]) == {"rm_score", "rm_invalid", "rm_truncated"}
        pool = RewardPool.connect("verl-test-pool")
        assert pool.config.max_ongoing_requests == 3  # the pool the workers made has pool_options' bound

        # In Python: the whole pool as one PoolConfig; its handle options reach the manager's pool handle.
        config = rp_verl.VerlRewardOptions.from_mapping(cfg.reward.rewardplug).pool_config()
        worker = RewardLoopWorker(cfg)
        worker.reward_manager = rp_verl.RewardPlugManager(cfg, worker.input_tokenizer,
                                                          options=rp_verl.VerlRewardOptions(pool=config))  # fmt: skip
        assert worker.reward_manager.scorer.config == config
        before = sum(r["engine"]["requests"] for r in pool.stats()["replicas"])
        outputs = score_batch(worker, rollout_batch(worker.input_tokenizer, rows))
        assert [o["reward_score"] for o in outputs[:2]] == pytest.approx(want[:2], abs=TOL)
        # one request of two groups of 3, cut into parts of part_samples=2: 2 + 1 per group
        assert sum(r["engine"]["requests"] for r in pool.stats()["replicas"]) - before == 4
        pool.shutdown()  # the workers started it by name
    finally:
        ray.shutdown()
