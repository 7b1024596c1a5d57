"""`vlm-peft chat`: one-shot answers or an interactive session, streamed token by token."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO

import torch
from PIL import Image
from transformers import TextStreamer

HELP = "commands: /image PATH (attach to your next message), /reset, /quit"


class Chat:
    """A conversation with images; each turn re-renders the history (no cache kept across turns)."""

    def __init__(self, model: torch.nn.Module, processor: Any, *, think: bool = False, **generation: Any):
        self.model, self.processor = model, processor
        self.think = think
        self.generation = generation
        self.messages: list[dict[str, Any]] = []
        self.pending: list[Image.Image] = []

    def add_image(self, path: str | Path) -> None:
        try:
            image = Image.open(path)
            image.load()
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot read image {path}: {err}") from None
        self.pending.append(image)

    def ask(self, text: str, out: TextIO = sys.stdout) -> str:
        content = [{"type": "image", "image": img} for img in self.pending] + [{"type": "text", "text": text}]
        self.messages.append({"role": "user", "content": content})
        self.pending = []
        inputs = self.processor.apply_chat_template(
            self.messages,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            enable_thinking=self.think,
        )
        inputs = {k: v.to(self.model.device) for k, v in inputs.items()}
        tokenizer = self.processor.tokenizer
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        streamer.on_finalized_text = lambda piece, stream_end=False: out.write(piece + ("\n" if stream_end else ""))
        with torch.no_grad():
            ids = self.model.generate(
                **inputs,
                streamer=streamer,
                eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                pad_token_id=tokenizer.pad_token_id,
                **self.generation,
            )
        out.flush()
        answer = tokenizer.decode(ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        self.messages.append({"role": "assistant", "content": answer})
        return answer

    def repl(self, lines: Iterable[str], out: TextIO = sys.stdout) -> None:
        out.write(HELP + "\n")
        for line in lines:
            line = line.strip()
            if not line:
                continue
            if line in ("/quit", "/exit"):
                break
            if line == "/reset":
                self.messages, self.pending = [], []
                out.write("(conversation cleared)\n")
            elif line.startswith("/image "):
                try:
                    self.add_image(line.split(" ", 1)[1].strip())
                    out.write(f"({len(self.pending)} image(s) attached to your next message)\n")
                except ValueError as err:
                    out.write(f"error: {err}\n")
            elif line.startswith("/"):
                out.write(f"unknown command; {HELP}\n")
            else:
                self.ask(line, out)


def generation_kwargs(max_new_tokens: int, temperature: float, top_p: float) -> dict[str, Any]:
    if temperature <= 0:
        return {"max_new_tokens": max_new_tokens, "do_sample": False}
    return {"max_new_tokens": max_new_tokens, "do_sample": True, "temperature": temperature, "top_p": top_p}
