"""plan_device_map: the balanced split of the real Skywork-VL-Reward-7B (Qwen2.5-VL-7B) over several GPUs.

Computed on the meta device from the real config.json (no weights), so these run on any machine and
check the same computation a pool replica makes on its GPUs.
"""

from __future__ import annotations

import re

import pytest
import torch

from rewardplug.serving.placement import NO_SPLIT, plan_device_map
from rewardplug.testing import QWEN2_5_VL_7B_CONFIG, make_tiny_checkpoint

GiB = 2**30
HEADROOM = 0.85
# Qwen2.5-VL-7B-Instruct: 8.29e9 parameters (lm_head included) in bf16.
EXPECTED_TOTAL_GIB = 15.4


@pytest.fixture(scope="module")
def config_7b(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("qwen7b-meta"), config=QWEN2_5_VL_7B_CONFIG, weights=False)


@pytest.fixture(scope="module")
def param_counts(config_7b):
    """Every parameter name of the full 7B backbone (meta device)."""
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    config = AutoConfig.from_pretrained(config_7b)
    with torch.device("meta"):
        full = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    return {name: p.numel() for name, p in full.named_parameters()}


def _figures(plan) -> str:
    per = {d: round(b / GiB, 2) for d, b in plan.bytes_per_device.items()}
    total = sum(plan.bytes_per_device.values())
    mean = total / len(plan.bytes_per_device)
    return f"GiB per GPU {per}, total {total / GiB:.2f} GiB, max/mean {max(plan.bytes_per_device.values()) / mean:.2f}"


def _owner(name: str, device_map: dict) -> str | None:
    """The device-map key that holds parameter ``name`` (a key equal to it or a parent module of it)."""
    for key in device_map:
        if key == "" or name == key or name.startswith(key + "."):
            return key
    return None


@pytest.mark.parametrize("num_gpus, gib", [(2, 24), (4, 16)], ids=["2x24GiB", "4x16GiB"])
def test_7b_bf16_balanced_over_gpus(config_7b, param_counts, num_gpus, gib):
    plan = plan_device_map(config_7b, num_gpus, gib * GiB, dtype=torch.bfloat16, headroom=HEADROOM)
    figures = _figures(plan)
    print(f"\n7B bf16 over {num_gpus} GPUs of {gib} GiB: {figures}")
    assert plan.device is None and plan.device_map, figures

    # Every module is on a GPU index, and every GPU is used.
    devices = set(plan.device_map.values())
    assert all(isinstance(d, int) and not isinstance(d, bool) for d in devices), f"non-GPU devices {devices}"
    assert devices == set(range(num_gpus)), f"devices used {sorted(devices)}; {figures}"
    assert set(plan.bytes_per_device) == set(range(num_gpus)), figures

    # Every parameter of the model is placed by exactly one key.
    unplaced = [n for n in param_counts if _owner(n, plan.device_map) is None]
    assert not unplaced, f"{len(unplaced)} parameters in no device-map entry, e.g. {unplaced[:5]}"

    # Total: the whole bf16 model (about 15.4 GiB).
    total = sum(plan.bytes_per_device.values())
    assert abs(total / GiB - EXPECTED_TOTAL_GIB) < 0.1, figures
    params = sum(param_counts.values())
    assert abs(total - 2 * params) < 2**20, f"{figures}; 2 bytes x {params} parameters = {2 * params / GiB:.3f} GiB"

    # Each GPU within its share of memory, and the split balanced.
    for dev, placed in plan.bytes_per_device.items():
        assert placed <= HEADROOM * gib * GiB, f"GPU {dev} holds {placed / GiB:.2f} GiB > {HEADROOM} x {gib} GiB"
    mean = total / num_gpus
    worst = max(plan.bytes_per_device.values())
    assert worst <= 1.6 * mean, f"unbalanced split: {figures}"

    # Decoder layers and vision blocks are never split: no key deeper than a layer or block.
    for key in plan.device_map:
        assert not re.search(r"\.layers\.\d+\.", key), f"decoder layer split: {key}"
        assert not re.search(r"\.blocks\.\d+\.", key), f"vision block split: {key}"
    layers = [k for k in plan.device_map if re.fullmatch(r"model\.language_model\.layers\.\d+", k)]
    if layers:  # a layer-level map: all 28 decoder layers are listed whole
        assert len(layers) == QWEN2_5_VL_7B_CONFIG["num_hidden_layers"], layers
    # Layers go to GPUs in order (a pipeline, not interleaved).
    order = [plan.device_map[k] for k in sorted(layers, key=lambda k: int(k.rsplit(".", 1)[1]))]
    assert order == sorted(order), f"layers not in GPU order: {order}"


def test_7b_heterogeneous_gpus(config_7b):
    """A list of sizes: each GPU stays under its own memory x headroom."""
    sizes = [24 * GiB, 12 * GiB]
    plan = plan_device_map(config_7b, 2, sizes, dtype=torch.bfloat16, headroom=HEADROOM)
    print(f"\n7B bf16 over GPUs of [24, 12] GiB: {_figures(plan)}")
    for dev, placed in plan.bytes_per_device.items():
        assert placed <= HEADROOM * sizes[dev], f"GPU {dev}: {placed / GiB:.2f} GiB; {_figures(plan)}"
    assert set(plan.device_map.values()) == {0, 1}, _figures(plan)


