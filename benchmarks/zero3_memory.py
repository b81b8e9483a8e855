"""Parameter memory per GPU for the real Skywork-VL-Reward-7B in bf16 under ZeRO-3, from the meta-device model.

    python benchmarks/zero3_memory.py

Per rank: its 1/N shard of every parameter, plus the working set that ZeRO-3 gathers while a layer
runs (the largest module whole, plus the prefetch bucket rewardplug configures: 0.9 x hidden^2
parameters). Activations and the key/value cache come on top, as for a full replica.
"""

import tempfile


from rewardplug import RewardModel
from rewardplug.testing import QWEN2_5_VL_7B_CONFIG, make_tiny_checkpoint

GiB = 2**30


def main():
    path = make_tiny_checkpoint(tempfile.mkdtemp(), config=QWEN2_5_VL_7B_CONFIG, weights=False)
    rm = RewardModel.from_pretrained(path, device="meta", dtype="bfloat16")
    bb = rm.backbone
    total = sum(p.numel() for p in bb.parameters())
    layer = max(sum(p.numel() for p in m.parameters()) for m in list(bb.language_model.layers) + list(bb.visual.blocks))
    embed = bb.language_model.embed_tokens.weight.numel()
    hidden = rm.config.text_config.hidden_size
    prefetch = int(0.9 * hidden * hidden)
    print(f"backbone (no lm_head): {total / 1e9:.3f}B parameters = {2 * total / GiB:.2f} GiB in bf16 "
          f"(value head: fp32, 3585 parameters, replicated)")
    print(f"largest module gathered at once: embeddings {embed / 1e6:.0f}M, decoder layer {layer / 1e6:.0f}M parameters")
    print(f"\n{'ranks':>6}{'shard/GPU':>12}{'+ gathered':>13}{'peak/GPU':>11}{'vs full':>9}")
    print(f"{'full':>6}{2 * total / GiB:>10.2f}GB{0:>11.2f}GB{2 * total / GiB:>9.2f}GB{1:>8.0%}")
    for n in (2, 4, 8):
        shard = 2 * total / n
        gathered = 2 * (max(layer, embed) + prefetch)
        print(f"{n:>6}{shard / GiB:>10.2f}GB{gathered / GiB:>11.2f}GB{(shard + gathered) / GiB:>9.2f}GB"
              f"{(shard + gathered) / (2 * total):>8.0%}")


if __name__ == "__main__":
    main()
