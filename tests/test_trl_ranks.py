"""A real GRPOTrainer on 2 ranks (torchrun, gloo, CPU) whose reward is RewardFunction(<checkpoint>,
pool options): the ranks share ONE named pool with one replica.

Starts Ray: run under the shared lock (``flock /tmp/team/ray.lock pytest tests/test_trl_ranks.py``).
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from rewardplug import RewardModel

ROOT = Path(__file__).resolve().parent.parent
NAME = "skywork_vl_reward"


@pytest.fixture(scope="module")
def ray_address():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def test_two_grpo_ranks_share_one_pool_replica(ray_address, tmp_path):
    sys.path.insert(0, str(ROOT / "examples"))
    import common

    from rewardplug import RewardPool

    policy, reward_path = common.tiny_paths(tmp_path)
    pool_name = "trl-ranks-test"
    env = dict(os.environ, RAY_ADDRESS=ray_address, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           str(ROOT / "tests/workers/trl_rank.py"), "--policy", policy, "--reward", reward_path,
           "--pool-name", pool_name, "--out", str(tmp_path)]  # fmt: skip
    run = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]

    records = [pickle.loads((tmp_path / f"rank{r}.pkl").read_bytes()) for r in (0, 1)]
    assert [r["world"] for r in records] == [2, 2]
    assert records[0]["pool"] == records[1]["pool"] == pool_name

    pool = RewardPool.connect(pool_name)
    try:
        stats = pool.stats()
        # ONE pool with ONE replica served both ranks.
        assert len(stats["replicas"]) == 1
        engine = stats["replicas"][0]["engine"]
        assert engine["samples"] == 2 * 2 * 4  # 2 ranks x 2 steps x 4 completions
        # Each rank's call is one request of 4 samples and waits for its scores before the next, so a
        # batch can only hold samples of two requests if they came from both ranks: fewer batches than
        # requests means some batch held samples of both ranks.
        assert engine["requests"] >= 4 and engine["batches"] < engine["requests"], engine
    finally:
        pool.shutdown()

    # Both ranks' rewards equal independent scoring of the very samples TRL sent.
    reference = RewardModel.from_pretrained(reward_path, image_roots=None)
    per_step = []
    for record in records:
        assert len(record["calls"]) == 2
        for step, (samples, returned) in enumerate(record["calls"]):
            assert len(samples) == 4 and all(len(s["images"]) == 1 for s in samples)
            independent = reference.score(samples)
            assert returned == pytest.approx(independent, abs=1e-4)
            if len(per_step) <= step:
                per_step.append([])
            per_step[step].extend(independent)
    # TRL gathers the rewards of both ranks before logging their mean.
    logged = [h[f"rewards/{NAME}/mean"] for h in records[0]["log_history"] if f"rewards/{NAME}/mean" in h]
    assert logged == pytest.approx([sum(v) / len(v) for v in per_step], abs=1e-4)
