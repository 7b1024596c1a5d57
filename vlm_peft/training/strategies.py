"""`distributed.strategy` in the terms transformers and accelerate take it: the FSDP2 options and the
DeepSpeed config, checked before any model is built. The sharding itself is theirs."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .schema import RecipeError

if TYPE_CHECKING:
    from .recipe import DistributedSpec

# FSDP2 options passed on as transformers' `fsdp_config`, with what each does.
FSDP_OPTIONS = {
    "version": "2 (FSDP1 is not supported)",
    "reshard_after_forward": "true: free a layer's gathered weights after its forward (least memory); false: keep "
    "them until backward (fewer gathers)",
    "activation_checkpointing": "FSDP's own, per decoder layer; default: the stage's activation_checkpointing",
    "transformer_layer_cls_to_wrap": "the classes sharded as one unit each; default: the model's decoder layer",
    "state_dict_type": "FULL_STATE_DICT (optimizer state gathered into one file) or SHARDED_STATE_DICT (one "
    "part per process)",
}
# Options transformers knows that vlm-peft refuses, and why.
FSDP_REFUSED = {
    "cpu_offload": "not supported yet: offloaded shards live in CPU memory, which the process group (NCCL "
    "only) cannot gather, and it has not run on a GPU here; to save GPU memory use strategy deepspeed with "
    "zero_optimization.offload_optimizer",
    "cpu_ram_efficient_loading": "not supported: every process loads the base whole, as attaching the projector "
    "needs it",
}
STATE_DICT_TYPES = ("FULL_STATE_DICT", "SHARDED_STATE_DICT")
# DeepSpeed sections that would take over what vlm-peft's trainer does itself.
DEEPSPEED_REFUSED = {
    "optimizer": "vlm-peft builds the optimizer (separate projector and LoRA learning rates); set optim, "
    "adam_beta1/2, adam_epsilon and weight_decay in the stage's args",
    "scheduler": "the stage's lr_scheduler_type / warmup_steps set the schedule (a DeepSpeed scheduler would give "
    "projector and LoRA one learning rate)",
}


def check(spec: DistributedSpec) -> None:
    """The strategy's own settings, whole, as the recipe is read (also for one process)."""
    if spec.strategy == "fsdp":
        fsdp_options(spec)
    if spec.strategy == "deepspeed":
        deepspeed_config(spec)


def fsdp_options(spec: DistributedSpec) -> dict[str, Any]:
    """`distributed.fsdp`, checked (transformers' `fsdp_` key prefix accepted)."""
    options = {}
    for key, value in (spec.fsdp or {}).items():
        name = key.removeprefix("fsdp_")
        if name in FSDP_REFUSED:
            raise RecipeError(f"distributed.fsdp.{key}: {FSDP_REFUSED[name]}.")
        if name not in FSDP_OPTIONS:
            allowed = "; ".join(f"{k}: {v}" for k, v in FSDP_OPTIONS.items())
            raise RecipeError(f"distributed.fsdp.{key}: not a supported FSDP2 option. Supported: {allowed}.")
        options[name] = value
    where = "distributed.fsdp"
    if options.get("version", 2) != 2:
        raise RecipeError(f"{where}.version: only FSDP2 is supported (version: 2), got {options['version']!r}.")
    for name in ("reshard_after_forward", "activation_checkpointing"):
        if name in options and not isinstance(options[name], bool):
            raise RecipeError(f"{where}.{name}: expected true or false, got {options[name]!r}.")
    layers = options.get("transformer_layer_cls_to_wrap")
    if layers is not None and not (
        isinstance(layers, str) or (isinstance(layers, list) and layers and all(isinstance(c, str) for c in layers))
    ):
        raise RecipeError(f"{where}.transformer_layer_cls_to_wrap: expected a class name or a list of them.")
    if options.get("state_dict_type", STATE_DICT_TYPES[0]) not in STATE_DICT_TYPES:
        raise RecipeError(
            f"{where}.state_dict_type: one of {list(STATE_DICT_TYPES)}, got {options['state_dict_type']!r}."
        )
    return options


def deepspeed_config(spec: DistributedSpec) -> dict[str, Any]:
    """`distributed.deepspeed` (a JSON file or an inline mapping) as a checked config dict."""
    source, key = spec.deepspeed, "distributed.deepspeed"
    if source is None:
        raise RecipeError(
            f"{key}: required with strategy deepspeed: a DeepSpeed JSON config (e.g. recipes/deepspeed/zero2.json "
            "or zero3.json) or an inline mapping."
        )
    if isinstance(source, str):
        path = Path(source).expanduser()
        try:
            config = json.loads(path.read_text())
        except OSError as err:
            raise RecipeError(f"{key}: cannot read {path} ({err.strerror or err}).") from None
        except ValueError as err:
            raise RecipeError(f"{key}: {path} is not valid JSON ({err}).") from None
        if not isinstance(config, dict):
            raise RecipeError(f"{key}: {path} holds {type(config).__name__}, not a JSON object.")
    else:
        config = copy.deepcopy(source)
    for section, why in DEEPSPEED_REFUSED.items():
        if section in config:
            raise RecipeError(f"{key}: remove the {section!r} section: {why}.")
    zero = config.get("zero_optimization", {})
    if not isinstance(zero, dict) or zero.get("stage", 0) not in (0, 1, 2, 3):
        raise RecipeError(f"{key}: zero_optimization.stage must be 0, 1, 2 or 3, got {zero!r}.")
    offload = zero.get("offload_optimizer") or {}
    if isinstance(offload, dict) and offload.get("device", "none") != "none":
        # The optimizer is vlm-peft's torch one (its parameter groups carry the two learning rates); only
        # projector and LoRA train, so stepping it on the offloaded fp32 states on the CPU is cheap.
        config.setdefault("zero_force_ds_cpu_optimizer", False)
    return config


def zero_stage(config: dict[str, Any]) -> int:
    return int(config.get("zero_optimization", {}).get("stage", 0))


def check_wrapped_classes(spec: DistributedSpec, model: Any) -> None:
    """FSDP's layer classes name classes of this model (accelerate would fail on them only once it shards)."""
    named = (fsdp_options(spec) if spec.strategy == "fsdp" else {}).get("transformer_layer_cls_to_wrap")
    if not named:
        return
    present = {type(m).__name__ for m in model.modules()}
    missing = [c for c in ([named] if isinstance(named, str) else named) if c not in present]
    if missing:
        raise RecipeError(
            f"distributed.fsdp.transformer_layer_cls_to_wrap: {missing} not among the model's module classes "
            f"(its decoder layer is {sorted(c for c in present if c.endswith('DecoderLayer'))})."
        )
