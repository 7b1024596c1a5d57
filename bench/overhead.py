"""Plugin overhead, a peer (transformers' Llava), tokens per image, and memory, at the real
Qwen3-0.6B + CLIP-B/16 configuration with random weights, measured side by side in one run.

Why: vlm-peft claims to cost little on top of the LLM and to be at least as fast as the usual
implementation. Each figure is a ratio of medians of interleaved repetitions after a warm-up,
so drift on a shared machine hits every variant alike.

Run: `python -m bench.overhead` (real size, ~10 min on 2 CPU cores) or `--quick` (toy, for CI).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration, Qwen3Config, Qwen3ForCausalLM

from vlm_peft import VLMConfig, add_lora, attach, detach
from vlm_peft.model.hooks import get_state
from vlm_peft.model.vision import VisionTower, build_vision_model
from vlm_peft.tiny import tiny_clip_config, tiny_qwen3_config

from .sizes import CLIP_B16, QWEN3_0_6B

IMAGE_ID = 151_655


@dataclass
class Size:
    llm: dict
    clip: dict
    text: int  # text tokens per sample
    batch: int
    repeats: int
    queries: tuple[int, int]  # the two cross-attention sizes compared


# 5 repetitions: on a 2-core machine single steps stray by 5-25 % from the median; 3 left 6 % gaps that were noise.
REAL = Size(llm=QWEN3_0_6B, clip=CLIP_B16, text=64, batch=2, repeats=5, queries=(196, 49))
QUICK = Size(
    llm=tiny_qwen3_config(vocab_size=151_936).to_dict(),  # the real vocab: IMAGE_ID must be in range
    clip={**tiny_clip_config(), "num_hidden_layers": 1},
    text=16,
    batch=2,
    repeats=2,
    queries=(16, 4),
)


def patches(s: Size) -> int:
    return (s.clip["image_size"] // s.clip["patch_size"]) ** 2


def ids_with_image(s: Size, n: int) -> torch.Tensor:
    torch.manual_seed(1)
    text = torch.randint(0, 150_000, (s.batch, s.text))
    image = torch.full((s.batch, n), IMAGE_ID)
    return torch.cat([text[:, :8], image, text[:, 8:]], dim=1)


def text_only(s: Size, length: int) -> torch.Tensor:
    torch.manual_seed(2)
    return torch.randint(0, 150_000, (s.batch, length))


def timed(model: torch.nn.Module, batch: dict) -> float:
    """One training step: forward, backward, AdamW update of what is trainable."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5) if params else None
    start = time.perf_counter()
    out = model(**batch, labels=batch["input_ids"] if "input_ids" in batch else None)
    out.loss.backward()
    if opt:
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def side_by_side(variants: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    for run in variants.values():  # warm-up
        run()
    times: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    for i in range(repeats):
        # Each round starts one variant later, so that no variant always runs right after the same one.
        for name in names[i % len(names) :] + names[: i % len(names)]:
            times[name].append(variants[name]())
    return times


def row(name: str, values: list[float], base: float | None, tokens: int, batch: int) -> str:
    med = statistics.median(values)
    ratio = f"{med / base:6.2f}x" if base else "   1.00x"
    return (
        f"  {name:<38} {med * 1e3:10.0f} ms  [{min(values) * 1e3:.0f}-{max(values) * 1e3:.0f}]  {ratio}"
        f"  {batch / med:7.2f} samples/s  {tokens / med:8.0f} tok/s"
    )


def overhead(s: Size, llm: Qwen3ForCausalLM) -> list[str]:
    """Figure 2: stage-1 / stage-2 steps vs the text-only step of the same Qwen3 on as many tokens."""
    n = s.queries[0]
    ids = ids_with_image(s, n)
    text = {"input_ids": text_only(s, ids.shape[1])}
    cfg = VLMConfig(vision_config=s.clip, num_image_tokens=n, projector_dropout=0.0, image_token_id=IMAGE_ID)
    model = attach(llm, cfg)
    tower = get_state(llm).vision
    torch.manual_seed(3)
    pixels = torch.randn(s.batch, 3, s.clip["image_size"], s.clip["image_size"])
    features = tower(pixels)
    # The text baseline backpropagates through the frozen LLM as stage 1 must (down to the embeddings).
    hook = llm.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_(True))
    stage1 = side_by_side(
        {
            "text only (LLM frozen, grads to inputs)": lambda: timed(model, text),
            "stage 1, features precomputed": lambda: timed(model, {"input_ids": ids, "image_features": features}),
            "stage 1, vision tower in the loop": lambda: timed(model, {"input_ids": ids, "pixel_values": pixels}),
        },
        s.repeats,
    )
    hook.remove()
    model = add_lora(model, r=16)
    stage2 = side_by_side(
        {
            "text only + LoRA r=16": lambda: timed(model, text),
            "stage 2 (+LoRA), features precomputed": lambda: timed(
                model, {"input_ids": ids, "image_features": features}
            ),
            "stage 2 (+LoRA), vision tower in the loop": lambda: timed(
                model, {"input_ids": ids, "pixel_values": pixels}
            ),
        },
        s.repeats,
    )
    detach(model)
    tokens = s.batch * ids.shape[1]
    lines = [f"2. plugin overhead, cross-attention {n} queries, batch {s.batch} x {ids.shape[1]} tokens"]
    for times in (stage1, stage2):
        base = statistics.median(next(iter(times.values())))
        lines += [row(k, v, None if i == 0 else base, tokens, s.batch) for i, (k, v) in enumerate(times.items())]
    return lines


