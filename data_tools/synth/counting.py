"""Counting: one to nine small dots of one colour, scattered without touching. The answer is a sum over
the whole image, not a property of one region."""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

from .common import NUMBERS, background, draw_unique, jittered
from .shapes import COLOURS
from .writer import ALIGN_PROMPTS

COUNTS = tuple(range(1, 10))
QUESTION = "How many dots are there?"
RADIUS_FRAC = 0.055  # of the image side: ~3.5 px at 64, still a blob of its own at 32
GAP_FRAC = 0.05  # space kept between dots and from the border


@dataclass(frozen=True)
class Dots:
    colour: str
    centres: tuple[tuple[int, int], ...]
    fill: tuple[int, int, int]
    background: tuple[int, int, int]

    @property
    def key(self) -> tuple:
        return (self.colour, tuple(sorted(self.centres)))


def _scatter(rng: random.Random, count: int, image_size: int) -> tuple[tuple[int, int], ...]:
    radius = max(2, round(RADIUS_FRAC * image_size))
    gap = max(1, round(GAP_FRAC * image_size))
    low, high = radius + gap, image_size - 1 - radius - gap
    for _ in range(1000):
        centres: list[tuple[int, int]] = []
        for _ in range(200):
            c = (rng.randint(low, high), rng.randint(low, high))
            if all((c[0] - x) ** 2 + (c[1] - y) ** 2 >= (2 * radius + gap) ** 2 for x, y in centres):
                centres.append(c)
                if len(centres) == count:
                    return tuple(centres)
    raise ValueError(f"cannot place {count} dots in a {image_size} px image.")


class Counting:
    name = "counting"

    def draw(self, rng: random.Random, n: int, image_size: int, used: set) -> list[Dots]:
        def make(r: random.Random, count: int) -> Dots:
            colour = r.choice(sorted(COLOURS))
            return Dots(colour, _scatter(r, count, image_size), jittered(r, COLOURS[colour]), background(r))

        return draw_unique(rng, n, list(COUNTS), make, used, "dots")

    def images(self, d: Dots, image_size: int) -> list[Image.Image]:
        radius = max(2, round(RADIUS_FRAC * image_size))
        image = Image.new("RGB", (image_size, image_size), d.background)
        draw = ImageDraw.Draw(image)
        for x, y in d.centres:
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=d.fill)
        return [image]

    def qa(self, split: str, samples: list[Dots], rng: random.Random) -> list[tuple[str, str]]:
        def number(d: Dots) -> str:
            return NUMBERS[len(d.centres)]

        if split.startswith("align"):
            return [(rng.choice(ALIGN_PROMPTS),
                     f"{number(d).capitalize()} {d.colour} {'dot' if len(d.centres) == 1 else 'dots'}.")
                    for d in samples]  # fmt: skip
        return [(QUESTION, f"{number(d).capitalize()}.") for d in samples]
