"""Logits only where the loss is: the LM head projects the positions whose next token is supervised.

Qwen3's LM head is 1024 x 151,936 at 0.6B (~26 % of the forward FLOPs per token), and a stage's loss
covers a caption or an answer after hundreds of image and prompt tokens, so projecting every position
wastes most of it (BENCHMARKS §12). Training: TRL's fused LM head already projects only the
supervised positions, but only on CUDA/XPU with Triton; elsewhere it projects every position, to keep
tile shapes fixed for compilers (Neuron), and its torch fallback recomputes every tile in the backward.
Eager devices compile nothing, so within `answer_positions_only` TRL's head projects only the supervised
positions on every device, and where it has no Triton kernel `AnswerHead` does the projecting (one
matmul fewer). Evaluation: `answer_logits` asks transformers for the supervised positions' logits
(`logits_to_keep` as a boolean mask) instead of all of them.
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
# Positions per full-vocabulary tile of AnswerHead: [512, 151,936] fp32 logits are 0.3 GB at a time.
TOKENS_PER_TILE = 512
_warned = False


class AnswerHead(torch.autograd.Function):
    """TRL's `ChunkedLogProbFunction` contract (log p(target), entropy, is the target the top-1; per position)
    for devices without its Triton kernels, by tiles of positions over the whole vocabulary. The gradient of
    log p(target) to the logits is onehot - softmax whatever the incoming gradient, so the forward also
    computes d log p / d hidden ([N, hidden], small) and the backward only scales it: two matmuls per tile
    where TRL's torch fallback recomputes each tile (three). Entropy and top-1 are for logging (SFTTrainer
    detaches them): they carry no gradient."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, scale: float, outputs: tuple[str, ...]) -> tuple:  # fmt: skip
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        w, n = weight.to(dtype), hidden.shape[0]
        log_probs = torch.empty(n, device=hidden.device)
        entropy = torch.empty(n, device=hidden.device) if "entropy" in outputs else None
        is_top1 = torch.empty(n, device=hidden.device, dtype=torch.bool) if "is_top1" in outputs else None
        grad = torch.empty(hidden.shape, device=hidden.device) if ctx.needs_input_grad[0] else None
        w32 = weight.float() if grad is not None else None  # the gradient is accumulated in fp32, as TRL's is
        for start in range(0, n, TOKENS_PER_TILE):
            end = min(start + TOKENS_PER_TILE, n)
            rows, tgt = torch.arange(end - start, device=hidden.device), targets[start:end]
            logits = torch.mm(hidden[start:end].to(dtype), w.t()).float()
            if bias is not None:
                logits += bias.float()
            if is_top1 is not None:  # argmax is the first maximum, as TRL's running max counts ties
                is_top1[start:end] = logits.argmax(-1) == tgt
            logp = (logits if scale == 1.0 else logits * scale).log_softmax(-1)
            del logits
            log_probs[start:end] = logp[rows, tgt]
            probs = logp.exp()
            if entropy is not None:  # a batched dot product: no [tile, vocab] product tensor
                entropy[start:end] = -torch.linalg.vecdot(probs, logp)
            del logp
            if grad is not None:  # d log p(target) / d hidden = (onehot - softmax) @ weight, times the scale
                grad[start:end] = torch.sub(w32[tgt], torch.mm(probs, w32)).mul_(scale)
        ctx.save_for_backward(grad)
        ctx.hidden_dtype = hidden.dtype
        ctx.mark_non_differentiable(*(x for x in (entropy, is_top1) if x is not None))
        return log_probs, entropy, None, None, is_top1

    @staticmethod
    def backward(ctx: Any, grad_log_probs: torch.Tensor | None, *_: Any) -> tuple:
        (grad,) = ctx.saved_tensors
        if grad is None or grad_log_probs is None:
            return (None,) * 6
        return (grad * grad_log_probs.float()[:, None]).to(ctx.hidden_dtype), None, None, None, None, None


class _Head:
    """Stands in for TRL's `_ChunkedLogProbFunction` inside `answer_positions_only`: `AnswerHead` where TRL has
    no Triton kernel and the call is one it covers (frozen head, no softcapping, the outputs SFT logs)."""

    def __init__(self, original: Any, triton: Any) -> None:
        self.original, self.triton = original, triton

    def apply(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
              temperature: float, chunk_size: int, softcap: float | None = None, logit_scale: float = 1.0,
              outputs: tuple[str, ...] = ("log_probs",)) -> tuple:  # fmt: skip
        if not self.covers(hidden, weight, bias, softcap, outputs):
            args = (temperature, chunk_size, softcap, logit_scale, outputs)
            return self.original.apply(hidden, weight, bias, targets, *args)
        return AnswerHead.apply(hidden, weight, bias, targets, logit_scale / temperature, tuple(outputs))

    def covers(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, softcap: float | None,
               outputs: tuple[str, ...]) -> bool:  # fmt: skip
        frozen = not weight.requires_grad and (bias is None or not bias.requires_grad)
        logged = set(outputs) <= {"log_probs", "entropy", "is_top1"}
        return frozen and logged and softcap is None and not self.triton(hidden.device)


@contextmanager
def answer_positions_only() -> Iterator[None]:
    """Within it, TRL's fused LM head projects only the supervised positions on every device."""
    global _warned
    decide = getattr(trl_utils, "_use_triton", None)
    head = getattr(trl_utils, "_ChunkedLogProbFunction", None)
    if decide is None or head is None:
        if not _warned:
            logger.warning("this TRL's fused LM head has no _use_triton switch: off CUDA it projects every position")
            _warned = True
        yield
        return
    # Only the compact-or-tile decision changes: the kernels module keeps its own switch for Triton.
    trl_utils._use_triton = lambda device: device.type in EAGER or decide(device)
    trl_utils._ChunkedLogProbFunction = _Head(head, decide)
    try:
        yield
    finally:
        trl_utils._use_triton = decide
        trl_utils._ChunkedLogProbFunction = head


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
