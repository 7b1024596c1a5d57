"""Caption pairs (a folder of images with same-stem `.txt` files, or a table of `image,caption`) as align-stage
rows: user = [image, a prompt drawn from a pool], assistant = the caption."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .common import CAPTION_KEYS, IMAGE_KEYS, Context, Reject, as_text, finish, image_ref, pick

DEFAULT_PROMPTS = (
    "Describe the image.",
    "What do you see?",
    "Caption this image.",
    "What is in the picture?",
    "Give a short caption.",
)


def convert_row(row: dict[str, Any], index: int, ctx: Context) -> dict[str, Any]:
    image, caption = pick(row, IMAGE_KEYS), pick(row, CAPTION_KEYS)
    if image is None:
        raise Reject("no_image", f"no image for the caption (fields: {sorted(row)}).")
    if caption is None:
        raise Reject("no_caption", f"no caption for image {image if isinstance(image, str) else '<bytes>'}.")
    caption = as_text(caption, "caption").strip()
    if not caption:
        raise Reject("empty_caption", "the caption is empty.")
    # Deterministic from (seed, row index) alone, so chunking and worker count do not change it.
    prompt = random.Random(f"{ctx.seed}:{index}").choice(ctx.prompts)
    messages = [
        {"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": prompt}]},
        {"role": "assistant", "content": [{"type": "text", "text": caption}]},
    ]
    return finish(messages, [image_ref(image, ctx)], "image parts")


def load_prompts(prompts: str | os.PathLike[str] | Sequence[str] | None) -> tuple[str, ...]:
    if prompts is None:
        return DEFAULT_PROMPTS
    if isinstance(prompts, (str, os.PathLike)):
        path = Path(prompts)
        text = path.read_text(encoding="utf-8")
        pool = json.loads(text) if path.suffix.lower() == ".json" else text.splitlines()
    else:
        pool = list(prompts)
    pool = tuple(p.strip() for p in pool if isinstance(p, str) and p.strip())
    if not pool:
        raise ValueError(f"the prompt pool {prompts!r} holds no prompts.")
    return pool
