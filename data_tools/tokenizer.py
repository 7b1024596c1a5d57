"""Train a tiny byte-level BPE on the texts of canonical datasets, for from-scratch experiments.

A recipe with `llm.random` (a tiny Qwen3 with random weights, to try an idea in minutes on a CPU)
needs a tokenizer whose vocabulary fits the tiny model; Qwen3's own 151,669-token vocabulary would
make the embedding table most of the model. This trains one on what the datasets say, rendered in
Qwen3's chat format (tools and tool calls included), with all of Qwen3's added tokens: the `<|…|>`
ones special, the tool-call / tool-response / think markers as text, as in Qwen3. For a pretrained
Qwen3 base, use its own tokenizer (the base dir, or `llm.tokenizer: Qwen/Qwen3-0.6B`).

    vlm-peft data tokenizer data/train.jsonl data/eval.jsonl runs/tok --vocab-size 1024

then in the recipe: `llm: {random: {...}, tokenizer: runs/tok}`.
"""

from __future__ import annotations

import argparse
import logging
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from tokenizers import AddedToken
from transformers import PreTrainedTokenizerFast

from vlm_peft import VLMProcessor
from vlm_peft.data.rows import load_rows, row_tools
from vlm_peft.tiny import QWEN3_ADDED_TOKENS, tiny_image_processor, tiny_tokenizer

log = logging.getLogger(__name__)

SPECIAL = [t for t in QWEN3_ADDED_TOKENS if t.startswith("<|")]
TEXT_MARKERS = [t for t in QWEN3_ADDED_TOKENS if not t.startswith("<|")]


def chat_texts(rows: Iterable[dict[str, Any]]) -> Iterator[str]:
    """The rows rendered in the chat format, cut at the added tokens (the BPE trainer would otherwise
    spend merges on pieces like `|><|`; what lies between them is what the tokenizer will see)."""
    # Only the chat template is used; the bootstrap tokenizer never tokenizes the data.
    processor = VLMProcessor(tiny_image_processor(32), tiny_tokenizer(["user"], vocab_size=300), num_image_tokens=1)
    split = re.compile("|".join(re.escape(t) for t in QWEN3_ADDED_TOKENS))
    for row in rows:
        text = processor.apply_chat_template(row["messages"], tools=row_tools(row), tokenize=False)
        yield from (piece for piece in split.split(text) if piece)
    yield "system\n"  # for system prompts, which the data may not have


def train_tokenizer(datasets: list[str | Path], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    rows = (row for path in datasets for row in load_rows(path))
    tokenizer = tiny_tokenizer(chat_texts(rows), vocab_size=vocab_size, special_tokens=SPECIAL)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in TEXT_MARKERS])
    return tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vlm-peft data tokenizer",
        description="Train a tiny byte-level BPE (Qwen3's added tokens) on the texts of canonical datasets, "
        "for recipes with llm.random. A pretrained Qwen3 base brings its own tokenizer.",
    )
    parser.add_argument("data", nargs="+", type=Path, help="canonical datasets (.jsonl, .json, .parquet, dir)")
    parser.add_argument("out", type=Path, help="where to save the tokenizer (a dir)")
    parser.add_argument("--vocab-size", type=int, default=1024, help="BPE vocabulary size (default 1024)")
    args = parser.parse_args(argv)
    if args.vocab_size < 300:
        parser.error("--vocab-size must be at least 300 (256 bytes plus the added tokens).")
    try:
        tokenizer = train_tokenizer(args.data, args.vocab_size)
    except (ValueError, FileNotFoundError) as err:
        log.error("error: %s", err)
        return 1
    tokenizer.save_pretrained(args.out)
    print(f"tokenizer of {len(tokenizer)} tokens -> {args.out}")
    print(f"in the recipe: llm: {{random: {{...}}, tokenizer: {args.out}}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
