"""Padding-free packing vs padded batches: training-step throughput on a LLaVA-665k-like length spread,
at the demo's tiny size and at Qwen3-0.6B width with few layers (random weights), side by side.

Why: packing exists to stop computing padding. With answers from a few tokens to ~1,000 (LLaVA-665k mixes
one-word VQA answers with long descriptions), a padded batch is mostly padding; packed, the same rows
cost their own tokens only. Each step here is forward + backward of the loss (projector + LoRA trainable,
LLM frozen) on the same rows both ways; throughput counts real tokens. Image features are precomputed
(as with a feature cache): the vision tower costs the same either way and would only dilute the ratio.

Both layouts of vlm_peft.data.packing run: `rows` (what `packing: true` picks for SDPA: the batch's
conversations filled into rows as wide as its longest one) and `flat` (one row: the layout for varlen
kernels). SDPA masks a row as a whole and computes every pair of it: `attn pairs` counts them,
relative to padded; a flat row under SDPA costs N x (1 - padding)^2 the padded pairs. Flash attention's
varlen kernels (GPU) compute each conversation's own pairs instead (the last line of each table).

Run: `python -m bench.packing` (~5 min on 2 idle CPU cores) or `--quick` (toy sizes, for CI).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
import zlib
from dataclasses import dataclass
from typing import Any

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from vlm_peft import VLMConfig, VLMProcessor, add_lora, attach
from vlm_peft.data.collator import VLMCollator
from vlm_peft.data.packing import pack
from vlm_peft.data.rows import normalize_row
from vlm_peft.tiny import tiny_image_processor, tiny_tokenizer

from .sizes import CLIP_B16, QWEN3_0_6B

WORDS = (
    "the a picture shows man woman dog cat red blue green table street car sign left right of on in with "
    "two three small large white black sitting standing next to behind front building tree sky water"
).split()


@dataclass
class Size:
    name: str
    llm: dict[str, Any]
    clip: dict[str, Any]
    tokens: int  # image tokens per image
    batch: int  # rows per step
    batches: int  # steps per repetition (the same rows both ways)
    repeats: int
    max_length: int


TINY_LLM = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    tie_word_embeddings=True,
)  # the demo recipe's
TINY_CLIP = dict(
    model_type="clip_vision_model",
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=1,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
)
REAL_WIDTH = {k: v for k, v in QWEN3_0_6B.items() if k != "vocab_size"} | {"num_hidden_layers": 2}
# Rows per step as the real recipe's stage 2 (4) and twice that at the tiny size; max_length 2048 as there.
SIZES = {
    "tiny": Size(
        "tiny (the demo's Qwen3: hidden 128, 4 layers; 16 image tokens)", TINY_LLM, TINY_CLIP, 16, 8, 6, 2, 2048
    ),
    "real": Size(
        "Qwen3-0.6B width (hidden 1024, 2 of its 28 layers; 196 image tokens)",
        REAL_WIDTH,
        CLIP_B16,
        196,
        4,
        10,
        1,
        2048,
    ),
}
QUICK = {
    "tiny": Size("tiny, quick", TINY_LLM, TINY_CLIP, 16, 4, 2, 1, 256),
    "real": Size(
        "narrower stand-in for real width, quick", TINY_LLM | {"num_hidden_layers": 1}, TINY_CLIP, 16, 4, 2, 1, 256
    ),
}


def answer_words(rng: random.Random, longest: int) -> int:
    """LLaVA-665k-like: half short VQA answers (a word or a phrase), a third a sentence or a paragraph,
    the rest long descriptions up to ~`longest` tokens."""
    pick = rng.random()
    if pick < 0.5:
        return rng.randint(1, 8)
    if pick < 0.83:
        return int(10 * (12 ** rng.random()))  # 10-120, log-uniform
    return rng.randint(longest // 6, longest)


def make_rows(count: int, longest: int, seed: int = 0) -> list[dict[str, Any]]:
    """Conversations of 1-3 turns; one image (none in 5 %), as LLaVA-665k's rows."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        messages = []
        image = rng.random() >= 0.05
        for turn in range(rng.choice((1, 1, 2, 3))):
            question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 20))) + "?"
            content: list[dict[str, Any]] = [{"type": "text", "text": question}]
            if image and turn == 0:
                content.insert(0, {"type": "image"})
            answer = " ".join(rng.choice(WORDS) for _ in range(answer_words(rng, longest))) + "."
            messages += [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]
        rows.append(normalize_row({"messages": messages, "images": [f"{i}.png"] if image else []}, f"row {i}"))
    return rows


class RandomFeatures:
    """Stands in for a FeatureCache: the tower's patch features of each image (random, fixed per image)."""

    def __init__(self, patches: int, width: int) -> None:
        self.shape = (patches, width)

    def features(self, refs: list[str], image_root: Any, where: str = "") -> torch.Tensor:
        seeds = [zlib.crc32(ref.encode()) for ref in refs]
        return torch.stack([torch.randn(self.shape, generator=torch.Generator().manual_seed(s)) for s in seeds])


