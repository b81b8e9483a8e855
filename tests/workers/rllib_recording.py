"""A PPO learner that records what it trains on (imported by remote learner actors in tests/test_rllib.py).

The batches go to ``learner_config_dict["record_dir"]`` as .npz files when set (the learner may be a Ray
actor in another process), else to the in-process list SEEN.
"""

import os
import uuid

import numpy as np
from ray.rllib.algorithms.ppo.torch.ppo_torch_learner import PPOTorchLearner
from ray.rllib.core.columns import Columns

SEEN: list[dict] = []
KEYS = (Columns.OBS, Columns.ACTIONS, Columns.REWARDS, Columns.LOSS_MASK)


class RecordingLearner(PPOTorchLearner):
    def compute_losses(self, *, fwd_out, batch):
        folder = self.config.learner_config_dict.get("record_dir")
        for module_batch in batch.values():
            record = {k: np.asarray(module_batch[k].detach().cpu()) for k in KEYS if k in module_batch}
            record["pid"] = np.asarray(os.getpid())
            if folder:
                np.savez(os.path.join(folder, f"{uuid.uuid4().hex}.npz"), **record)
            else:
                SEEN.append(record)
        return super().compute_losses(fwd_out=fwd_out, batch=batch)


def load(folder: str) -> list[dict]:
    return [dict(np.load(os.path.join(folder, f))) for f in sorted(os.listdir(folder)) if f.endswith(".npz")]


def to_sample_last_answer_bad(episode, t: int) -> dict:
    """rllib_ppo.to_sample, except that the last answer comes with an image that cannot be decoded."""
    import rllib_ppo

    sample = rllib_ppo.to_sample(episode, t)
    if int(episode.get_actions(t)) == len(rllib_ppo.ANSWERS) - 1:
        sample["images"] = [b"not an image"]
    return sample
