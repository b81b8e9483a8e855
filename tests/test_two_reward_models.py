"""A GRPO run that mixes Skywork-VL-Reward with a text reward model, each on its own Ray pool.

Real parts: TRL's GRPOTrainer with a tiny vision-language policy, two named Serve pools on this
process's own Ray cluster (gpus_per_replica=0 on this CPU machine), and independent RewardModels of
both checkpoints for the expected scores.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from rewardplug import RewardModel
from rewardplug.integrations.trl import RewardFunction
from rewardplug.testing import make_tiny_seq_cls_checkpoint

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))

import common  # noqa: E402  (examples/common.py)

WEIGHTS = [1.0, 0.5]


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=4, namespace="rewardplug", log_to_driver=False, include_dashboard=False)
    yield ray
    ray.shutdown()


def recorded(reward: RewardFunction) -> list:
    """Keep every call's samples and returned values (the function's own class, extended)."""
    calls: list = []
    original = type(reward).__call__

    class Recorded(type(reward)):
        def __call__(self, prompts, completions, completion_ids=None, **kw):
            out = original(self, prompts, completions, completion_ids, **kw)
            calls.append((self.samples(prompts, completions, **kw), list(out)))
            return out

    reward.__class__ = Recorded
    return calls


def test_grpo_logs_both_reward_models_from_two_pools_and_their_means_equal_independent_scoring(ray_cluster, tmp_path):
    import trl

    policy, vision_path = common.tiny_paths(tmp_path)
    text_path = str(make_tiny_seq_cls_checkpoint(tmp_path / "text-rm", "qwen3", seed=3))
    options = dict(num_replicas=1, gpus_per_replica=0)
    vision = RewardFunction(vision_path, name="skywork_vl_reward", image_roots=None, **options)
    text = RewardFunction(text_path, name="text_reward", **options)
    try:
        assert vision.scorer.name != text.scorer.name  # one pool each
        calls = {"skywork_vl_reward": recorded(vision), "text_reward": recorded(text)}
        config = trl.GRPOConfig(
            output_dir=str(tmp_path / "grpo"), per_device_train_batch_size=4, num_generations=4,
            max_completion_length=10, max_steps=2, learning_rate=1e-4, logging_steps=1, report_to="none",
            use_cpu=True, bf16=False, save_strategy="no", seed=0, reward_weights=WEIGHTS,
        )  # fmt: skip
        trainer = trl.GRPOTrainer(model=policy, reward_funcs=[vision, text], args=config,
                                  train_dataset=common.image_dataset())  # fmt: skip
        trainer.train()
    finally:
        vision.scorer.shutdown()
        text.scorer.shutdown()

    history = trainer.state.log_history
    independent = {"skywork_vl_reward": RewardModel.from_pretrained(vision_path, image_roots=None),
                   "text_reward": RewardModel.from_pretrained(text_path)}  # fmt: skip
    step_means = {}
    for name, model in independent.items():
        logged = [h[f"rewards/{name}/mean"] for h in history if f"rewards/{name}/mean" in h]
        assert len(logged) == 2 == len(calls[name]), name
        step_means[name] = []
        for (samples, returned), mean in zip(calls[name], logged):
            expected = model.score(samples)
            assert returned == pytest.approx(expected, abs=1e-4), name
            assert mean == pytest.approx(sum(expected) / len(expected), abs=1e-4), name
            step_means[name].append(mean)
    # TRL's total reward is the weighted sum of the two.
    totals = [h["reward"] for h in history if "reward" in h]
    expected_totals = [WEIGHTS[0] * a + WEIGHTS[1] * b for a, b in zip(step_means["skywork_vl_reward"], step_means["text_reward"])]
    assert totals == pytest.approx(expected_totals, abs=1e-4)
