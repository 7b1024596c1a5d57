"""Logits only where the loss is (issue 15): a training step whose LM head projects every position vs
one that projects only the supervised ones, at the real Qwen3-0.6B + CLIP-B/16 size (random weights),
against transformers' LlavaForConditionalGeneration with the same MLP projector, in one run.

Stage 1 supervises a caption after the image and a prompt; stage 2 an answer, with LoRA r=16. The
variants differ only in how the loss is computed: transformers' own path (`labels=`, full logits),
TRL's fused LM head over every position (what SFTTrainer does off CUDA), transformers' logits at the
supervised positions only (`logits_to_keep`, what evaluation uses), and the shipped training path (TRL's
fused head over the supervised positions only, `vlm_peft.training.answer_logits`: on devices without TRL's
Triton kernel, such as this CPU, `AnswerHead` projects them, computing the gradient in the forward where
TRL's torch fallback recomputes each tile in the backward).

Run: `python -m bench.answer_logits` (real size, ~20 min on 2 CPU cores), `--head` (the LM head alone, ~2 min)
or `--quick` (toy, for CI).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, replace
from functools import partial
from unittest import mock

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlavaConfig, LlavaForConditionalGeneration, Qwen3Config, Qwen3ForCausalLM
from trl.kernels import ChunkedLogProbFunction
from trl.trainer.utils import add_fused_lm_head

from vlm_peft import VLMConfig, add_lora, attach, detach
from vlm_peft.model.lora import DECODER_TARGETS
from vlm_peft.model.vision import VisionTower, build_vision_model
from vlm_peft.tiny import tiny_clip_config, tiny_qwen3_config
from vlm_peft.training.answer_logits import (
    TOKENS_PER_TILE,
    AnswerHead,
    _Head,
    answer_logits,
    answer_positions_only,
)

from .overhead import IMAGE_ID, side_by_side
from .sizes import CLIP_B16, QWEN3_0_6B


@dataclass(frozen=True)
class Size:
    llm: dict
    clip: dict
    batch: int
    repeats: int
    # (prompt tokens, supervised tokens) per row, for stage 1 (a caption) and stage 2 (an answer)
    stages: tuple[tuple[int, int], tuple[int, int]] = ((24, 20), (48, 60))
    # supervised positions at which the LM head alone is timed
    head_positions: tuple[int, ...] = (40, 120, 1024)


REAL = Size(llm=QWEN3_0_6B, clip=CLIP_B16, batch=2, repeats=3)
QUICK = Size(
    llm=tiny_qwen3_config(vocab_size=151_936).to_dict(),  # the real vocab: the LM head's share is the point
    clip={**tiny_clip_config(), "num_hidden_layers": 1},
    batch=2,
    repeats=1,
    stages=((8, 4), (12, 6)),
    head_positions=(40, 120),
)


def patches(s: Size) -> int:
    return (s.clip["image_size"] // s.clip["patch_size"]) ** 2


def batch(s: Size, prompt: int, supervised: int, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Rows of [prompt start, image, rest of prompt, supervised text]; labels only on the last part."""
    g = torch.Generator().manual_seed(prompt)
    text = torch.randint(0, 150_000, (s.batch, prompt + supervised), generator=g)
    image = torch.full((s.batch, patches(s)), IMAGE_ID)
    ids = torch.cat([text[:, :8], image, text[:, 8:]], dim=1)
    labels = torch.full_like(ids, -100)
    labels[:, -supervised:] = ids[:, -supervised:]
    return {"input_ids": ids, "labels": labels, "pixel_values": pixels}


