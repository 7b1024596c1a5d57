"""A deterministic synthetic "coloured shapes" dataset for the CPU demo.

Each image holds one filled shape (circle, square, triangle, star, cross) in one of six colours on a
light background, big enough to survive downscaling to 32 px, so a tiny random vision tower and a tiny
Qwen3 can learn to name shape and colour. Rows are written in the project's canonical format (one
`{"messages": [...], "images": ["images/x.png"]}` object per jsonl line, image paths relative to the
dataset dir), with an align (captioning) and an sft (instruction) split, each with a held-out eval split
whose images never repeat a train image. A tiny byte-level BPE tokenizer trained on the rendered
conversations is saved under `tokenizer/`.

    python -m data_tools.synth data/shapes --seed 0
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from .writer import ALIGN_PROMPTS, check_sizes, write_task

# Bump when the output for the same parameters changes, so old datasets are regenerated.
FORMAT_VERSION = 2  # 2: big, near-centred shapes

SHAPES = ("circle", "square", "triangle", "star", "cross")
# Far apart in RGB and from the light background, also after a 32 px downscale.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 30),
    "green": (30, 160, 50),
    "blue": (35, 75, 220),
    "yellow": (240, 205, 20),
    "purple": (135, 45, 175),
    "orange": (245, 130, 20),
}
COLOUR_JITTER = 12
BACKGROUND_MIN = 232  # each background channel is drawn from [BACKGROUND_MIN, 255]

SFT_SHAPE_Q = "What shape is this?"
SFT_COLOUR_Q = "What colour is the shape?"
SFT_DESCRIBE_Q = "Describe the image."

# Shape side as a fraction of the image side, and how far its centre may stray from the image's.
# Big and near-centred on purpose: the demo's vision tower has random weights, and from random
# features a 12 px shape anywhere in a 32 px view is too hard to learn in a 3-minute CPU budget
# (measured: shape accuracy stayed at chance), while this one is learnt to >90 %.
MIN_SIZE_FRAC = 0.6
MAX_SIZE_FRAC = 0.75
JITTER_FRAC = 0.07
MARGIN_FRAC = 0.06
MAX_REDRAWS = 1000


@dataclass(frozen=True)
class Sample:
    """What one image shows; `key` identifies the drawing (jitter aside) for train/eval disjointness."""

    shape: str
    colour: str
    x: int  # top-left of the shape's box
    y: int
    size: int  # side of the shape's box
    fill: tuple[int, int, int]
    background: tuple[int, int, int]

    @property
    def key(self) -> tuple[str, str, int, int, int]:
        return (self.shape, self.colour, self.x, self.y, self.size)


def caption(sample: Sample) -> str:
    article = "An" if sample.colour[0] in "aeiou" else "A"
    return f"{article} {sample.colour} {sample.shape}."


def _geometry(image_size: int) -> tuple[int, int, int]:
    lo = math.ceil(MIN_SIZE_FRAC * image_size)
    hi = math.floor(MAX_SIZE_FRAC * image_size)
    margin = max(1, round(MARGIN_FRAC * image_size))
    return lo, hi, margin


def place(rng: random.Random, image_size: int) -> tuple[int, int, int]:
    lo, hi, margin = _geometry(image_size)
    size = rng.randint(lo, hi)
    jitter = max(1, round(JITTER_FRAC * image_size))
    centred = (image_size - size) // 2
    x = min(max(centred + rng.randint(-jitter, jitter), margin), image_size - margin - size)
    y = min(max(centred + rng.randint(-jitter, jitter), margin), image_size - margin - size)
    return x, y, size


def _draw_samples(
    rng: random.Random, n: int, image_size: int, used: set[tuple[str, str, int, int, int]]
) -> list[Sample]:
    """`n` samples with (shape, colour) combinations balanced and every key new to `used`."""
    combos = [(s, c) for s in SHAPES for c in COLOURS]
    pool = combos * -(-n // len(combos))
    rng.shuffle(pool)
    samples = []
    for shape, colour in pool[:n]:
        for _ in range(MAX_REDRAWS):
            x, y, size = place(rng, image_size)
            if (shape, colour, x, y, size) not in used:
                break
        else:
            raise ValueError(f"no unused placement for a {colour} {shape} at {image_size} px; ask for fewer rows.")
        fill = tuple(min(255, max(0, v + rng.randint(-COLOUR_JITTER, COLOUR_JITTER))) for v in COLOURS[colour])
        background = tuple(rng.randint(BACKGROUND_MIN, 255) for _ in range(3))
        sample = Sample(shape, colour, x, y, size, fill, background)  # type: ignore[arg-type]
        used.add(sample.key)
        samples.append(sample)
    return samples


def _star(cx: float, cy: float, outer: float, inner: float) -> list[tuple[float, float]]:
    points = []
    for i in range(10):
        r = outer if i % 2 == 0 else inner
        angle = -math.pi / 2 + i * math.pi / 5
        points.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
    return points


def render(sample: Sample, image_size: int) -> Image.Image:
    """The image of one sample: the shape filled inside its box, on a plain background."""
    image = Image.new("RGB", (image_size, image_size), sample.background)
    draw_shape(ImageDraw.Draw(image), sample.shape, sample.x, sample.y, sample.size, sample.fill)
    return image


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, x0: int, y0: int, s: int, fill: tuple[int, int, int]) -> None:
    """One of SHAPES filled inside the box of side `s` at (x0, y0)."""
    x1, y1 = x0 + s - 1, y0 + s - 1
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape == "square":
        inset = round(0.08 * s)  # about the circle's area, so size alone does not give the shape away
        draw.rectangle((x0 + inset, y0 + inset, x1 - inset, y1 - inset), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "star":
        # A fat star (inner radius 0.45) stays star-like at 32 px.
        draw.polygon(_star(cx, cy + 0.05 * s, s / 2, 0.45 * s / 2), fill=fill)
    elif shape == "cross":
        half = s / 6
        draw.rectangle((round(cx - half), y0, round(cx + half), y1), fill=fill)
        draw.rectangle((x0, round(cy - half), x1, round(cy + half)), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _qa(kind: str, samples: list[Sample], rng: random.Random) -> list[tuple[str, str]]:
    if kind == "align":
        return [(rng.choice(ALIGN_PROMPTS), caption(s)) for s in samples]
    # sft: the three question types evenly mixed, in random order.
    types = [0, 1, 2] * -(-len(samples) // 3)
    types = types[: len(samples)]
    rng.shuffle(types)
    qa = []
    for t, s in zip(types, samples):
        if t == 0:
            qa.append((SFT_SHAPE_Q, f"A {s.shape}."))
        elif t == 1:
            qa.append((SFT_COLOUR_Q, f"{s.colour.capitalize()}."))
        else:
            qa.append((SFT_DESCRIBE_Q, caption(s)))
    return qa


class Shapes:
    """The demo's task: one coloured shape per image; captions, and questions on shape, colour or both."""

    name = "shapes"

    def draw(self, rng: random.Random, n: int, image_size: int, used: set) -> list[Sample]:
        return _draw_samples(rng, n, image_size, used)

    def images(self, sample: Sample, image_size: int) -> list[Image.Image]:
        return [render(sample, image_size)]

    def qa(self, split: str, samples: list[Sample], rng: random.Random) -> list[tuple[str, str]]:
        return _qa(split.split("_")[0], samples, rng)


def make_shapes_dataset(
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
    """Write the shapes dataset to `out_dir` and return its path.

    Deterministic from the arguments (same arguments, byte-identical files). A dir already holding a
    complete dataset made with the same arguments is left as is (see `writer.write_task`).
    """
    sizes = {"align_train": align_train, "align_eval": align_eval, "sft_train": sft_train, "sft_eval": sft_eval}
    check_sizes(sizes, image_size)
    params = {"format": FORMAT_VERSION, "seed": seed, **sizes, "image_size": image_size, "vocab_size": vocab_size}
    return write_task(Shapes(), out_dir, params, sizes, seed, image_size, vocab_size)
