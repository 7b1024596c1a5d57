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
# Vocabulary rows cast at a time where the head's dtype is not the one computed in (as TRL's chunks).
VOCAB_CHUNK = 32_768
_warned = False


def _weight_chunks(weight: torch.Tensor, dtype: torch.dtype) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(start, end, weight[start:end] in `dtype`): the whole head when it already is, so one matmul and no copy."""
    if weight.dtype == dtype:
        yield 0, weight.shape[0], weight
        return
    for start in range(0, weight.shape[0], VOCAB_CHUNK):
        end = min(start + VOCAB_CHUNK, weight.shape[0])
        yield start, end, weight[start:end].to(dtype)


class AnswerHead(torch.autograd.Function):
    """What TRL's `ChunkedLogProbFunction` computes for SFT (log p(target), entropy, is the target the top-1;
    per position) for devices without its Triton kernels, by tiles of positions over the whole vocabulary.
    The gradient of log p(target) to the logits is onehot - softmax whatever the incoming gradient, so the
    forward also computes d log p / d hidden ([N, hidden], small) and the backward only scales it: two
    matmuls per tile where TRL's torch fallback recomputes each tile (three). Entropy and top-1 are for
    logging (SFTTrainer detaches them): they carry no gradient."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, scale: float, outputs: tuple[str, ...]) -> tuple:  # fmt: skip
        device = hidden.device
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else hidden.dtype
        n, f32 = hidden.shape[0], torch.float32
        log_probs = torch.empty(n, device=device, dtype=f32)
        entropy = torch.empty(n, device=device, dtype=f32) if "entropy" in outputs else None
        is_top1 = torch.empty(n, device=device, dtype=torch.bool) if "is_top1" in outputs else None
        grad = torch.zeros(hidden.shape, device=device, dtype=f32) if ctx.needs_input_grad[0] else None
        # Logits in the compute dtype, as the model's head would; everything after them in fp32 (autocast would
        # round onehot - softmax to bf16, where a confident p(target) becomes exactly 1 and its gradient 0).
        with torch.autocast(device.type, enabled=False):
            for start in range(0, n, TOKENS_PER_TILE):
                end = min(start + TOKENS_PER_TILE, n)
                rows, tgt, h = torch.arange(end - start, device=device), targets[start:end], hidden[start:end].to(dtype)
                tiles = [torch.mm(h, w.t()) for _, _, w in _weight_chunks(weight, dtype)]
                logits = tiles[0] if len(tiles) == 1 else torch.cat(tiles, 1)
                del tiles
                logits = (logits if bias is None else logits + bias.to(dtype)).float()
                if scale != 1.0:
                    logits.mul_(scale)
                if is_top1 is not None:  # argmax is the first maximum, as TRL's running max counts ties
                    is_top1[start:end] = logits.argmax(-1) == tgt
                logp = logits.log_softmax(-1)
                del logits
                log_probs[start:end] = logp[rows, tgt]
                probs = logp.exp()
                if entropy is not None:  # a batched dot product: no [tile, vocab] product tensor
                    entropy[start:end] = -torch.linalg.vecdot(probs, logp)
                del logp
                if grad is not None:  # d log p(target) / d hidden = (onehot - softmax) @ weight, times the scale
                    probs.neg_()[rows, tgt] += 1
                    for v0, v1, w in _weight_chunks(weight, f32):
                        grad[start:end].addmm_(probs[:, v0:v1], w)
        if grad is not None:
            grad.mul_(scale)
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
    no Triton kernel and the call is one it covers (an eager device, a frozen head, no softcapping, no gradient
    through the entropy, the outputs SFTTrainer logs); TRL's own function for everything else."""

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
        eager = hidden.device.type in EAGER and not self.triton(hidden.device)
        frozen = not weight.requires_grad and (bias is None or not bias.requires_grad)
        logged = set(outputs) <= {"log_probs", "entropy", "is_top1"}
        return eager and frozen and logged and softcap is None


@contextmanager
def answer_positions_only() -> Iterator[None]:
    """Within it, TRL's fused LM head projects only the supervised positions on every device."""
    global _warned
    decide = getattr(trl_utils, "_use_triton", None)
    head = getattr(trl_utils, "_ChunkedLogProbFunction", None)
    if decide is None or head is None:
        if not _warned:
            logger.warning(
                "this TRL has no _use_triton / _ChunkedLogProbFunction: off CUDA its head projects every position"
            )
            _warned = True
        yield
        return
    # Only the compact-or-tile decision changes: the kernels module keeps its own switch for Triton.
    # (Module globals: a Trainer computes its losses on one thread.)
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
