"""OpenRLHF custom reward file: ``--reward.remote_url examples/openrlhf_reward_func.py``.

Scores every rollout with the multimodal reward model through a named rewardplug pool shared by all of
OpenRLHF's rollout workers (see ``rewardplug.integrations.openrlhf``). Set, in the environment of the Ray
job that runs OpenRLHF:

    REWARDPLUG_MODEL=Skywork/Skywork-VL-Reward-7B   # starts the pool if it is not running yet
    REWARDPLUG_POOL=skywork-rm                      # the pool's name: every worker gets the same one
    REWARDPLUG_POOL_OPTIONS='{"num_replicas": 2, "gpus_per_replica": 1}'
    REWARDPLUG_ON_INVALID=raise                     # a query that cannot be scored fails the step (the
                                                    # default), or a float: its reward (docs/scores.md)

or REWARDPLUG_URL (+ REWARDPLUG_API_KEY) to score through a running ``rewardplug serve`` instead.

The images come from the dataset's label column (``--data.label_key label``), one JSON object per row:
``{"images": ["/data/img/0001.png"], "reference": "optional answer"}``; a plain list of image references
works too (``--data.label_key images`` reuses the column the policy reads).
"""

from rewardplug.integrations.openrlhf import reward_func

__all__ = ["reward_func"]
