"""Move a reward model's weights to host memory and back, without Ray or Serve.

``move_to_host(model)`` moves every parameter and buffer of the scoring modules (backbone and head) to
host memory (pinned where CUDA exists, so the way back is a fast asynchronous copy) and returns where
each tensor lived; ``move_home(homes)`` puts each one back on its own device, so a model split over
several GPUs (a device map) comes back exactly as it was. Tensors already on the host stay where they
are. The pool's replicas use these for ``offload()``/``onload()``; ``benchmarks/gpu_check.py`` measures
what they free.

>>> homes = move_to_host(model)  # doctest: +SKIP
>>> move_home(homes)  # doctest: +SKIP
"""

from __future__ import annotations

import torch

Homes = list[tuple[torch.Tensor, torch.device]]


def move_to_host(model) -> Homes:
    """Every parameter and buffer of ``model.backbone`` and ``model.value_head`` to host memory (pinned
    where CUDA exists); returns each tensor with the device it lived on, for ``move_home``."""
    homes: Homes = []
    for module in (model.backbone, model.value_head):
        for tensor in [*module.parameters(), *module.buffers()]:
            homes.append((tensor, tensor.device))
            if tensor.device.type != "cpu":
                host = tensor.data.to("cpu")
                tensor.data = host.pin_memory() if torch.cuda.is_available() else host
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return homes


def move_home(homes: Homes) -> None:
    """Put each tensor of ``move_to_host``'s answer back on the device it came from (copies from pinned
    memory do not block the host; kernels queued after them on the same stream see the weights)."""
    for tensor, device in homes:
        if tensor.device != device:
            tensor.data = tensor.data.to(device, non_blocking=True)
