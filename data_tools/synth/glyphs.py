"""Glyphs: one digit per image, rendered from the font Pillow ships, at varied size, stroke width, slant
and position, in a dark ink on a light, noisy background. Fine structure (8 vs 3 vs 9) in a few pixels:
the kind of detail a projector that averages patches loses."""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

from .common import NUMBERS, background, draw_unique, with_noise
from .writer import ALIGN_PROMPTS

DIGITS = tuple(str(d) for d in range(10))
QUESTION = "What digit is this?"
# Glyph height as a fraction of the image side; font sizes are picked to give it.
MIN_HEIGHT_FRAC, MAX_HEIGHT_FRAC = 0.45, 0.62
MAX_ROTATION = 15  # degrees either way
NOISE = 14


@dataclass(frozen=True)
class Glyph:
    digit: str
    size: int  # font size in pixels
    stroke: int
    rotation: int
    dx: int  # offset of the glyph's centre from the image's
    dy: int
    ink: tuple[int, int, int]
    background: tuple[int, int, int]

    @property
    def key(self) -> tuple:
        return (self.digit, self.size, self.stroke, self.rotation, self.dx, self.dy)


@lru_cache(maxsize=64)
def font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


class Glyphs:
    name = "glyphs"

    def draw(self, rng: random.Random, n: int, image_size: int, used: set) -> list[Glyph]:
        def make(r: random.Random, digit: str) -> Glyph:
            # The font's digits are ~0.72 of its size tall.
            size = round(r.uniform(MIN_HEIGHT_FRAC, MAX_HEIGHT_FRAC) * image_size / 0.72)
            room = max(1, round(0.12 * image_size))
            ink = tuple(r.randint(0, 90) for _ in range(3))
            return Glyph(digit, size, r.randint(0, 2), r.randint(-MAX_ROTATION, MAX_ROTATION),
                         r.randint(-room, room), r.randint(-room, room), ink, background(r))  # type: ignore[arg-type]  # fmt: skip

        return draw_unique(rng, n, list(DIGITS), make, used, "glyph")

    def images(self, g: Glyph, image_size: int) -> list[Image.Image]:
        # Drawn on a transparent layer, turned, then centred at the offset: the glyph's own box, not the
        # font's line box, is what is placed.
        layer = Image.new("L", (2 * image_size, 2 * image_size), 0)
        ImageDraw.Draw(layer).text((image_size, image_size), g.digit, fill=255, font=font(g.size), anchor="mm",
                                   stroke_width=g.stroke, stroke_fill=255)  # fmt: skip
        layer = layer.rotate(g.rotation, resample=Image.BICUBIC)
        box = layer.getbbox() or (0, 0, 1, 1)
        glyph = layer.crop(box)
        image = Image.new("RGB", (image_size, image_size), g.background)
        x = (image_size - glyph.width) // 2 + g.dx
        y = (image_size - glyph.height) // 2 + g.dy
        x = min(max(x, 0), image_size - glyph.width)
        y = min(max(y, 0), image_size - glyph.height)
        image.paste(Image.new("RGB", glyph.size, g.ink), (x, y), glyph)
        return [with_noise(image, g, NOISE)]

    def qa(self, split: str, samples: list[Glyph], rng: random.Random) -> list[tuple[str, str]]:
        if split.startswith("align"):
            return [(rng.choice(ALIGN_PROMPTS), f"The digit {NUMBERS[int(g.digit)]}.") for g in samples]
        return [(QUESTION, f"{g.digit}.") for g in samples]
