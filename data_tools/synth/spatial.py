"""Spatial relations: two shapes of different colours, side by side or one above the other; the question
asks for the colour of the one on the left (side by side) or at the top (one above the other). Both
colours are in every image, so a projector that keeps what but not where is right half the time.

The side asked follows the layout rather than being drawn: with a random frozen LLM and LoRA, a
question that names an arbitrary side (or both colours) stayed at that 50 % with every projector
kind, mlp included (900 steps) — the lookup is then the LLM's to learn, not the projector's."""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

from .common import article, background, draw_unique, jittered
from .shapes import COLOURS, SHAPES, draw_shape
from .writer import ALIGN_PROMPTS

RELATIONS = ("left", "right", "above", "below")
PHRASES = {"left": "left of", "right": "right of", "above": "above", "below": "below"}
QUESTIONS = {"horizontal": "What colour is the shape on the left?", "vertical": "What colour is the shape at the top?"}
MIN_SIZE_FRAC, MAX_SIZE_FRAC = 0.28, 0.36  # each shape's side, of the image side
ACROSS_DRIFT_FRAC = 0.06


@dataclass(frozen=True)
class Pair:
    relation: str  # where the first shape is, seen from the second
    shapes: tuple[str, str]
    colours: tuple[str, str]
    boxes: tuple[tuple[int, int, int], tuple[int, int, int]]  # (x, y, side) each
    fills: tuple[tuple[int, int, int], tuple[int, int, int]]
    background: tuple[int, int, int]

    @property
    def key(self) -> tuple:
        return (self.relation, self.shapes, self.colours, self.boxes)


def _boxes(rng: random.Random, relation: str, image_size: int) -> tuple[tuple[int, int, int], ...]:
    sides = [rng.randint(round(MIN_SIZE_FRAC * image_size), round(MAX_SIZE_FRAC * image_size)) for _ in range(2)]
    margin = max(1, round(0.04 * image_size))
    half = image_size // 2
    # Along the relation's axis each shape keeps to its half.
    along = [rng.randint(margin, half - s) if i == 0 else rng.randint(half, image_size - margin - s)
             for i, s in enumerate(sides)]  # fmt: skip
    # Across it, the two centres stay close, so that the other relation never holds too (a shape below and
    # far to the left would be both).
    centre = rng.randint(margin + max(sides) // 2, image_size - margin - max(sides) // 2)
    drift = max(1, round(ACROSS_DRIFT_FRAC * image_size))
    across = [min(max(centre + rng.randint(-drift, drift) - s // 2, margin), image_size - margin - s) for s in sides]
    first_low = relation in ("left", "above")  # the first shape sits in the low half of the axis
    order = (0, 1) if first_low else (1, 0)
    horizontal = relation in ("left", "right")
    boxes = []
    for shape_index in range(2):
        slot = order[shape_index]
        a, c, s = along[slot], across[slot], sides[slot]
        boxes.append((a, c, s) if horizontal else (c, a, s))
    return tuple(boxes)


def caption(p: Pair) -> str:
    first, second = (f"{article(c)} {c} {s}" for c, s in zip(p.colours, p.shapes))
    return f"{first.capitalize()} {PHRASES[p.relation]} {second}."


class Spatial:
    name = "spatial"

    def draw(self, rng: random.Random, n: int, image_size: int, used: set) -> list[Pair]:
        def make(r: random.Random, relation: str) -> Pair:
            colours = tuple(r.sample(sorted(COLOURS), 2))
            shapes = (r.choice(SHAPES), r.choice(SHAPES))
            fills = tuple(jittered(r, COLOURS[c]) for c in colours)
            return Pair(relation, shapes, colours, _boxes(r, relation, image_size), fills, background(r))  # type: ignore[arg-type]

        return draw_unique(rng, n, list(RELATIONS), make, used, "pair")

    def images(self, p: Pair, image_size: int) -> list[Image.Image]:
        image = Image.new("RGB", (image_size, image_size), p.background)
        draw = ImageDraw.Draw(image)
        for shape, (x, y, side), fill in zip(p.shapes, p.boxes, p.fills):
            draw_shape(draw, shape, x, y, side, fill)
        return [image]

    def qa(self, split: str, samples: list[Pair], rng: random.Random) -> list[tuple[str, str]]:
        if split.startswith("align"):
            return [(rng.choice(ALIGN_PROMPTS), caption(p)) for p in samples]
        return [(QUESTIONS[axis(p)], f"{first_colour(p).capitalize()}.") for p in samples]


def axis(p: Pair) -> str:
    return "horizontal" if p.relation in ("left", "right") else "vertical"


def first_colour(p: Pair) -> str:
    """The colour of the shape on the left, or at the top."""
    return p.colours[0] if p.relation in ("left", "above") else p.colours[1]
