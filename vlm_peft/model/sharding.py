"""Parameters that are not whole on this process: FSDP2 shards them as DTensors, DeepSpeed ZeRO-3
partitions them in place (a placeholder of shape [0] with a `ds_id`). Reading such a parameter as a
plain tensor gives a shard or nothing, so saving or measuring one goes through `gathered`, which
every process must call together (it is a collective)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn


def is_sharded(tensor: torch.Tensor) -> bool:
    return _is_dtensor(tensor) or hasattr(tensor, "ds_id")


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


def whole_state(module: nn.Module, keep: callable) -> dict[str, torch.Tensor]:
    """`module.state_dict()` entries whose names `keep` accepts, each whole (gathered where sharded;
    collective then: every process calls it)."""
    items = [(name, t) for name, t in module.state_dict(keep_vars=True).items() if keep(name)]
    with gathered([t for _, t in items]) as whole:
        return {name: t.detach().cpu() for (name, _), t in zip(items, whole)}


def refuse_sharded(tensors: dict[str, torch.Tensor], what: str, fix: str) -> None:
    """A clear error instead of reading shards or [0]-shaped placeholders as if they were weights."""
    sharded = [name for name, t in tensors.items() if is_sharded(t)]
    if sharded:
        raise ValueError(
            f"{what}: {sharded[0]} (and {len(sharded) - 1} more) is sharded across processes (FSDP / DeepSpeed "
            f"ZeRO-3), so this process holds only a part of it; {fix}"
        )
