"""Statements of the docs that are facts about the code, checked against the code (the docs' code blocks
run in tests/test_docs.py; these are the statements in prose, tables and example scripts).

- docs/api.md: every ``::: dotted.name`` and every member it lists imports under that name.
- docs/layouts.md: the TRL, vLLM-server, Ray and Serve defaults it quotes are the installed ones.
- docs/grpo.md: the batch budget's memory is the figure docs/sizing.md gives; the colocated recipe's
  replica count x the 7B's memory per replica is what the page says each trainer GPU holds, and the
  recipe says how Ray is started; the dedicated-pool recipe gives the trainer and the pool separate GPUs
  that fit the node.
- examples/*.sh: the GPUs given to the trainer plus the reward replicas' GPUs fit the node the script
  names.
"""

from __future__ import annotations

import importlib
import json
import math
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def page(name: str) -> str:
    return (DOCS / name).read_text()


# ---- docs/api.md ----------------------------------------------------------------------------------------


def api_names() -> list[str]:
    """Every object docs/api.md renders: the ``::: name`` lines and the members listed under them."""
    names = []
    for found in re.finditer(r"^::: ([\w.]+)\n((?:[ \t]+.*\n?)*)", page("api.md"), re.M):
        name, options = found.group(1), found.group(2)
        names.append(name)
        members = re.search(r"members:\s*\[(.*?)\]", options)
        if members:
            names += [f"{name}.{m.strip()}" for m in members.group(1).split(",") if m.strip()]
    return names


def import_dotted(name: str):
    """``import a.b`` then ``getattr`` for the rest, as a user's ``from a.b import c`` would."""
    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:k]))
        except ModuleNotFoundError as e:
            if e.name and ".".join(parts[:k]).startswith(e.name) and k > 1:
                continue  # not a module at this depth: an attribute of a shorter prefix
            raise
        for attr in parts[k:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(name)


def test_api_page_lists_objects():
    names = api_names()
    assert len(names) > 20 and "rewardplug.integrations.trl.RewardFunction" in names, names


@pytest.mark.parametrize("name", api_names())
def test_every_name_on_the_api_page_imports_as_written(name):
    assert name.startswith("rewardplug."), f"{name}: users import it from rewardplug"
    assert import_dotted(name) is not None


# ---- docs/grpo.md against docs/sizing.md ------------------------------------------------------------------


def test_grpo_batch_budget_memory_is_the_figure_sizing_gives():
    sizing = re.search(r"default budget, 16384 tokens: ([\d.]+) GiB", page("sizing.md"))
    assert sizing, "docs/sizing.md no longer states the default batch budget's memory"
    grpo = re.search(r"([\d.]+) GiB for the engine's default batch budget", page("grpo.md"))
    assert grpo, "docs/grpo.md no longer states the batch budget's memory"
    assert grpo.group(1) == sizing.group(1)


WEIGHTS_GIB = re.compile(r"the 7B takes ([\d.]+) GiB for weights")


def colocated_section() -> str:
    text = page("grpo.md")
    return text[text.index("## Colocated") : text.index("\n## ", text.index("## Colocated") + 5)]


def test_colocated_recipe_replicas_times_memory_is_what_each_trainer_gpu_holds():
    """The replicas take every trainer GPU's share, and the most copies Ray can put on one GPU times the
    7B's weights is the figure the page gives (at gpus_per_replica=0.5, two copies: twice it)."""
    section = colocated_section()
    weights = float(WEIGHTS_GIB.search(page("grpo.md")).group(1))
    calls = re.findall(r"RewardPool\((.*?)\)\n", section, re.S)
    assert calls, "the colocated recipe starts no RewardPool"
    kwargs = dict(re.findall(r"(\w+)=([\w.]+)", calls[0]))
    assert "num_replicas" in kwargs, "num_replicas left to its default: one replica per free GPU share"
    trainer_gpus = int(re.search(r"accelerate launch --num_processes (\d+)", section).group(1))
    replicas, share = int(kwargs["num_replicas"]), float(kwargs["gpus_per_replica"])
    assert 0 < share <= 1
    assert replicas * share == trainer_gpus, "every trainer GPU's share is taken: each holds a replica"
    most_on_one_gpu = min(replicas, math.floor(1 / share))  # Ray may pack this many replicas onto one GPU
    held = re.search(r"Each trainer GPU then holds one copy of the reward model's ([\d.]+) GiB", section)
    assert held, "the page no longer says what each trainer GPU holds"
    assert most_on_one_gpu * weights == pytest.approx(float(held.group(1)))


def test_colocated_recipe_says_how_ray_is_started():
    section = colocated_section()
    start = re.search(r"ray start --head[^\n]*--num-gpus (\d+)", section)
    assert start, "the colocated recipe does not start Ray (on the trainer's GPUs)"
    trainer_gpus = int(re.search(r"accelerate launch --num_processes (\d+)", section).group(1))
    assert int(start.group(1)) == trainer_gpus, "Ray must see the same GPUs the trainer runs on"


# ---- example launch scripts: GPU arithmetic ---------------------------------------------------------------


def script_words(name: str) -> tuple[str, list[str]]:
    text = (ROOT / "examples" / name).read_text()
    return text, shlex.split(re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))))


def node_gpus(text: str) -> int:
    found = re.search(r"^# Layout: one node of (\d+) GPUs", text, re.M)
    assert found, "the script does not say which node it is laid out for"
    return int(found.group(1))


