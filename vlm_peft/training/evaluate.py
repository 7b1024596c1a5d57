"""Held-out evaluation: greedy generation, exact match, and the teacher-forced loss."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import datasets
import torch

from ..data.collator import VLMCollator, encode_chats
from ..data.processor import VLMProcessor
from ..data.rows import WHERE, group_indices, open_image, row_tools, with_images
from .answer_logits import answer_logits

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
    process: tuple[int, int] = (0, 1),
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Each row's last assistant message is the target; everything before it is the prompt.

    `process` = (rank, world): with several processes every one calls this on the same rows and
    evaluates its share (`batch_size` rows) of each batch of `batch_size` x world, all in lockstep (a
    sharded model gathers its weights in every forward, so every process runs as many forwards and
    generation steps as the others); the main process gets the whole summary and predictions, the
    others empty ones.
    """
    if max_samples is not None:
        rows = rows.select(range(min(max_samples, len(rows))))
    was_training = model.training
    model.eval()
    try:
        part = _evaluate(model, processor, rows, image_root, batch_size, max_new_tokens, *process)
    finally:
        model.train(was_training)
    if process[1] > 1:
        parts: list[Any] = [None] * process[1]
        torch.distributed.all_gather_object(parts, part)
        if process[0] != 0:
            return {}, []
        part = _merge(parts)
    _warn_if_too_long(processor, part[0], max_new_tokens)
    return _summary(*part), part[0]


def _merge(parts: list[tuple[list[dict], float, int, int]]) -> tuple[list[dict], float, int, int]:
    predictions = sorted((p for part in parts for p in part[0]), key=lambda p: p["index"])
    return predictions, *(sum(part[k] for part in parts) for k in (1, 2, 3))


def _summary(predictions: list[dict], loss_sum: float, loss_tokens: int, tokens_right: int) -> dict[str, Any]:
    correct = sum(p["correct"] for p in predictions)
    return {
        "samples": len(predictions),
        "exact_match": correct / max(len(predictions), 1),
        "loss": loss_sum / max(loss_tokens, 1),
        # Teacher-forced: shows progress before whole answers come out right.
        "token_accuracy": tokens_right / max(loss_tokens, 1),
    }


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


def _evaluate(model, processor, rows, image_root, batch_size: int, max_new_tokens: int, rank: int, world: int):
    """This process's part: its predictions (with their row index), loss sum, answer tokens, tokens right."""
    collator = VLMCollator(processor, image_root)
    predictions: list[dict[str, Any]] = []
    totals = [0.0, 0, 0]  # loss sum, answer tokens, tokens right
    step = batch_size * world
    for start in range(0, len(rows), step):
        batch = [rows[i] for i in range(start, min(start + step, len(rows)))]
        # Rows with reasoning are prompted in thinking mode, as they were trained; one prompt per group.
        groups = group_indices([(row.get("tools"), _thinks(row["messages"][-1])) for row in batch])
        mine: list[int] = []
        texts: dict[int, str] = {}
        conversations: dict[int, list[dict[str, Any]]] = {}
        for (tools, think), members in groups.items():
            share = members[rank::world]
            # A process with no row of this group still generates (for one row, discarded): the others'
            # forwards wait for its part of every gather.
            run = share or members[:1]
            conversations |= {i: _conversation(batch[i], image_root, start + i) for i in run}
            chats = [conversations[i] for i in run]
            texts |= dict(zip(run, _generate(model, processor, chats, tools, think, max_new_tokens, world > 1)))
            mine += share
        mine.sort()
        scored = _score(model, collator, [batch[i] for i in mine or [0]])
        if mine:
            totals = [a + b for a, b in zip(totals, scored)]
        for i in mine:
            chat = conversations[i]
            predictions.append(_prediction(processor, batch[i], chat, start + i, texts[i]))
    return predictions, *totals


def _conversation(row: dict[str, Any], image_root, index: int) -> list[dict[str, Any]]:
    where = row.get(WHERE) or f"row {index}"
    images = [open_image(ref, image_root, where) for ref in row.get("images") or []]
    return with_images(row["messages"], images)


def _generate(model, processor, conversations, tools, think: bool, max_new_tokens: int, synced: bool) -> list[str]:
    """Greedy answers to the conversations without their last turn, up to the end of the turn."""
    tokenizer = processor.tokenizer
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    stop = {end_of_turn, tokenizer.pad_token_id}
    inputs = encode_chats(
        processor,
        [conversation[:-1] for conversation in conversations],
        [tools] * len(conversations),
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
        # Every process keeps stepping until all are done: a sharded model's forward is collective.
        synced_gpus=synced,
    )
    texts = []
    for ids in out[:, inputs["input_ids"].shape[1] :].tolist():
        # Special tokens kept, as tool-call and think markers may be.
        cut = next((k for k, t in enumerate(ids) if t in stop), len(ids))
        texts.append(tokenizer.decode(ids[:cut]))
    return texts


def _score(model, collator: VLMCollator, batch: list[dict[str, Any]]) -> tuple[float, int, int]:
    """Teacher-forced loss sum, answer tokens and tokens right over the rows' answers."""
    logits, labels = answer_logits(model, {k: v.to(model.device) for k, v in collator(batch).items()})
    # In fp32: a low-precision log-softmax over Qwen's vocab loses the small probabilities.
    loss = torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum").item()
    return loss, labels.numel(), int((logits.argmax(-1) == labels).sum())


def _prediction(processor, row, conversation, index: int, text: str) -> dict:
    target = _target(processor, conversation, row_tools(row))
    return {
        "index": index,
        "prompt": _answer(row["messages"][-2]) if len(row["messages"]) > 1 else "",
        "target": target,
        "prediction": text.strip(),
        # The answer is graded, not the reasoning before it.
        "correct": normalize(THINK.sub("", text)) == normalize(THINK.sub("", target)),
    }


def _warn_if_too_long(processor, predictions: list[dict], max_new_tokens: int) -> None:
    """Once per evaluation: a target longer than max_new_tokens can never be matched."""
    for p in predictions:
        if len(processor.tokenizer(p["target"], add_special_tokens=False)["input_ids"]) >= max_new_tokens:
            logger.warning(
                "a target (%s…) is longer than max_new_tokens=%d: such answers cannot be matched; raise "
                "eval.max_new_tokens (or --max-new-tokens)", p["target"][:40], max_new_tokens,
            )  # fmt: skip
            return


def format_summary(summary: dict[str, Any], title: str = "held-out") -> str:
    width = max(len(k) for k in summary)
    lines = [f"{title}", "-" * (width + 14)]
    for key, value in summary.items():
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        lines.append(f"{key:<{width}}  {shown:>12}")
    return "\n".join(lines)
