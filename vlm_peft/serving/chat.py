"""`vlm-peft chat`: one-shot answers or an interactive session, streamed token by token."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO

import torch
from PIL import Image

from .generation import generate_turn, render

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
        inputs = render(self.processor, self.messages, think=self.think, device=self.model.device)
        turn = generate_turn(
            self.model,
            self.processor,
            inputs,
            on_text=lambda piece, stream_end=False: out.write(piece + ("\n" if stream_end else "")),
            **self.generation,
        )
        out.flush()
        answer = self.processor.tokenizer.decode(turn.ids, skip_special_tokens=True).strip()
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