def build(size: Size, vocab: int, image_token_id: int) -> torch.nn.Module:
    torch.manual_seed(0)
    llm = Qwen3ForCausalLM(Qwen3Config(vocab_size=vocab, **size.llm))
    cfg = VLMConfig(
        vision_config=size.clip, num_image_tokens=size.tokens, projector_dropout=0.0, image_token_id=image_token_id
    )
    model = add_lora(attach(llm, cfg), r=16, lora_dropout=0.0)
    return model.train()


def step(model: torch.nn.Module, batch: dict[str, Any]) -> float:
    start = time.perf_counter()
    model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def attention_pairs(batch: dict[str, Any]) -> int:
    """Query-key pairs that SDPA / eager compute per layer and head: every pair of every row, masked or not."""
    return batch["input_ids"].shape[0] * batch["input_ids"].shape[1] ** 2


def varlen_pairs(batch: dict[str, Any]) -> int:
    """What a varlen kernel (flash attention) computes instead: each conversation's own pairs."""
    return int((batch["attention_mask"].sum(1) ** 2).sum())


def measure(size: Size, quick: bool) -> list[str]:
    tokenizer = tiny_tokenizer([" ".join(WORDS)] * 20)
    processor = VLMProcessor(tiny_image_processor(size.clip["image_size"]), tokenizer, num_image_tokens=size.tokens)
    patches = (size.clip["image_size"] // size.clip["patch_size"]) ** 2
    collator = VLMCollator(
        processor, max_length=size.max_length, features=RandomFeatures(patches, size.clip["hidden_size"])
    )
    rows = make_rows(size.batch * size.batches, 60 if quick else 1000)
    padded = [collator(rows[i : i + size.batch]) for i in range(0, len(rows), size.batch)]
    pad = tokenizer.pad_token_id
    # What `packing: true` does with SDPA (rows), and the flat row that varlen kernels get.
    variants = {"padded": padded, **{f"packed, {k}": [pack(b, k, pad) for b in padded] for k in ("rows", "flat")}}
    model = build(size, len(tokenizer), processor.image_token_id)
    real = sum(int(b["attention_mask"].sum()) for b in padded)
    lengths = sorted(int(n) for b in padded for n in b["attention_mask"].sum(1))

    smallest = min(range(len(padded)), key=lambda i: padded[i]["input_ids"].numel())
    for batches in variants.values():  # warm-up
        step(model, batches[smallest])
    totals: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(size.repeats):
        spent = dict.fromkeys(variants, 0.0)
        for i in range(len(padded)):  # interleaved step by step: drift on a shared machine hits all alike
            for name, batches in variants.items():
                spent[name] += step(model, batches[i])
        for name, value in spent.items():
            totals[name].append(value)
    seconds = {name: statistics.median(values) for name, values in totals.items()}
    deciles = statistics.quantiles(lengths, n=10)
    base_pairs = sum(attention_pairs(b) for b in padded)
    lines = [
        f"{size.name}: {len(rows)} rows, {len(padded)} steps of {size.batch} rows, max_length {size.max_length}; "
        f"tokens per row: median {statistics.median(lengths):.0f}, p10 {deciles[0]:.0f}, p90 {deciles[-1]:.0f}, "
        f"max {lengths[-1]}",
        f"  {'':<13} {'positions':>10} {'padding':>8} {'attn pairs':>11} {'s/step':>7} {'real tok/s':>11} {'speed':>7}",
    ]
    for name, batches in variants.items():
        positions = sum(b["input_ids"].numel() for b in batches)
        pairs = sum(attention_pairs(b) for b in batches) / base_pairs
        speed = seconds["padded"] / seconds[name]
        lines.append(
            f"  {name:<13} {positions:>10} {1 - real / positions:>8.1%} {pairs:>10.2f}x "
            f"{seconds[name] / len(batches):>7.2f} {real / seconds[name]:>11.0f} {speed:>6.2f}x"
        )
    varlen = sum(varlen_pairs(b) for b in padded) / base_pairs
    lines.append(
        f"  (a varlen kernel, flash attention on a GPU, computes {varlen:.2f}x the padded pairs on the flat rows)"
    )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="toy sizes (CI)")
    parser.add_argument("--only", choices=("tiny", "real"))
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else SIZES
    print(
        "packed vs padded training steps (forward + backward; projector + LoRA r=16 trainable; image features "
        "precomputed; SDPA); the same rows every way, real tokens per second, medians of interleaved repetitions"
    )
    for key, size in sizes.items():
        if args.only in (None, key):
            for line in measure(size, args.quick):
                print(line, flush=True)


if __name__ == "__main__":
    main()
