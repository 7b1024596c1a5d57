"""Deterministic synthetic visual tasks for the embedded CPU models, in the canonical format.

`shapes` is the demo (one coloured shape; name it, its colour, or both). The others are different in
kind, to judge a projector on more than the task it was tuned on:

- `glyphs`: a digit rendered from Pillow's font with varied size, stroke, slant, position and noise;
- `counting`: one to nine small dots;
- `spatial`: two shapes side by side or stacked; the colour of the one on the left / at the top;
- `compare`: two images, one shape each: are they the same colour (shapes vary independently)?

Each dataset dir holds `align_{train,eval}.jsonl` (captions) and `sft_{train,eval}.jsonl` (questions),
images under `images/` (held-out images never repeat a train drawing), a tiny BPE tokenizer under
`tokenizer/`, and `synth.json` (written last). Use the align splits for a two-stage run, or only the sft
ones (`recipes/demo-sft.yaml`) for a run without captions.

    python -m data_tools.synth data/shapes --seed 0
    python -m data_tools.synth data/glyphs --task glyphs
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from .compare import Compare
from .counting import Counting
from .glyphs import Glyphs
from .shapes import (
    COLOURS,
    FORMAT_VERSION,
    SFT_COLOUR_Q,
    SFT_DESCRIBE_Q,
    SFT_SHAPE_Q,
    SHAPES,
    Sample,
    caption,
    make_shapes_dataset,
    render,
)
from .spatial import Spatial
from .writer import ALIGN_PROMPTS, check_sizes, remove_stale_images, write_task

TASKS = {"shapes": None, "glyphs": Glyphs, "counting": Counting, "spatial": Spatial, "compare": Compare}
# Bump a task's number when its output for the same parameters changes, so old datasets are regenerated.
TASK_FORMAT = {"glyphs": 1, "counting": 1, "spatial": 2, "compare": 2}

__all__ = [
    "ALIGN_PROMPTS", "COLOURS", "FORMAT_VERSION", "SFT_COLOUR_Q", "SFT_DESCRIBE_Q", "SFT_SHAPE_Q", "SHAPES", "TASKS",
    "Sample", "caption", "make_dataset", "make_shapes_dataset", "main", "remove_stale_images", "render",
]  # fmt: skip

log = logging.getLogger(__name__)


def make_dataset(
    task: str,
    out_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    align_train: int = 3000,
    align_eval: int = 200,
    sft_train: int = 3000,
    sft_eval: int = 300,
    image_size: int = 64,
    vocab_size: int = 384,
) -> Path:
    """Write task `task`'s dataset to `out_dir` and return its path; deterministic from the arguments, left
    as is when a complete one made with the same arguments is there."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; one of {sorted(TASKS)}.")
    sizes = {"align_train": align_train, "align_eval": align_eval, "sft_train": sft_train, "sft_eval": sft_eval}
    if task == "shapes":
        return make_shapes_dataset(out_dir, seed=seed, **sizes, image_size=image_size, vocab_size=vocab_size)
    check_sizes(sizes, image_size)
    params = {"task": task, "format": TASK_FORMAT[task], "seed": seed, **sizes, "image_size": image_size,
              "vocab_size": vocab_size}  # fmt: skip
    return write_task(TASKS[task](), out_dir, params, sizes, seed, image_size, vocab_size)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m data_tools.synth", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="dataset dir (jsonl files, images/, tokenizer/)")
    parser.add_argument("--task", choices=sorted(TASKS), default="shapes", help="which task (default: the demo's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--align-train", type=int, default=3000, help="align (captioning) train rows")
    parser.add_argument("--align-eval", type=int, default=200, help="align held-out rows")
    parser.add_argument("--sft-train", type=int, default=3000, help="sft (instruction) train rows")
    parser.add_argument("--sft-eval", type=int, default=300, help="sft held-out rows")
    parser.add_argument("--image-size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--vocab-size", type=int, default=384, help="tokenizer vocabulary size")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    make_dataset(**vars(args))
