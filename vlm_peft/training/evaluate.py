"""Held-out evaluation: greedy generation, exact match, and the teacher-forced loss."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import datasets
import torch

from ..data.collator import IGNORE_INDEX, VLMCollator
from ..data.processor import VLMProcessor
from ..data.rows import WHERE, open_image, with_images


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def _answer(message: dict[str, Any]) -> str:
    return "".join(p["text"] or "" for p in message["content"] if p["type"] == "text")


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    processor: VLMProcessor,
    rows: datasets.Dataset,
    image_root: str | Path | None,
    *,
    batch_size: int = 32,
    max_new_tokens: int = 32,
    max_samples: int | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Each row's last assistant message is the target; everything before it is the prompt."""
    if max_samples is not None:
        rows = rows.select(range(min(max_samples, len(rows))))
    was_training = model.training
    model.eval()
    try:
        return _evaluate(model, processor, rows, image_root, batch_size, max_new_tokens)
    finally:
        model.train(was_training)


def _evaluate(model, processor, rows, image_root, batch_size: int, max_new_tokens: int):
    tokenizer = processor.tokenizer
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    collator = VLMCollator(processor, image_root)
    predictions: list[dict[str, Any]] = []
    loss_sum, loss_tokens, tokens_right = 0.0, 0, 0
    for start in range(0, len(rows), batch_size):
        batch = [rows[i] for i in range(start, min(start + batch_size, len(rows)))]
        prompts = []
        for offset, row in enumerate(batch):
            where = row.get(WHERE) or f"row {start + offset}"
            images = [open_image(ref, image_root, where) for ref in row.get("images") or []]
            prompts.append(with_images(row["messages"], images)[:-1])
        inputs = processor.apply_chat_template(
            prompts,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            processor_kwargs={"padding": True, "padding_side": "left"},
        )
        inputs = {k: v.to(model.device) for k, v in inputs.items()}
        out = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=end_of_turn,
            pad_token_id=tokenizer.pad_token_id,
        )
        texts = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        labelled = {k: v.to(model.device) for k, v in collator(batch).items()}
        logits = model(**{k: v for k, v in labelled.items() if k != "labels"}).logits
        labels = labelled["labels"][:, 1:]
        answer = labels != IGNORE_INDEX
        # Only the answer positions, in fp32: the full [batch, seq, vocab] in fp32 would not fit at Qwen's vocab.
        answer_logits, answer_labels = logits[:, :-1][answer].float(), labels[answer]
        loss_sum += torch.nn.functional.cross_entropy(answer_logits, answer_labels, reduction="sum").item()
        loss_tokens += int(answer.sum())
        tokens_right += int((answer_logits.argmax(-1) == answer_labels).sum())
        for offset, (row, text) in enumerate(zip(batch, texts)):
            target = _answer(row["messages"][-1])
            predictions.append(
                {
                    "index": start + offset,
                    "prompt": _answer(row["messages"][-2]) if len(row["messages"]) > 1 else "",
                    "target": target,
                    "prediction": text.strip(),
                    "correct": normalize(text) == normalize(target),
                }
            )
    correct = sum(p["correct"] for p in predictions)
    summary = {
        "samples": len(predictions),
        "exact_match": correct / max(len(predictions), 1),
        "loss": loss_sum / max(loss_tokens, 1),
        # Teacher-forced: shows progress before whole answers come out right.
        "token_accuracy": tokens_right / max(loss_tokens, 1),
    }
    return summary, predictions


def format_summary(summary: dict[str, Any], title: str = "held-out") -> str:
    width = max(len(k) for k in summary)
    lines = [f"{title}", "-" * (width + 14)]
    for key, value in summary.items():
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        lines.append(f"{key:<{width}}  {shown:>12}")
    return "\n".join(lines)