def peers(s: Size, llm: Qwen3ForCausalLM) -> list[str]:
    """Figures 3 and 4: transformers' Llava (MLP projector, 196 tokens) vs vlm-peft projectors."""
    torch.manual_seed(3)
    pixels = torch.randn(s.batch, 3, s.clip["image_size"], s.clip["image_size"])
    llava = LlavaForConditionalGeneration(
        LlavaConfig(
            text_config=Qwen3Config(**s.llm).to_dict(),
            vision_config={k: v for k, v in s.clip.items()},
            image_token_id=IMAGE_ID,
            vision_feature_layer=-1,
            vision_feature_select_strategy="default",
            projector_hidden_act="gelu",
        )
    )
    llava.requires_grad_(False)
    llava.model.multi_modal_projector.requires_grad_(True)
    variants: dict[str, Callable[[], float]] = {
        f"transformers Llava, MLP, {patches(s)} tokens": lambda: timed(
            llava, {"input_ids": ids_with_image(s, patches(s)), "pixel_values": pixels}
        ),
    }

    # One tower for every vlm-peft variant, as Llava keeps its own: only the projector is new per attach.
    tower = VisionTower(build_vision_model(s.clip))

    def ours(kind: str, n: int) -> Callable[[], float]:
        def run() -> float:
            cfg = VLMConfig(
                vision_config=s.clip, projector=kind, num_image_tokens=n, projector_dropout=0.0, image_token_id=IMAGE_ID
            )
            model = attach(llm, cfg, vision=tower)
            try:
                return timed(model, {"input_ids": ids_with_image(s, n), "pixel_values": pixels})
            finally:
                detach(model)

        return run

    variants[f"vlm-peft mlp, {patches(s)} tokens"] = ours("mlp", patches(s))
    for n in s.queries:
        variants[f"vlm-peft cross-attention, {n} tokens"] = ours("cross_attention", n)
    times = side_by_side(variants, s.repeats)
    base = statistics.median(next(iter(times.values())))
    lines = [
        f"3. peer, stage-1 step (tower in the loop, LLM frozen), batch {s.batch}, {s.text} text tokens;"
        " ratio = time / Llava's"
    ]
    for name, values in times.items():
        n = int(name.rsplit(",", 1)[1].split()[0])
        lines.append(row(name, values, base, s.batch * (s.text + n), s.batch))
    a, b = (statistics.median(times[f"vlm-peft cross-attention, {n} tokens"]) for n in s.queries)
    lines.append(f"4. tokens per image: {s.queries[0]} vs {s.queries[1]} queries, step time ratio {a / b:.2f}x")
    return lines


def params(s: Size, llm: Qwen3ForCausalLM) -> list[str]:
    total = sum(p.numel() for p in llm.parameters())
    model = attach(llm, VLMConfig(vision_config=s.clip, num_image_tokens=s.queries[0], image_token_id=IMAGE_ID))
    tower = sum(p.numel() for p in get_state(llm).vision.parameters())
    projector = sum(p.numel() for p in model.vlm_projector.parameters())
    model = add_lora(model, r=16)
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    detach(model)
    return [
        f"6. parameters: LLM {total:,} (frozen), tower {tower:,} (frozen), projector {projector:,}"
        f" (stage 1 trains {projector:,}; stage 2 {projector + lora:,} with LoRA r=16 {lora:,})"
    ]


def rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakRSS(threading.Thread):
    """Samples this process's resident memory every 2 ms (torch kernels release the GIL) until stopped."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = rss_mb()
        self.running = True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, rss_mb())
            time.sleep(0.002)

    def __enter__(self) -> PeakRSS:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.running = False
        self.join()
        self.peak = max(self.peak, rss_mb())


def memory_probe(s: Size, stage: int) -> dict[str, float]:
    """Resident memory (MB) of a fresh process: after building the models, the peak during two steps of
    one stage, and the lifetime peak (ru_maxrss, which building the fp32 LLM can set on its own)."""
    llm = Qwen3ForCausalLM(Qwen3Config(**s.llm)).eval()
    model = attach(
        llm,
        VLMConfig(vision_config=s.clip, num_image_tokens=s.queries[0], projector_dropout=0.0, image_token_id=IMAGE_ID),
    )
    if stage == 2:
        model = add_lora(model, r=16)
    pixels = torch.randn(s.batch, 3, s.clip["image_size"], s.clip["image_size"])
    built = rss_mb()
    with PeakRSS() as sampler:
        for _ in range(2):
            timed(model, {"input_ids": ids_with_image(s, s.queries[0]), "pixel_values": pixels})
    lifetime = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"built_mb": built, "step_peak_mb": sampler.peak, "lifetime_peak_mb": lifetime}


def gpu_estimate(s: Size) -> list[str]:
    """bf16 training memory of the Qwen3-0.6B recipe's sft stage (batch 4, 2048 tokens), by formula."""
    h, layers, heads, vocab = 1024, 28, 16, 151_936
    b, seq = 4, 2048
    weights = (596_049_920 + 85_799_424) * 2  # frozen LLM + tower in bf16
    trainable = 29_272_068 + 10_092_544  # projector (revision 2, 196 tokens) + LoRA r=16
    states = trainable * (4 + 4 + 8)  # fp32 weights, grads, AdamW moments
    # Per layer activations (Korthikanti et al. 2022, bf16, no recomputation): s*b*h*(34 + 5*a*s/h) bytes.
    act_layer = seq * b * h * (34 + 5 * heads * seq / h)
    full = layers * act_layer
    checkpointed = layers * seq * b * h * 2 + act_layer  # layer inputs + one layer recomputed
    logits = b * seq * vocab * 2  # bf16 logits (TRL's fused LM head avoids the fp32 copy)
    gib = 2**30
    return [
        "6. estimated GPU training memory, recipe sft stage (bf16, batch 4 x 2048 tokens):",
        f"  weights {weights / gib:.2f} GiB + trainable states {states / gib:.2f} GiB + logits {logits / gib:.2f} GiB"
        f" + activations: {full / gib:.1f} GiB without / {checkpointed / gib:.2f} GiB with activation checkpointing",
        f"  total ~{(weights + states + logits + full) / gib:.1f} GiB without, "
        f"~{(weights + states + logits + checkpointed) / gib:.1f} GiB with checkpointing",
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--memory-probe", type=int, choices=[1, 2], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    s = QUICK if args.quick else REAL
    if args.memory_probe:
        print(json.dumps(memory_probe(s, args.memory_probe)))
        return
    torch.manual_seed(0)
    llm = Qwen3ForCausalLM(Qwen3Config(**s.llm)).eval()
    print(
        f"Qwen3 {s.llm['num_hidden_layers']} layers x {s.llm['hidden_size']}, CLIP {s.clip['num_hidden_layers']}"
        f" layers x {s.clip['hidden_size']} @ {s.clip['image_size']} px; fp32 CPU, {torch.get_num_threads()} threads;"
        f" median of {s.repeats} interleaved steps after a warm-up [min-max]"
    )
    lines = overhead(s, llm) + peers(s, llm) + params(s, llm)
    for line in lines:
        print(line)
    linux = os.path.exists("/proc/self/statm")
    if not linux:
        print("6. resident memory: skipped (sampling it reads Linux's /proc/self/statm)")
    for stage in (1, 2) if linux else ():
        flag = ["--quick"] if args.quick else []
        done = subprocess.run(
            [sys.executable, "-m", "bench.overhead", *flag, "--memory-probe", str(stage)],
            capture_output=True,
            text=True,
            check=True,
        )
        mem = json.loads(done.stdout.strip().splitlines()[-1])
        print(
            f"6. resident memory, stage {stage} (fresh process): {mem['built_mb']:,.0f} MB after building the models,"
            f" peak {mem['step_peak_mb']:,.0f} MB during two steps (+{mem['step_peak_mb'] - mem['built_mb']:,.0f} MB);"
            f" lifetime peak {mem['lifetime_peak_mb']:,.0f} MB"
        )
    for line in gpu_estimate(s):
        print(line)


if __name__ == "__main__":
    main()
