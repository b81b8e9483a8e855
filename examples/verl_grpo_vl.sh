#!/usr/bin/env bash
# GRPO of a Qwen2.5-VL policy with verl 0.9, rewarded by Skywork-VL-Reward through rewardplug's reward
# manager (rewardplug.integrations.verl.RewardPlugManager) in verl's reward loop.
# Not run in CI (GPUs, vLLM); tests/test_verl.py composes these overrides against verl's config.
#
# Layout: one node of 8 GPUs. verl's actor, reference and vLLM rollout share GPUs 0-5
# (trainer.n_gpus_per_node=6: verl's resource pool takes whole GPUs, so nothing else fits there); the
# reward model runs on the other 2, as a named RewardPool of 2 replicas x 1 GPU on the same Ray cluster.
# The first reward-loop worker starts the pool, the others attach to it by name; each worker batches the
# rollouts it gets into one request per few ms, so a GRPO group's n responses are scored together, on one
# replica, sharing the prompt and the image. Batch sizes divide over the 6 trainer GPUs (verl checks it):
# 192 prompts x 8 responses / 6 GPUs, mini-batches of 48 prompts. See docs/layouts.md.
# A response that cannot be scored fails the step, naming it (on_invalid=raise, the default; a float
# makes it that reward instead; docs/scores.md says why no number is neutral).
#
# Data: verl's RLHFDataset parquet (prompt messages with "<image>" tags and an "images" column), e.g.
# made by verl's examples/data_preprocess/geo3k.py.
set -euo pipefail

POLICY=${POLICY:-Qwen/Qwen2.5-VL-7B-Instruct}
REWARD_MODEL=${REWARD_MODEL:-Skywork/Skywork-VL-Reward-7B}
DATA=${DATA:-$HOME/data/geo3k}

python3 -m verl.trainer.main_ppo \
  algorithm.adv_estimator=grpo \
  algorithm.use_kl_in_reward=False \
  data.train_files="$DATA/train.parquet" \
  data.val_files="$DATA/test.parquet" \
  data.train_batch_size=192 \
  data.max_prompt_length=1024 \
  data.max_response_length=1024 \
  data.filter_overlong_prompts=True \
  data.truncation=error \
  data.image_key=images \
  actor_rollout_ref.model.path="$POLICY" \
  actor_rollout_ref.model.use_remove_padding=True \
  actor_rollout_ref.model.enable_gradient_checkpointing=True \
  actor_rollout_ref.actor.optim.lr=1e-6 \
  actor_rollout_ref.actor.ppo_mini_batch_size=48 \
  actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8 \
  actor_rollout_ref.actor.use_kl_loss=True \
  actor_rollout_ref.actor.kl_loss_coef=0.01 \
  actor_rollout_ref.actor.kl_loss_type=low_var_kl \
  actor_rollout_ref.actor.entropy_coeff=0 \
  actor_rollout_ref.rollout.name=vllm \
  actor_rollout_ref.rollout.n=8 \
  actor_rollout_ref.rollout.tensor_model_parallel_size=2 \
  actor_rollout_ref.rollout.gpu_memory_utilization=0.6 \
  actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=16 \
  actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=16 \
  reward.num_workers=4 \
  reward.reward_manager.source=importlib \
  reward.reward_manager.module.path=pkg://rewardplug.integrations.verl \
  reward.reward_manager.name=RewardPlugManager \
  +reward.rewardplug.model="$REWARD_MODEL" \
  +reward.rewardplug.pool_name=skywork-rm \
  +reward.rewardplug.pool_options.num_replicas=2 \
  +reward.rewardplug.pool_options.gpus_per_replica=1 \
  +reward.rewardplug.pool_options.dtype=bfloat16 \
  +reward.rewardplug.on_invalid=raise \
  +reward.rewardplug.batch_wait_ms=5 \
  trainer.n_gpus_per_node=6 \
  trainer.nnodes=1 \
  trainer.logger='["console","wandb"]' \
  trainer.project_name=rewardplug-verl \
  trainer.experiment_name=qwen2_5_vl_7b_grpo_skywork_rm \
  trainer.save_freq=50 \
  trainer.test_freq=10 \
  trainer.total_epochs=1 \
  "$@"
