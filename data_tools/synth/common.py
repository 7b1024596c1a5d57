"""Pieces the synthetic tasks share: balanced classes, unique draws, light backgrounds, pixel noise."""

from __future__ import annotations

import random
from collections.abc import Callable, Hashable
from typing import Any

from PIL import Image, ImageChops

MAX_REDRAWS = 1000
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def balanced(rng: random.Random, classes: list[Any], n: int) -> list[Any]:
    """`n` classes, each as often as the others (to one), in random order."""
    pool = (list(classes) * -(-n // max(len(classes), 1)))[:n]
    rng.shuffle(pool)
    return pool


def draw_unique(rng: random.Random, n: int, classes: list[Any], make: Callable[[random.Random, Any], Any],
                used: set, what: str) -> list[Any]:  # fmt: skip
    """`n` samples of balanced classes; `make(rng, cls)` draws one, redrawn until its `key` is new to `used`."""
    samples = []
    for cls in balanced(rng, classes, n):
        for _ in range(MAX_REDRAWS):
            sample = make(rng, cls)
            if sample.key not in used:
                break
        else:
            raise ValueError(f"no unused {what} drawing for {cls!r}; ask for fewer rows or a bigger image_size.")
        used.add(sample.key)
        samples.append(sample)
    return samples


def background(rng: random.Random, low: int = 225) -> tuple[int, int, int]:
    return tuple(rng.randint(low, 255) for _ in range(3))  # type: ignore[return-value]


def jittered(rng: random.Random, colour: tuple[int, int, int], amount: int = 12) -> tuple[int, int, int]:
    return tuple(min(255, max(0, v + rng.randint(-amount, amount))) for v in colour)  # type: ignore[return-value]


def with_noise(image: Image.Image, seed: Hashable, amount: int) -> Image.Image:
    """Per-pixel grey noise of +-`amount`, from its own stream (so it never shifts the sample draws)."""
    if amount <= 0:
        return image
    raw = random.Random(str(seed)).randbytes(image.width * image.height)
    grain = Image.frombytes("L", image.size, raw).point(lambda v: v * 2 * amount // 255).convert("RGB")
    offset = Image.new("RGB", image.size, (amount, amount, amount))
    return ImageChops.subtract(ImageChops.add(image, grain), offset)
