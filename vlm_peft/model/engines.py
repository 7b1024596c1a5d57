"""What training engines do to a model, and how to read it whole again.

Parameters: FSDP2 shards them as DTensors, DeepSpeed ZeRO-3 partitions them in place (a placeholder
of shape [0] with a `ds_id`). Reading such a parameter as a plain tensor gives a shard or nothing, so
saving or measuring one goes through `gathered`, which every process must call together (it is a
collective). Modules: activation checkpointing wraps decoder layers, which puts the wrapper in module
names (not in state-dict names); `unwrapped_tree` takes the wrappers out while an adapter is saved.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn


def is_sharded(tensor: torch.Tensor) -> bool:
    return _is_dtensor(tensor) or hasattr(tensor, "ds_id")


def gathers_per_call(module: nn.Module) -> bool:
    """Whether calling `module` gathers its weights from the other processes (ZeRO-3 partitions them; an
    FSDP2 unit of its own gathers at each call): then every process must call it whatever its batch holds,
    or the others wait on a gather it never joins."""
    if any(hasattr(p, "ds_id") for p in module.parameters()):
        return True
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return any(isinstance(m, FSDPModule) for m in module.modules())


def numel(tensor: torch.Tensor) -> int:
    """The whole tensor's size (a ZeRO-3 placeholder's own is 0; a DTensor's is already the global one)."""
    return getattr(tensor, "ds_numel", None) or tensor.numel()


def _is_dtensor(tensor: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed
        return False
    return isinstance(tensor, DTensor)


@contextlib.contextmanager
def gathered(tensors: Sequence[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    """Whole copies of `tensors` (the tensors themselves when none is sharded). Collective when any
    is sharded: every process calls it with the same tensors in the same order."""
    partitioned = [t for t in tensors if hasattr(t, "ds_id")]
    context = contextlib.nullcontext()
    if partitioned:
        import deepspeed

        context = deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)
    with context, torch.no_grad():
        # Copies: a ZeRO-3 parameter is freed again when the context ends.
        yield [
            t.full_tensor() if _is_dtensor(t) else t.detach().clone() if hasattr(t, "ds_id") else t.detach()
            for t in tensors
        ]


# Wrappers that engines put around submodules (activation checkpointing, torch.compile, FSDP1) and
# that show in state-dict names; the names an adapter dir stores are the unwrapped model's.
WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def canonical(name: str) -> str:
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def whole_state(module: nn.Module, keep: Callable[[str], bool]) -> dict[str, torch.Tensor]:
    """`module.state_dict()` entries whose (unwrapped) names `keep` accepts, each whole: gathered where
    sharded, and then collective (every process calls it). What DeepSpeed trains is read from its fp32
    master weights: under bf16 training the module holds only bf16 copies."""
    state = module.state_dict(keep_vars=True)
    items = [(canonical(name), t) for name, t in state.items() if keep(canonical(name))]
    masters = {name: _fp32_master(t) for name, t in items}
    rest = [(name, t) for name, t in items if masters[name] is None]
    with gathered([t for _, t in rest]) as whole:
        out = {name: t.detach().cpu() for (name, _), t in zip(rest, whole)}
    return {name: out[name] if masters[name] is None else masters[name].detach().cpu() for name, _ in items}


def _fp32_master(tensor: torch.Tensor) -> torch.Tensor | None:
    """DeepSpeed's fp32 copy of a parameter it trains, whole (collective: DeepSpeed marks the same
    parameters on every process), or None."""
    trained = hasattr(tensor, "_hp_mapping") or (hasattr(tensor, "_z3_optimizer") and tensor.requires_grad)
    if not trained:
        return None
    from deepspeed.utils import safe_get_full_fp32_param

    return safe_get_full_fp32_param(tensor)


@contextlib.contextmanager
def unwrapped_tree(model: nn.Module) -> Iterator[None]:
    """The module tree without activation-checkpointing / offload wrappers for the duration (no tensor is
    touched): PEFT finds its layers by module name, and state-dict names carry no wrapper."""
    swapped = []
    while True:
        found = next(((n, m) for n, m in model.named_modules() if hasattr(m, "_checkpoint_wrapped_module")), None)
        if found is None:
            break
        name, wrapper = found
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        parent._modules[child] = wrapper._checkpoint_wrapped_module
        swapped.append((parent, child, wrapper))
    try:
        yield
    finally:
        for parent, child, wrapper in reversed(swapped):
            parent._modules[child] = wrapper


def refuse_sharded(tensors: dict[str, torch.Tensor], what: str, fix: str) -> None:
    """A clear error instead of reading shards or [0]-shaped placeholders as if they were weights."""
    sharded = [name for name, t in tensors.items() if is_sharded(t)]
    if sharded:
        more = f" (and {len(sharded) - 1} more)" if len(sharded) > 1 else ""
        raise ValueError(
            f"{what}: {sharded[0]}{more} is sharded across processes (FSDP / DeepSpeed ZeRO-3), so this process "
            f"holds only a part of it; {fix}"
        )
