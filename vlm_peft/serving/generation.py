"""One chat turn: messages -> model inputs -> generate, streamed. `vlm-peft chat` and `vlm-peft serve`
both run this, so the server answers what the chat answers."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextStreamer

END_OF_TURN = "<|im_end|>"


@dataclass
class Turn:
    ids: list[int]  # the generated tokens (the end-of-turn token included when generated)
    prompt_tokens: int  # image placeholder tokens included
    finish_reason: str  # "stop" (end of turn, a stop string, cancelled) or "length"

    @property
    def completion_tokens(self) -> int:
        return len(self.ids)


def generation_kwargs(max_new_tokens: int, temperature: float, top_p: float) -> dict[str, Any]:
    if temperature < 1e-5:  # greedy, as vLLM does: a tinier one overflows the logits to inf
        return {"max_new_tokens": max_new_tokens, "do_sample": False}
    return {"max_new_tokens": max_new_tokens, "do_sample": True, "temperature": temperature, "top_p": top_p}


def render(processor: Any, messages: list[dict[str, Any]], *, think: bool = False, device: Any = None) -> dict:
    """Chat template + image placeholders + pixel_values for the next assistant turn. Image parts must
    hold PIL images: transformers would fetch a URL or read a path by itself."""
    inputs = processor.apply_chat_template(
        messages,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        enable_thinking=think,
    )
    return {k: v.to(device) if device is not None else v for k, v in inputs.items()}


class StopStrings(StoppingCriteria):
    """Ends a row once its *generated* text holds a stop string. transformers' `stop_strings` also
    matches across the prompt's last tokens (a prompt ending in "\\n\\n" stops on a first "\\n"), which
    would end rows that the final cut keeps going."""

    def __init__(self, tokenizer: Any, stops: list[str], prompt_length: int):
        self.tokenizer, self.stops, self.prompt_length = tokenizer, stops, prompt_length
        # A character is at most 4 byte-level tokens; the margin covers skipped special tokens.
        self.window = 4 * max(len(s) for s in stops) + 8

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        tail = input_ids[:, max(self.prompt_length, input_ids.shape[1] - self.window) :]
        texts = self.tokenizer.batch_decode(tail, skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stops) for t in texts], device=input_ids.device)


class _Cancelled(StoppingCriteria):
    """Ends generation between two tokens once `event` is set (a client went away, the answer hit a stop
    string that the text filter saw)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def generate_turn(
    model: torch.nn.Module,
    processor: Any,
    inputs: dict,
    *,
    on_text: Callable[..., None] | None = None,
    stop: Sequence[str] = (),
    cancel: threading.Event | None = None,
    seed: int | None = None,
    **generation: Any,
) -> Turn:
    """Generate one answer for a single conversation. `on_text(piece, stream_end=False)` receives the decoded
    text as transformers' `TextStreamer` releases it (special tokens skipped); `stop` strings end generation
    once the generated text holds one (cutting them out of the text is the caller's); `seed` seeds
    torch's RNG so that sampling repeats."""
    tokenizer = processor.tokenizer
    streamer = None
    if on_text is not None:
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        streamer.on_finalized_text = on_text
    extra: dict[str, Any] = {}
    prompt = inputs["input_ids"].shape[1]
    criteria = StoppingCriteriaList()
    if any(stop):
        criteria.append(StopStrings(tokenizer, [s for s in stop if s], prompt))
    if cancel is not None:
        criteria.append(_Cancelled(cancel))
    if criteria:
        extra["stopping_criteria"] = criteria
    end = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    # A seeded request draws from its own copy of the RNG: it must not make the next requests' samples predictable.
    gpus = [model.device] if model.device.type == "cuda" else []
    with torch.random.fork_rng(devices=gpus, enabled=seed is not None), torch.no_grad():
        if seed is not None:
            torch.manual_seed(seed)
        ids = model.generate(
            **inputs, streamer=streamer, eos_token_id=end, pad_token_id=tokenizer.pad_token_id, **generation, **extra
        )
    new = ids[0, prompt:].tolist()
    limit = generation.get("max_new_tokens")
    length = limit is not None and len(new) >= limit and (not new or new[-1] != end)
    return Turn(ids=new, prompt_tokens=prompt, finish_reason="length" if length else "stop")


class TextFilter:
    """Turns streamed pieces into the answer as shown: leading and trailing whitespace trimmed (as `vlm-peft chat`
    strips its answer) and cut before the first stop string. Text that may still turn out to be trailing
    whitespace or the start of a stop string is held back, so the pieces it releases join to the same text
    however the stream was split."""

    def __init__(self, stop: Sequence[str] = ()):
        self.stop = [s for s in stop if s]
        self.buffer = ""
        self.started = False
        self.stopped = False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.buffer += piece
        if not self.started:
            self.buffer = self.buffer.lstrip()
            self.started = bool(self.buffer)
        hits = [i for s in self.stop if (i := self.buffer.find(s)) >= 0]
        if hits:
            self.stopped = True
            out, self.buffer = self.buffer[: min(hits)].rstrip(), ""
            return out
        held = max((k for s in self.stop for k in range(1, len(s)) if self.buffer.endswith(s[:k])), default=0)
        ready = self.buffer[: len(self.buffer) - held]
        out = ready.rstrip()
        self.buffer = self.buffer[len(out) :]
        return out

    def finish(self) -> str:
        out = "" if self.stopped else self.buffer.rstrip()
        self.buffer = ""
        return out
