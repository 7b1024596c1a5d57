"""Comparison across two images: each shows one coloured shape (as in the shapes demo); the question is
whether the two have the same colour (their shapes vary independently). The projector runs on both images
of a row, and the LLM relates its two placeholder runs."""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image

from .common import article, background, draw_unique, jittered
from .shapes import BACKGROUND_MIN, COLOUR_JITTER, COLOURS, SHAPES, Sample, place, render
from .writer import ALIGN_PROMPTS

QUESTION = "Are the two shapes the same colour?"
ANSWERS = {"same": "Yes.", "different": "No."}


@dataclass(frozen=True)
class Duo:
    difference: str
    first: Sample
    second: Sample

    @property
    def key(self) -> tuple:
        return (self.first.key, self.second.key)


def _other(rng: random.Random, value: str, values: list[str]) -> str:
    return rng.choice([v for v in values if v != value])


class Compare:
    name = "compare"

    def draw(self, rng: random.Random, n: int, image_size: int, used: set) -> list[Duo]:
        def make(r: random.Random, difference: str) -> Duo:
            first = _sample(r, r.choice(SHAPES), r.choice(sorted(COLOURS)), image_size)
            colour = first.colour if difference == "same" else _other(r, first.colour, sorted(COLOURS))
            return Duo(difference, first, _sample(r, r.choice(SHAPES), colour, image_size))

        return draw_unique(rng, n, list(ANSWERS), make, used, "image pair")

    def images(self, d: Duo, image_size: int) -> list[Image.Image]:
        return [render(d.first, image_size), render(d.second, image_size)]

    def qa(self, split: str, samples: list[Duo], rng: random.Random) -> list[tuple[str, str]]:
        if split.startswith("align"):

            def say(s: Sample) -> str:
                return f"{article(s.colour)} {s.colour} {s.shape}"

            return [(rng.choice(ALIGN_PROMPTS), f"{say(d.first).capitalize()}, then {say(d.second)}.") for d in samples]
        return [(QUESTION, ANSWERS[d.difference]) for d in samples]


def _sample(rng: random.Random, shape: str, colour: str, image_size: int) -> Sample:
    """A shapes-demo drawing of the given shape and colour."""
    x, y, size = place(rng, image_size)
    return Sample(shape, colour, x, y, size, jittered(rng, COLOURS[colour], COLOUR_JITTER),
                  background(rng, BACKGROUND_MIN))  # fmt: skip
