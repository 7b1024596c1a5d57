"""Logits only where the loss is: the LM head projects the positions whose next token is supervised.

Qwen3's LM head is 1024 x 151,936 at 0.6B (~26 % of the forward FLOPs per token), and a stage's loss
covers a caption or an answer after hundreds of image and prompt tokens, so projecting every position
wastes most of it (BENCHMARKS §10). Training: TRL's fused LM head already projects only the
supervised positions, but only on CUDA/XPU with Triton; elsewhere it projects every position, to keep
tile shapes fixed for compilers (Neuron). Eager devices compile nothing, so `answer_positions_only` has
TRL take its compact path on CPU (and on CUDA without Triton) too. Evaluation: `answer_logits` asks transformers for the
supervised positions' logits (`logits_to_keep` as a boolean mask) instead of all of them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import trl.trainer.utils as trl_utils

from ..data.collator import IGNORE_INDEX

logger = logging.getLogger(__name__)
# Devices whose kernels are not compiled per shape, so a varying count of supervised positions costs nothing.
EAGER = ("cpu", "cuda", "xpu", "mps")
_warned = False


@contextmanager
def answer_positions_only() -> Iterator[None]:
    """Within it, TRL's fused LM head projects only the supervised positions on every device."""
    global _warned
    decide = getattr(trl_utils, "_use_triton", None)
    if decide is None:
        if not _warned:
            logger.warning("this TRL has no _use_triton switch: off CUDA its LM head projects every position")
            _warned = True
        yield
        return
    # Only the compact-or-tile decision changes: the kernels module keeps its own switch for Triton.
    trl_utils._use_triton = lambda device: device.type in EAGER or decide(device)
    try:
        yield
    finally:
        trl_utils._use_triton = decide


def supervised_positions(labels: torch.Tensor) -> torch.Tensor:
    """[batch, seq] bool: the positions whose *next* token has a label (the last never has one)."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return keep


def answer_logits(model: Any, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced logits [supervised tokens, vocab] and their labels [supervised tokens], in row
    order, without the [batch, seq, vocab] logits."""
    labels = inputs["labels"]
    keep = supervised_positions(labels)
    forward = {k: v for k, v in inputs.items() if k != "labels"}
    logits = model(**forward, logits_to_keep=keep, use_cache=False).logits
    return logits, labels[:, 1:][keep[:, :-1]]
