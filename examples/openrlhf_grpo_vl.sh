#!/usr/bin/env bash
# GRPO of a vision-language policy with OpenRLHF 0.11, rewarded by Skywork-VL-Reward through rewardplug.
# Not run in CI (it needs GPUs and vLLM). Two ways to reach the reward model, pick one:
#   A) the HTTP service:  rewardplug serve --model Skywork/Skywork-VL-Reward-7B --host 0.0.0.0 --port 5000
#                         REWARD_URL=http://rm-host:5000/get_reward
#   B) a named pool from the rollout workers themselves (this script's default):
#                         REWARD_URL=examples/openrlhf_reward_func.py
# Dataset rows: {"prompt": [{"role": "user", "content": "<image>What is shown?"}],
#                "images": ["/data/img/0001.png"],
#                "label": "{\"images\": [\"/data/img/0001.png\"], \"reference\": \"a cat\"}"}
# (OpenRLHF never sends images to a reward model: the label carries them; --data.label_key images works too.)
# Layout: one node of 8 GPUs. The actor, the reference model and 6 vLLM engines share GPUs 0-5
# (--train.colocate_all: OpenRLHF reserves those 6 GPUs whole, vLLM sleeps while the actor trains);
# the reward pool's 2 replicas x 1 GPU take the other 2 (REWARDPLUG_POOL_OPTIONS). See docs/layouts.md.
set -euo pipefail

POLICY=${POLICY:-Qwen/Qwen2.5-VL-7B-Instruct}
DATA=${DATA:-/data/vl_prompts.jsonl}
REWARD_URL=${REWARD_URL:-examples/openrlhf_reward_func.py}

export REWARDPLUG_MODEL=${REWARDPLUG_MODEL:-Skywork/Skywork-VL-Reward-7B}
export REWARDPLUG_POOL=${REWARDPLUG_POOL:-skywork-rm}
export REWARDPLUG_POOL_OPTIONS=${REWARDPLUG_POOL_OPTIONS:-'{"num_replicas": 2, "gpus_per_replica": 1}'}
export REWARDPLUG_ON_INVALID=${REWARDPLUG_ON_INVALID:-raise}   # a sample that cannot be scored fails the step (docs/scores.md)

python3 -m openrlhf.cli.train_ppo_ray \
  --actor.model_name_or_path "$POLICY" \
  --data.prompt_dataset "$DATA" \
  --data.input_key prompt \
  --data.image_key images \
  --data.label_key label \
  --data.apply_chat_template \
  --reward.remote_url "$REWARD_URL" \
  --actor.num_gpus_per_node 6 \
  --ref.num_gpus_per_node 6 \
  --vllm.num_engines 6 \
  --vllm.tensor_parallel_size 1 \
  --vllm.gpu_memory_utilization 0.6 \
  --vllm.enable_sleep \
  --train.colocate_all \
  --algo.advantage.estimator group_norm \
  --rollout.n_samples_per_prompt 8 \
  "$@"