def overrides(words: list[str]) -> dict[str, str]:
    return dict(w.lstrip("+").split("=", 1) for w in words if re.match(r"^\+?[\w.]+=", w))


def test_verl_example_gpus_fit_the_node():
    text, words = script_words("verl_grpo_vl.sh")
    o = overrides(words)
    trainer = int(o["trainer.n_gpus_per_node"]) * int(o["trainer.nnodes"])
    replicas, share = int(o["reward.rewardplug.pool_options.num_replicas"]), float(o["reward.rewardplug.pool_options.gpus_per_replica"])
    assert int(o["trainer.nnodes"]) == 1
    assert trainer + replicas * share <= node_gpus(text), (trainer, replicas, share)
    tp = int(o["actor_rollout_ref.rollout.tensor_model_parallel_size"])
    assert trainer % tp == 0, "vLLM's tensor-parallel groups must tile the trainer's GPUs"
    # verl's batch checks: the rollout batch and each mini-batch divide over the trainer's GPUs
    n = int(o["actor_rollout_ref.rollout.n"])
    batch, mini = int(o["data.train_batch_size"]), int(o["actor_rollout_ref.actor.ppo_mini_batch_size"])
    assert (batch * n) % trainer == 0 and batch % mini == 0
    micro = int(o["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu"])
    assert (mini * n) % trainer == 0 and (mini * n // trainer) % micro == 0


def flag_values(words: list[str]) -> dict[str, str]:
    values = {}
    for k, w in enumerate(words):
        if w.startswith("--"):
            nxt = words[k + 1] if k + 1 < len(words) else ""
            values[w] = nxt if nxt and not nxt.startswith("--") else "true"
    return values


def test_openrlhf_example_gpus_fit_the_node():
    text, words = script_words("openrlhf_grpo_vl.sh")
    f = flag_values(words)
    actor = int(f["--actor.num_gpus_per_node"])
    assert "--train.colocate_all" in f, "actor, reference and vLLM engines share the actor's GPUs"
    assert int(f["--ref.num_gpus_per_node"]) == actor  # OpenRLHF asserts it when colocating
    assert int(f["--vllm.num_engines"]) * int(f.get("--vllm.tensor_parallel_size", "1")) == actor
    options = json.loads(re.search(r"REWARDPLUG_POOL_OPTIONS:-'(\{.*?\})'", text).group(1))
    assert actor + options["num_replicas"] * options["gpus_per_replica"] <= node_gpus(text)


# ---- docs/layouts.md: the defaults it quotes are the installed frameworks' --------------------------------


def test_layouts_page_quotes_the_installed_frameworks_port_and_memory_defaults():
    import dataclasses

    from ray._private import ray_constants
    from ray.serve.config import HTTPOptions
    from trl import GRPOConfig
    from trl.scripts.vllm_serve import ScriptArguments

    text = page("layouts.md")
    grpo = {f.name: f.default for f in dataclasses.fields(GRPOConfig)}
    serve_script = {f.name: f.default for f in dataclasses.fields(ScriptArguments)}
    assert f'vllm_mode="{grpo["vllm_mode"]}"` (TRL\'s default mode)' in text
    assert f"default {grpo['vllm_gpu_memory_utilization']} of the GPU" in text
    rows = re.findall(r"^\| \**(\d+)\** \| ([^|]+)\|", text, re.M)  # (port, who opens it) of the ports table

    def opened_by(port: int, who: str) -> bool:
        return any(int(p) == port and who in opener for p, opener in rows)

    assert opened_by(serve_script["port"], "trl vllm-serve") and opened_by(grpo["vllm_server_port"], "trl vllm-serve")
    assert opened_by(HTTPOptions().port, "Ray Serve's HTTP proxy")
    assert opened_by(grpo["vllm_group_port"], "vllm_group_port")
    assert opened_by(ray_constants.DEFAULT_DASHBOARD_PORT, "dashboard")
    assert opened_by(ray_constants.DEFAULT_PORT, "ray start --head")


def test_dedicated_pool_recipe_gives_trainer_and_pool_separate_gpus_that_fit_the_node():
    text = page("grpo.md")
    section = text[text.index("## A node with a dedicated reward pool") : text.index("## Colocated")]
    node = int(re.search(r"On an (\d+)-GPU node", section).group(1))
    ray_gpus = re.search(r"CUDA_VISIBLE_DEVICES=([\d,]+) ray start --head[^\n]*--num-gpus (\d+)", section)
    trainer = re.search(r"CUDA_VISIBLE_DEVICES=([\d,]+) accelerate launch --num_processes (\d+)", section)
    pool = re.search(r"rewardplug pool start [^\n]*--replicas (\d+) --gpus-per-replica ([\d.]+)", section)
    assert ray_gpus and trainer and pool, "the recipe no longer starts Ray, the pool and the trainer"
    reward_set, trainer_set = set(ray_gpus.group(1).split(",")), set(trainer.group(1).split(","))
    assert len(reward_set) == int(ray_gpus.group(2)) and len(trainer_set) == int(trainer.group(2))
    assert not reward_set & trainer_set and len(reward_set | trainer_set) <= node
    assert int(pool.group(1)) * float(pool.group(2)) <= int(ray_gpus.group(2))
    assert "RAY_ADDRESS" in section, "the ranks must be told which cluster holds the pool"