def step(model: torch.nn.Module, inputs: dict, how: str) -> float:
    """One training step: forward, backward, AdamW update of what is trainable."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    start = time.perf_counter()
    if how == "full":
        loss = model(**inputs, use_cache=False).loss
    elif how == "keep":
        logits, labels = answer_logits(model, inputs)
        loss = torch.nn.functional.cross_entropy(logits.float(), labels)
    else:
        # "tiles": TRL's own head over the supervised positions (its torch fallback here), not AnswerHead.
        tiles = mock.patch.object(_Head, "covers", lambda *a: False) if how == "tiles" else nullcontext()
        with answer_positions_only() if how in ("answer", "tiles") else nullcontext(), tiles:
            loss = model(**inputs, use_cache=False, fused_lm_head=True).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def llava(s: Size, lora: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(
        LlavaConfig(
            text_config=Qwen3Config(**s.llm).to_dict(),
            vision_config=dict(s.clip),
            image_token_id=IMAGE_ID,
            vision_feature_layer=-1,
            vision_feature_select_strategy="default",
            projector_hidden_act="gelu",
        )
    )
    model.requires_grad_(False)
    model.model.multi_modal_projector.requires_grad_(True)
    if lora:
        # The same layers as vlm-peft's LoRA, under Llava's module names.
        targets = DECODER_TARGETS.replace(r"model\.layers", r"model\.language_model\.layers")
        config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=targets)
        model = get_peft_model(model, config)
        model.base_model.model.model.multi_modal_projector.requires_grad_(True)
    return model


def run_stage(s: Size, llm: Qwen3ForCausalLM, tower: VisionTower, stage: int) -> list[str]:
    prompt, supervised = s.stages[stage - 1]
    torch.manual_seed(3)
    pixels = torch.randn(s.batch, 3, s.clip["image_size"], s.clip["image_size"])
    inputs = batch(s, prompt, supervised, pixels)
    peer = llava(s, lora=stage == 2)

    def ours(kind: str, how: str) -> Callable[[], float]:
        def run() -> float:
            # One attach at a time on the shared LLM: each step gets a fresh projector (and LoRA).
            cfg = VLMConfig(
                vision_config=s.clip, projector=kind, num_image_tokens=patches(s), projector_dropout=0.0,
                image_token_id=IMAGE_ID,
            )  # fmt: skip
            model = attach(llm, cfg, vision=tower)
            model = add_lora(model, r=16, lora_dropout=0.0) if stage == 2 else model
            try:
                return step(model, inputs, how)
            finally:
                detach(model)

        return run

    variants = {
        "transformers Llava, MLP, full logits": lambda: step(peer, inputs, "full"),
        "vlm-peft mlp, full logits (transformers loss)": ours("mlp", "full"),
        "vlm-peft mlp, TRL fused head, every position": ours("mlp", "every"),
        "vlm-peft mlp, logits_to_keep + cross-entropy": ours("mlp", "keep"),
        "vlm-peft mlp, supervised only, TRL's tiles": ours("mlp", "tiles"),
        "vlm-peft mlp, supervised positions only (shipped)": ours("mlp", "answer"),
        "vlm-peft cross-attention, supervised only (shipped)": ours("cross_attention", "answer"),
    }
    times = side_by_side(variants, s.repeats)
    base = statistics.median(times["transformers Llava, MLP, full logits"])
    full = statistics.median(times["vlm-peft mlp, full logits (transformers loss)"])
    rows, seq = inputs["input_ids"].shape
    what = "caption" if stage == 1 else "answer, LoRA r=16"
    lines = [
        f"stage {stage} step ({what}): batch {rows} x {seq} tokens, {supervised} supervised per row"
        f" ({supervised / seq:.0%}); ratio = time / Llava's, and / vlm-peft mlp with full logits"
    ]
    for name, values in times.items():
        med = statistics.median(values)
        lines.append(
            f"  {name:<52} {med * 1e3:9.0f} ms  [{min(values) * 1e3:.0f}-{max(values) * 1e3:.0f}]"
            f"  {med / base:5.2f}x Llava  {med / full:5.2f}x full"
        )
    return lines


def _head_step(head: Callable, states: torch.Tensor, targets: torch.Tensor) -> float:
    h = states.clone().requires_grad_()
    start = time.perf_counter()
    head(h, targets).sum().backward()
    return time.perf_counter() - start


def head_alone(s: Size, repeats: int) -> list[str]:
    """The LM head alone, forward + backward to its input at N positions: TRL's torch fallback, AnswerHead,
    and materialised logits + log-softmax (what `logits_to_keep` runs), interleaved."""
    hidden, vocab = s.llm["hidden_size"], s.llm["vocab_size"]
    weight = torch.randn(vocab, hidden, generator=torch.Generator().manual_seed(0)) * 0.02
    outputs = ("log_probs", "entropy", "is_top1")

    def materialised(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logp = (h @ weight.t()).log_softmax(-1)
        with torch.no_grad():  # the logged metrics, as the heads compute them
            (logp.exp() * logp).sum(-1), logp.argmax(-1)
        return logp.gather(1, t[:, None])[:, 0]

    heads = {
        "TRL's tiles (torch fallback)": lambda h, t: ChunkedLogProbFunction.apply(
            h, weight, None, t, 1.0, 32_768, None, 1.0, outputs
        )[0],
        "AnswerHead (shipped off Triton)": lambda h, t: AnswerHead.apply(h, weight, None, t, 1.0, outputs)[0],
        "materialised logits": materialised,
    }
    lines = [f"LM head alone ({hidden} x {vocab:,}), forward + backward to its input, median of {repeats}:"]
    for n in s.head_positions:
        inputs = torch.randn(n, hidden), torch.randint(0, vocab, (n,))
        times = side_by_side({name: partial(_head_step, head, *inputs) for name, head in heads.items()}, repeats)
        meds = {name: statistics.median(v) for name, v in times.items()}
        base = meds["TRL's tiles (torch fallback)"]
        cells = [f"{k} {v * 1e3:.0f} ms ({v / base:.2f}x)" for k, v in meds.items()]
        lines.append(f"  {n:5d} positions: " + "; ".join(cells))
    return lines


def memory_estimate() -> list[str]:
    """GPU memory of the loss's logits in the Qwen3-0.6B sft recipe (bf16, batch 4 x 2048 tokens), by formula."""
    b, seq, vocab = 4, 2048, 151_936
    supervised = 0.25  # share of an sft row's tokens in the answer (LLaVA-665k-like, after 196 image tokens)
    gib = 2**30
    full = b * seq * vocab * (2 + 4)  # bf16 logits + the fp32 copy transformers' loss upcasts to
    tile = 4096 * 32_768 * 4  # TRL's fused head: one fp32 tile of token chunk x vocabulary chunk at a time
    ours = 2 * TOKENS_PER_TILE * vocab * 4  # AnswerHead: a tile's fp32 log-probabilities and probabilities
    return [
        "estimated GPU memory of the logits, Qwen3-0.6B sft recipe (bf16, batch 4 x 2048 tokens):",
        f"  transformers' loss path (bf16 logits + fp32 upcast): {full / gib:.2f} GiB;"
        f" supervised positions only ({supervised:.0%} of tokens; evaluation): {full * supervised / gib:.2f} GiB;"
        f" training: TRL's fused head (Triton): {tile / gib:.2f} GiB, AnswerHead (no Triton): {ours / gib:.2f} GiB",
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, help="interleaved steps per variant (default: 3 real, 1 quick)")
    parser.add_argument("--head", action="store_true", help="only the LM head alone (~2 min at real size)")
    args = parser.parse_args(argv)
    s = QUICK if args.quick else REAL
    s = replace(s, repeats=args.repeats) if args.repeats else s
    if args.head:
        for line in head_alone(s, max(s.repeats, 5)):
            print(line)
        return
    torch.manual_seed(0)
    llm = Qwen3ForCausalLM(Qwen3Config(**s.llm)).eval()
    add_fused_lm_head(llm, outputs=("log_probs", "entropy", "is_top1"))  # as SFTTrainer does
    tower = VisionTower(build_vision_model(s.clip))
    print(
        f"Qwen3 {s.llm['num_hidden_layers']} layers x {s.llm['hidden_size']}, vocab {s.llm['vocab_size']:,};"
        f" CLIP {s.clip['num_hidden_layers']} layers @ {s.clip['image_size']} px, {patches(s)} image tokens;"
        f" fp32 CPU, {torch.get_num_threads()} threads; median of {s.repeats} interleaved steps after a warm-up"
    )
    for stage in (1, 2):
        for line in run_stage(s, llm, tower, stage):
            print(line)
    for line in head_alone(s, s.repeats):
        print(line)
    for line in memory_estimate():
        print(line)


if __name__ == "__main__":
    main()
