"""The reward model inside a DeepSpeed ZeRO-3 trainer: each rank holds 1/N of its parameters.

>>> from rewardplug.integrations.deepspeed import ShardedRewardModel
>>> rm = ShardedRewardModel.from_pretrained("Skywork/Skywork-VL-Reward-7B")  # doctest: +SKIP
>>> rm.score(my_rank_samples)  # every rank calls it, with its own samples (an empty list is fine)  # doctest: +SKIP

Under ZeRO-3 a forward pass gathers each layer's parameters from all ranks, so scoring is collective:
every rank must run the same forward passes in the same order. ``score`` first agrees with the other
ranks (over a gloo group with a timeout) on how many batches to run, then runs that many on every rank:
a rank with fewer samples runs filler batches, and every batch carries at least one image so every
rank calls the vision tower the same way. A rank that does not call ``score`` makes the others fail
with CollectiveTimeoutError after ``timeout_s``, instead of hanging.

The model is built already partitioned: the backbone is constructed under ``deepspeed.zero.Init``
(transformers' own ZeRO-3 path, switched on by an ``HfDeepSpeedConfig`` held for the construction) and the
value head under ``deepspeed.zero.Init`` too, then the checkpoint is streamed in one module at a time
(rank 0 reads that module's tensors from the safetensors files and ZeRO-3 scatters them). No rank ever
holds the whole model, in device or host memory: a rank's peak is its 1/N shard plus the largest
module gathered at once plus one tensor read from disk.

The DeepSpeed config: the trainer's when accelerate's DeepSpeed plugin is active (its ZeRO settings,
without optimizer and scheduler, stage forced to 3), else the one given, else a plain ZeRO-3 config.
Its precision section follows the reward model's dtype (``dtype=`` option, default the checkpoint's),
whatever the trainer uses, since ``zero.Init`` casts parameters to the config's precision.

Failures: a bad sample is handled per sample as ``on_invalid`` says ("raise", "none" or a float
fallback); a system failure (a forward pass that raises, a rank that does not take part) raises
``ScoringError`` (``CollectiveTimeoutError`` is one) on the rank where it happened, and is never turned
into a score. Under ZeRO-3 the other ranks then fail too (their next collective cannot complete), so the
trainer's step fails on every rank.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import json
import logging
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from ..checkpoint import read_value_head, resolve_checkpoint
from ..encoding import collate
from ..errors import CheckpointError, InvalidSampleError, ScoringError
from ..grouped_attention import use_grouped_sdpa
from ..model import RewardModel, _backbone_class

OnInvalid = str | float  # "raise" | "none" | a fallback score

logger = logging.getLogger(__name__)


class CollectiveTimeoutError(ScoringError, TimeoutError):
    """Not every rank called the collective scoring call in time (a system failure: never a score)."""


def zero3_config(ds_config: dict | str | None = None, hidden_size: int | None = None,
                 dtype: torch.dtype | None = None) -> dict:  # fmt: skip
    """An inference ZeRO-3 config: the active trainer's (accelerate), the given one, or a default.

    dtype: the reward model's parameter dtype; it sets the precision section (``zero.Init`` casts
    parameters to it), so a bf16 trainer config does not turn an fp32 reward model into bf16 or back.
    """
    if ds_config is None:
        ds_config = _trainer_config()
    if isinstance(ds_config, str):
        with open(ds_config) as f:
            ds_config = json.load(f)
    # Only what shapes the sharding and precision carries over; batch sizes and the optimizer are the
    # trainer's business (inference runs its own batches).
    source = ds_config or {}
    config = {k: copy.deepcopy(source[k]) for k in ("zero_optimization", "bf16", "fp16") if k in source}
    zero = config.setdefault("zero_optimization", {})
    zero.pop("offload_optimizer", None)
    zero["stage"] = 3
    if hidden_size:
        for key, value in (("stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size)),
                           ("stage3_param_persistence_threshold", 10 * hidden_size)):  # fmt: skip
            if zero.get(key) in (None, "auto"):
                zero[key] = value
    zero = {k: v for k, v in zero.items() if v != "auto"}
    config["zero_optimization"] = zero
    for key in ("bf16", "fp16"):
        if isinstance(config.get(key), dict) and config[key].get("enabled") == "auto":
            config[key]["enabled"] = False
    if dtype is not None:
        config["bf16"] = {"enabled": dtype == torch.bfloat16}
        config["fp16"] = {"enabled": dtype == torch.float16}
    config.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1)
    return config


def _trainer_config() -> dict | None:
    """The DeepSpeed config of the accelerate-launched trainer in this process, without creating
    accelerate's state (that would pre-empt the trainer's own set-up)."""
    import os

    try:
        from accelerate.state import AcceleratorState
        from accelerate.utils import DeepSpeedPlugin
    except ImportError:
        return None
    if AcceleratorState._shared_state:  # the trainer's Accelerator exists
        plugin = AcceleratorState().deepspeed_plugin
        return plugin.deepspeed_config if plugin is not None else None
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return DeepSpeedPlugin().deepspeed_config  # read from the same launcher settings the trainer reads
    return None


@dataclass
class ShardedRewardModel:
    """A RewardModel whose backbone and value head are partitioned by ZeRO-3 across the ranks of the
    process group, from construction on."""

    model: RewardModel
    engine: Any  # deepspeed engine (holds the hooks that gather parameters)
    batch_size: int = 8
    timeout_s: float = 300.0
    _group: Any = None

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, ds_config: dict | str | None = None, batch_size: int = 8,
                        timeout_s: float = 300.0, **options: Any) -> "ShardedRewardModel":  # fmt: skip
        """Build the model partitioned and stream the checkpoint into the shards (torch.distributed must
        be initialized; every rank calls this).

        options: RewardModel.from_pretrained's (dtype, image options, value_head, attn_implementation, ...);
        ``device``/``device_map``/``max_memory`` do not apply (each rank's shard lives on its own device).
        """
        import deepspeed
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError("initialize torch.distributed first (deepspeed.init_distributed() or the trainer)")
        placed = sorted(k for k in ("device", "device_map", "max_memory") if options.get(k) is not None)
        if placed:
            raise ValueError(f"{placed} do not apply to a sharded model: each rank's shard is on its own device")
        # Processor, encoder and the architecture, on the meta device: no weight is read here.
        shell = RewardModel.from_pretrained(name_or_path, device="meta", **options)
        folder = resolve_checkpoint(name_or_path)
        hidden = shell.config.text_config.hidden_size
        config = zero3_config(ds_config, hidden, dtype=shell.dtype)
        backbone = _partitioned_backbone(folder, shell, config, options.get("attn_implementation"))
        head = _partitioned_head(folder, options.get("value_head", "value_head.safetensors"), hidden, config)
        _check_dtypes(backbone, shell.dtype, "backbone")
        _check_dtypes(head, torch.float32, "value head")
        model = dataclasses.replace(shell, backbone=backbone, value_head=head)
        engine, *_ = deepspeed.initialize(model=_Scorer(backbone, head), config=config)
        engine.eval()
        group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
        return cls(model, engine, batch_size, timeout_s, group)

    # ---- partition figures ----------------------------------------------------------------------

    def _parameters(self):
        return list(self.model.backbone.parameters()) + list(self.model.value_head.parameters())

    def local_parameters(self) -> int:
        """Elements of the model's parameters (backbone and value head) stored on this rank."""
        return sum(_local_numel(p) for p in self._parameters())

    def total_parameters(self) -> int:
        """Elements of the whole model's parameters (all ranks' shards together)."""
        return sum(getattr(p, "ds_numel", p.numel()) for p in self._parameters())

    def local_bytes(self) -> int:
        """Bytes of parameters resident on this rank (its shards, plus persistent small parameters)."""
        return sum(_local_numel(p) * p.element_size() for p in self._parameters())

    # ---- scoring --------------------------------------------------------------------------------

    def score(self, samples: Sequence[Any], *, on_invalid: OnInvalid = "raise") -> list[float | None]:
        """Collective: every rank calls this with its own samples. Returns this rank's scores.

        on_invalid: what a bad sample (one that cannot be encoded) gets: "raise" (InvalidSampleError naming
            it, with the other scores in ``.scores``), "none" (None), or a float (that score). Bad samples
            are left out of the compute; the error is raised only after the collective steps, so the other
            ranks go on.
        A system failure (a forward pass that raises, a rank that does not call in time) raises
        ScoringError whatever on_invalid says.
        """
        import torch.distributed as dist

        _check_on_invalid(on_invalid)
        samples = list(samples)
        encoded, errors = self.model.encode_many(samples)
        valid = [i for i, e in enumerate(encoded) if e is not None]
        valid.sort(key=lambda i: encoded[i].num_tokens)
        batches = [valid[k : k + self.batch_size] for k in range(0, len(valid), self.batch_size)]
        counts = torch.tensor([len(batches)], dtype=torch.long)
        try:
            dist.monitored_barrier(group=self._group, timeout=datetime.timedelta(seconds=self.timeout_s))
            dist.all_reduce(counts, op=dist.ReduceOp.MAX, group=self._group)
        except RuntimeError as e:
            raise CollectiveTimeoutError(
                f"rank {dist.get_rank()}: not every rank called score() within {self.timeout_s:.0f}s ({e}); in "
                "sharded mode every rank must call it, with its own samples (an empty list is fine)"
            ) from None
        scores: list[float | None] = [None] * len(samples)
        filler = self._filler()
        for step in range(int(counts.item())):
            rows = batches[step] if step < len(batches) else []
            batch_samples = [encoded[i] for i in rows]
            if not any(s.image_grid_thw is not None for s in batch_samples):
                batch_samples.append(filler)  # every rank runs the vision tower in every step
            try:
                values = self.model.forward(collate(batch_samples, self.model.pad_token_id, "right"))
            except Exception as e:  # the device, DeepSpeed or a bug: never a sample's fault, never a score
                raise ScoringError(
                    f"rank {dist.get_rank()}: sharded forward pass {step + 1}/{int(counts.item())} failed "
                    f"({type(e).__name__}: {e})"
                ) from e
            for i, v in zip(rows, values.tolist()):
                scores[i] = v
        if errors:
            if on_invalid == "raise":  # after the collective steps, so the other ranks went on
                raise InvalidSampleError(errors, scores=scores)
            if on_invalid != "none":
                for i in errors:
                    scores[i] = float(on_invalid)
        return scores

    def _filler(self):
        """A tiny image sample whose score is thrown away."""
        image = Image.new("RGB", (28, 28), (127, 127, 127))
        return self.model.encode({"prompt": "", "completion": "", "images": [image]})


class _Scorer(torch.nn.Module):
    """What DeepSpeed wraps: the backbone and the value head, so both are partitioned and gathered."""

    def __init__(self, backbone: torch.nn.Module, value_head: torch.nn.Module):
        super().__init__()
        self.backbone, self.value_head = backbone, value_head


def _check_on_invalid(value: Any) -> None:
    if value in ("raise", "none") or (isinstance(value, int | float) and not isinstance(value, bool)):
        return
    raise ValueError(f"on_invalid must be 'raise', 'none' or a float fallback score, got {value!r}")


@contextlib.contextmanager
def _hf_zero3(config: dict):
    """transformers builds models under deepspeed.zero.Init while an HfDeepSpeedConfig is alive. Hold one
    for the construction only, then put back whatever the trainer had (transformers keeps one weak
    reference: ours would otherwise replace the trainer's, or leave later loads partitioned)."""
    import transformers.integrations.deepspeed as hf_deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    previous = hf_deepspeed._hf_deepspeed_config_weak_ref
    keep_alive = HfDeepSpeedConfig(config)
    try:
        yield keep_alive
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = previous


def _partitioned_backbone(folder: Path, shell: RewardModel, config: dict, attn_implementation: str | None):
    """The backbone (no LM head) built under zero.Init, then filled from the checkpoint module by module."""
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(folder)
    kwargs: dict[str, Any] = {"dtype": shell.dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    with _hf_zero3(config):
        # transformers' ZeRO-3 construction: each parameter is partitioned as its module is created.
        full = _backbone_class(hf_config.model_type)._from_config(hf_config, **kwargs)
    backbone = full.model
    del full  # the LM head (vocabulary logits) is never run
    _load_partitioned(backbone, folder, prefix="model.")
    backbone.eval()
    use_grouped_sdpa(backbone.language_model)  # as RewardModel.from_pretrained does
    return backbone


def _partitioned_head(folder: Path, filename: str | None, hidden: int, config: dict) -> torch.nn.Linear:
    """The fp32 value head, created partitioned; rank 0 writes the checkpoint's values into it."""
    import deepspeed
    import torch.distributed as dist

    weight, bias = read_value_head(folder, filename, hidden)  # every rank: a bad file fails every rank alike
    # zero.Init honours an explicit dtype only where the accelerator reports fp16 support (DeepSpeed
    # 0.19: `dtype or fp16 if fp16_supported else bf16 ...`), so dtype=float32 became bf16 on CPUs without
    # fp16. With dtype=None the config's precision sections decide: both off means fp32 on every machine.
    fp32 = {**config, "bf16": {"enabled": False}, "fp16": {"enabled": False}}
    with deepspeed.zero.Init(config_dict_or_path=fp32):
        head = torch.nn.Linear(hidden, 1, dtype=torch.float32)
    with deepspeed.zero.GatheredParameters(list(head.parameters()), modifier_rank=0), torch.no_grad():
        if dist.get_rank() == 0:
            head.weight.copy_(weight)
            head.bias.copy_(bias)
    return head.eval()


def _checkpoint_keys(folder: Path) -> dict[str, str]:
    """Every tensor key of the checkpoint's safetensors files -> its file (from the index when sharded)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return dict(json.loads(index.read_text())["weight_map"])
    single = folder / "model.safetensors"
    if not single.is_file():
        raise CheckpointError(f"{str(folder)!r} has neither model.safetensors nor model.safetensors.index.json")
    reader = _TensorReader(single)
    reader.close()
    return {k: "model.safetensors" for k in reader.header}


def _checkpoint_key(name: str, keys: dict[str, str]) -> str | None:
    """A transformers-5 parameter name -> its key in the checkpoint: the same name, or the hub's older
    layout (``model.layers.*`` for ``model.language_model.layers.*``, ``visual.*`` for ``model.visual.*``)."""
    if name in keys:
        return name
    if name.startswith("model.language_model."):
        old = "model." + name[len("model.language_model.") :]
    elif name.startswith("model.visual."):
        old = name[len("model.") :]
    else:
        return None
    return old if old in keys else None


class _TensorReader:
    """Reads one tensor at a time from a safetensors file with plain reads, without memory-mapping it:
    safetensors' ``safe_open`` maps the file, and every page it touches counts in the process's resident
    memory until the handle closes, so streaming a whole checkpoint through it shows the whole file
    resident on the reading rank. The file format: 8-byte header length, JSON header, raw data."""

    DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}  # fmt: skip

    def __init__(self, path: Path):
        self._file = open(path, "rb")
        (length,) = struct.unpack("<Q", self._file.read(8))
        self.header = {k: v for k, v in json.loads(self._file.read(length)).items() if k != "__metadata__"}
        self._data_start = 8 + length

    def shape(self, key: str) -> list[int]:
        return list(self.header[key]["shape"])

    def read(self, key: str) -> torch.Tensor:
        entry = self.header[key]
        if entry["dtype"] not in self.DTYPES:
            raise CheckpointError(f"tensor {key!r} has dtype {entry['dtype']}, which rewardplug does not read")
        start, end = entry["data_offsets"]
        self._file.seek(self._data_start + start)
        data = bytearray(self._file.read(end - start))
        tensor = torch.frombuffer(data, dtype=self.DTYPES[entry["dtype"]]) if data else torch.empty(0)
        return tensor.reshape(entry["shape"])

    def close(self) -> None:
        self._file.close()


def _load_partitioned(module: torch.nn.Module, folder: Path, prefix: str) -> None:
    """Fill a zero.Init-partitioned module from safetensors, one submodule at a time.

    Every rank checks names and shapes first (from the file headers only), so a bad checkpoint fails all
    ranks alike instead of leaving some waiting in a collective. Then, per submodule, ZeRO-3 gathers its
    parameters, rank 0 copies the tensors it reads from disk, and ZeRO-3 scatters them back.
    """
    import deepspeed
    import torch.distributed as dist

    keys = _checkpoint_keys(folder)
    readers = {file: _TensorReader(folder / file) for file in sorted(set(keys.values()))}
    try:
        plan: list[tuple[list[torch.nn.Parameter], list[tuple[torch.nn.Parameter, str]]]] = []
        missing, wrong = [], []
        for name, sub in module.named_modules(prefix=prefix.rstrip(".")):
            params = list(sub.named_parameters(prefix=name, recurse=False))
            if not params:
                continue
            pairs = []
            for pname, p in params:
                key = _checkpoint_key(pname, keys)
                shape = list(getattr(p, "ds_shape", p.shape))
                if key is None:
                    missing.append(pname)
                elif readers[keys[key]].shape(key) != shape:
                    wrong.append(f"{key} {readers[keys[key]].shape(key)} (model: {shape})")
                else:
                    pairs.append((p, key))
            plan.append(([p for _, p in params], pairs))
        if missing or wrong:
            raise CheckpointError(
                f"checkpoint {str(folder)!r} does not fit the model: "
                + (f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}; " if missing else "")
                + (f"wrong shapes {wrong[:5]}" if wrong else "")
            )
        rank0 = dist.get_rank() == 0
        for params, pairs in plan:
            with deepspeed.zero.GatheredParameters(params, modifier_rank=0), torch.no_grad():
                if rank0:
                    for p, key in pairs:
                        p.copy_(readers[keys[key]].read(key))
    finally:
        for reader in readers.values():
            reader.close()


def _check_dtypes(module: torch.nn.Module, dtype: torch.dtype, what: str) -> None:
    """Every partitioned parameter in the dtype asked for: DeepSpeed's zero.Init picks the dtype of what it
    partitions by rules of its own (the config's precision sections, the accelerator's fp16 support)."""
    found = {p.dtype for p in module.parameters()} | {p.ds_tensor.dtype for p in module.parameters()
                                                     if getattr(p, "ds_tensor", None) is not None}  # fmt: skip
    if found != {dtype}:
        raise RuntimeError(f"ZeRO-3 built the {what} in {sorted(map(str, found))}, not {dtype}: DeepSpeed's "
                           f"zero.Init did not keep the requested dtype")


def _local_numel(p: torch.nn.Parameter) -> int:
    tensor = getattr(p, "ds_tensor", None)
    return tensor.numel() if tensor is not None else p.numel()
