"""Held-out evaluation: greedy generation, exact match, and the teacher-forced loss."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import datasets
import torch

from ..data.collator import IGNORE_INDEX, VLMCollator, encode_chats
from ..data.processor import VLMProcessor
from ..data.rows import WHERE, group_indices, open_image, row_tools, with_images

logger = logging.getLogger(__name__)


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


THINK = re.compile(r"^\s*<think>.*?</think>\s*", re.S)
TURN_START, EMPTY_THINK = "<|im_start|>assistant\n", "<think>\n\n</think>\n\n"


def _thinks(message: dict[str, Any]) -> bool:
    """An answer trained with reasoning (its own field, or a think block in its text)."""
    return bool(message.get("reasoning_content")) or "</think>" in _answer(message)


def _target(processor: VLMProcessor, messages: list[dict[str, Any]], tools: Any) -> str:
    """What the model should generate for the last turn, as the template renders it: answer, tool-call
    blocks, and the think block when the answer has reasoning (an empty one is prompt); no `<|im_end|>`.

    Taken as the last turn's part of the whole rendered conversation, so it holds whatever the
    template does with the turn (a prompt rendered with the generation prompt may differ from it,
    e.g. no think block after a conversation without a user turn)."""
    full = processor.apply_chat_template(messages, tools=tools)
    before = processor.apply_chat_template(messages[:-1], tools=tools) if len(messages) > 1 else ""
    if not full.startswith(before) or not full[len(before) :].startswith(TURN_START):
        logger.warning(
            "the chat template renders the conversation's last turn differently alone than with the turns "
            "before it; grading its text and tool calls as written"
        )
        calls = [c["function"]["name"] + " " + c["function"]["arguments"] for c in messages[-1].get("tool_calls") or []]
        return "\n".join([_answer(messages[-1]), *calls]).strip()
    turn = full[len(before) + len(TURN_START) :].removeprefix(EMPTY_THINK)
    return turn.removesuffix("\n").removesuffix("<|im_end|>")


def _evaluate(model, processor, rows, image_root, batch_size: int, max_new_tokens: int):
    tokenizer = processor.tokenizer
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    stop = {end_of_turn, tokenizer.pad_token_id}
    collator = VLMCollator(processor, image_root)
    predictions: list[dict[str, Any]] = []
    loss_sum, loss_tokens, tokens_right = 0.0, 0, 0
    long_targets = False
    for start in range(0, len(rows), batch_size):
        batch = [rows[i] for i in range(start, min(start + batch_size, len(rows)))]
        conversations = []
        for offset, row in enumerate(batch):
            where = row.get(WHERE) or f"row {start + offset}"
            images = [open_image(ref, image_root, where) for ref in row.get("images") or []]
            conversations.append(with_images(row["messages"], images))
        # Rows whose answer has reasoning are prompted in thinking mode, as they were trained.
        groups = group_indices([(row.get("tools"), _thinks(row["messages"][-1])) for row in batch])
        texts: list[str] = [""] * len(batch)
        for (tools, think), members in groups.items():
            inputs = encode_chats(
                processor,
                [conversations[i][:-1] for i in members],
                [tools] * len(members),
                padding_side="left",
                add_generation_prompt=True,
                enable_thinking=think,
            )
            inputs = {k: v.to(model.device) for k, v in inputs.items()}
            out = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=end_of_turn,
                pad_token_id=tokenizer.pad_token_id,
            )
            for i, ids in zip(members, out[:, inputs["input_ids"].shape[1] :].tolist()):
                # Up to the end of the turn; special tokens kept, as tool-call and think markers may be.
                cut = next((k for k, t in enumerate(ids) if t in stop), len(ids))
                texts[i] = tokenizer.decode(ids[:cut])
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
            target = _target(processor, conversations[offset], row_tools(row))
            if not long_targets and len(tokenizer(target, add_special_tokens=False)["input_ids"]) >= max_new_tokens:
                long_targets = True
                logger.warning(
                    "a target (%s…) is longer than max_new_tokens=%d: such answers cannot be matched; raise "
                    "eval.max_new_tokens (or --max-new-tokens)", target[:40], max_new_tokens,
                )  # fmt: skip
            predictions.append(
                {
                    "index": start + offset,
                    "prompt": _answer(row["messages"][-2]) if len(row["messages"]) > 1 else "",
                    "target": target,
                    "prediction": text.strip(),
                    # The answer is graded, not the reasoning before it.
                    "correct": normalize(THINK.sub("", text)) == normalize(THINK.sub("", target)),
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