def test_7b_does_not_fit_one_16gib_gpu(config_7b):
    with pytest.raises(ValueError, match=r"needs 15\.4 GiB.*1 GPUs of \[16\.0\] GiB") as info:
        plan_device_map(config_7b, 1, 16 * GiB, dtype=torch.bfloat16, headroom=HEADROOM)
    print(f"\n1 x 16 GiB: {info.value}")


def test_7b_fits_one_80gib_gpu(config_7b):
    """One large GPU: everything on device 0."""
    plan = plan_device_map(config_7b, 1, 80 * GiB, dtype=torch.bfloat16, headroom=HEADROOM)
    assert set(plan.device_map.values()) == {0}, plan.device_map
    assert list(plan.bytes_per_device) == [0], _figures(plan)


def test_no_split_classes_exist_in_transformers():
    """NO_SPLIT names real module classes (a typo would silently let accelerate split layers)."""
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl

    for name in ("Qwen2_5_VLDecoderLayer", "Qwen2_5_VLVisionBlock"):
        assert name in NO_SPLIT
        assert hasattr(modeling_qwen2_5_vl, name), f"transformers has no {name}"


# ---- built-in names in a pool replica --------------------------------------------------------------


def _samples():
    from conftest import random_image

    image = random_image(64, 56, seed=5)
    return [{"prompt": "What is in the picture?", "completion": "Noise, mostly green.", "images": [image]},
            {"prompt": "Write a haiku about autumn.", "completion": "Leaves fall, the wind turns."},
            {"prompt": "Say yes.", "completion": "Yes."}]  # fmt: skip


def test_random_7b_refuses_a_replica_of_several_gpus():
    from rewardplug.serving.placement import load_on_assigned_gpus

    with pytest.raises(ValueError, match=r"'random-7b' is built on one device.*given 2 GPUs.*gpus_per_replica=1"):
        load_on_assigned_gpus("random-7b", ["0", "1"], layers=1, dtype="float32")


def test_tiny_by_name_loads_in_a_replica_as_from_its_folder():
    """A replica given the name ``tiny`` (no GPU) loads the same model as the folder the name stands for."""
    from rewardplug import RewardModel, named_models
    from rewardplug.serving.placement import load_on_assigned_gpus

    by_name = load_on_assigned_gpus("tiny", [], dtype="float32")
    from_folder = RewardModel.from_pretrained(named_models.checkpoint_path("tiny"), dtype="float32", device="cpu")
    assert str(by_name.device) == "cpu"
    got, expected = by_name.score(_samples()), from_folder.score(_samples())
    assert max(abs(a - b) for a, b in zip(got, expected)) <= 1e-5, (got, expected)


@pytest.mark.timeout(900)
def test_pool_of_random_7b_one_layer_on_cpu_scores_as_the_model_loaded_directly():
    """A pool of ``random-7b`` with ``model_options={"layers": 1, ...}`` and ``gpus_per_replica=0``: the replica
    builds the model on the CPU the plan gives, and its scores equal ``named_models.load`` scored in this
    process. The pool is removed before the reference is built: each copy is about 3.4 GB in fp32."""
    ray = pytest.importorskip("ray")
    serve = pytest.importorskip("ray.serve")
    from rewardplug import RewardPool, named_models

    if ray.is_initialized():  # another module's cluster
        serve.shutdown()
        ray.shutdown()
    ray.init(address="local", num_cpus=2, namespace="rewardplug", log_to_driver=False, include_dashboard=False)
    try:
        options = {"layers": 1, "dtype": "float32"}
        # As a user writes it: random-7b's own options beside the pool's (PoolConfig.from_kwargs).
        with RewardPool("random-7b", **options, gpus_per_replica=0, num_replicas=1, request_timeout_s=600,
                        ready_timeout_s=600) as pool:  # fmt: skip
            assert pool.config.model_options == options, pool.config
            got = pool.score(_samples())
            (replica,) = pool.health()
    finally:
        serve.shutdown()
        ray.shutdown()
    assert replica.get("device") == "cpu", replica
    expected = named_models.load("random-7b", device="cpu", **options).score(_samples())
    print(f"\nrandom-7b, 1 layer, fp32: pool {got}, model {expected}")
    assert all(isinstance(x, float) for x in got), got
    diffs = [abs(a - b) for a, b in zip(got, expected)]
    assert max(diffs) <= 1e-5, f"pool {got} vs named_models.load {expected}"


def test_pool_options_given_as_keywords_and_as_option_dicts_merge():
    """``model_options=``/``engine_options=`` beside loose keywords (the TRL, verl and OpenRLHF adapters
    pass both): one PoolConfig with every option where it belongs; unknown names fail naming them."""
    from rewardplug.serving.config import PoolConfig

    c = PoolConfig.from_kwargs("m", model_options={"dtype": "float32"}, engine_options={"busy": "raise"},
                               image_roots=None, max_batch_tokens=4096, num_replicas=2)  # fmt: skip
    assert c.model_options == {"dtype": "float32", "image_roots": None}, c.model_options
    assert c.engine_options == {"busy": "raise", "max_batch_tokens": 4096}, c.engine_options
    assert c.num_replicas == 2 and c.busy == "wait"  # the flat busy is the pool handle's
    r = PoolConfig.from_kwargs("random-7b", layers=2, seed=3, dtype="bfloat16")
    assert r.model_options == {"layers": 2, "seed": 3, "dtype": "bfloat16"}, r.model_options
    with pytest.raises(TypeError, match="layers"):  # only random-7b is built with a layer count
        PoolConfig.from_kwargs("m", layers=2)

