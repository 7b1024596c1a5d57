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

import argparse
import json
import logging
import math
import os
import random
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

log = logging.getLogger(__name__)

# Bump when the output for the same parameters changes, so old datasets are regenerated.
FORMAT_VERSION = 2  # 2: big, near-centred shapes
MANIFEST = "synth.json"
IMAGE_DIR = "images"
TOKENIZER_DIR = "tokenizer"
# Eval splits are drawn first, from their own random streams, so that the held-out sets stay the
# same when only the train sizes change (train draws skip anything eval already used).
SPLITS = ("align_eval", "sft_eval", "align_train", "sft_train")

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

ALIGN_PROMPTS = (
    "Describe the image.",
    "What do you see?",
    "Caption this image.",
    "What is in the picture?",
    "Give a short caption.",
)
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


def _place(rng: random.Random, image_size: int) -> tuple[int, int, int]:
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
            x, y, size = _place(rng, image_size)
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
    draw = ImageDraw.Draw(image)
    x0, y0, s = sample.x, sample.y, sample.size
    x1, y1 = x0 + s - 1, y0 + s - 1
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if sample.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=sample.fill)
    elif sample.shape == "square":
        inset = round(0.08 * s)  # about the circle's area, so size alone does not give the shape away
        draw.rectangle((x0 + inset, y0 + inset, x1 - inset, y1 - inset), fill=sample.fill)
    elif sample.shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=sample.fill)
    elif sample.shape == "star":
        # A fat star (inner radius 0.45) stays star-like at 32 px.
        draw.polygon(_star(cx, cy + 0.05 * s, s / 2, 0.45 * s / 2), fill=sample.fill)
    elif sample.shape == "cross":
        half = s / 6
        draw.rectangle((round(cx - half), y0, round(cx + half), y1), fill=sample.fill)
        draw.rectangle((x0, round(cy - half), x1, round(cy + half)), fill=sample.fill)
    else:
        raise ValueError(f"unknown shape {sample.shape!r}")
    return image


def _row(question: str, answer: str, image_path: str) -> dict[str, Any]:
    return {
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ],
        "images": [image_path],
    }


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


def _tokenizer_texts(rows: list[dict[str, Any]]) -> Iterator[str]:
    """The rendered chat texts of `rows`, cut at special tokens.

    The BPE trainer does not skip special tokens, so whole rendered texts would spend merges on
    pieces like `|><|`; the pieces between them are exactly what the tokenizer will see.
    """
    from vlm_peft import VLMProcessor
    from vlm_peft.tiny import SPECIAL_TOKENS, tiny_image_processor, tiny_tokenizer

    # Only the chat template is needed here; the bootstrap tokenizer is never used for the data.
    processor = VLMProcessor(tiny_image_processor(32), tiny_tokenizer(["user"], vocab_size=300), num_image_tokens=1)
    split = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))
    rendered: dict[tuple[str, str], list[str]] = {}
    for row in rows:
        msgs = row["messages"]
        qa = (msgs[0]["content"][1]["text"], msgs[1]["content"][0]["text"])
        if qa not in rendered:  # few distinct conversations: render each once
            text = processor.apply_chat_template(msgs, tokenize=False)
            rendered[qa] = [p for p in split.split(text) if p]
        yield from rendered[qa]
    yield "system\n"  # for system prompts, which the demo rows do not have


def _write_atomic(path: Path, data: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(data, encoding="utf-8")
    os.replace(tmp, path)


def _is_complete(out: Path, params: dict[str, Any]) -> bool:
    try:
        manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if manifest.get("params") != params:
        return False
    needed = [out / f"{split}.jsonl" for split in SPLITS] + [out / TOKENIZER_DIR / "tokenizer.json"]
    if not all(p.is_file() for p in needed):
        return False
    try:
        have = set(os.listdir(out / IMAGE_DIR))
    except OSError:
        return False
    return set(manifest.get("images", [])) <= have


def _remove_stale_images(out: Path, keep: set[str]) -> None:
    """Remove images an earlier run of this module wrote that this run did not rewrite; nothing else."""
    ours = re.compile(r"(align|sft)_(train|eval)_\d+\.png")
    for name in os.listdir(out / IMAGE_DIR):
        if ours.fullmatch(name) and name not in keep:
            (out / IMAGE_DIR / name).unlink()


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
    complete dataset made with the same arguments is left as is; the manifest `synth.json` is written
    last, so an interrupted run is redone rather than taken as complete.
    """
    sizes = {"align_train": align_train, "align_eval": align_eval, "sft_train": sft_train, "sft_eval": sft_eval}
    if any(n < 0 for n in sizes.values()):
        raise ValueError(f"split sizes must be >= 0, got {sizes}.")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}.")
    params = {"format": FORMAT_VERSION, "seed": seed, **sizes, "image_size": image_size, "vocab_size": vocab_size}
    out = Path(out_dir)
    if _is_complete(out, params):
        log.info("shapes dataset in %s is up to date (seed %d).", out, seed)
        return out

    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # first: from here on the dir is not complete
    # Images are overwritten in place rather than deleted first: creating thousands of files right
    # after deleting them is several times slower on ext4.
    (out / IMAGE_DIR).mkdir(exist_ok=True)
    used: set[tuple[str, str, int, int, int]] = set()
    all_rows: list[dict[str, Any]] = []
    image_names: list[str] = []
    for split in SPLITS:
        rng = random.Random(f"shapes-{seed}-{split}")
        samples = _draw_samples(rng, sizes[split], image_size, used)
        rows = []
        for i, (sample, (question, answer)) in enumerate(zip(samples, _qa(split.split("_")[0], samples, rng))):
            name = f"{split}_{i:05d}.png"
            render(sample, image_size).save(out / IMAGE_DIR / name, format="PNG")
            image_names.append(name)
            rows.append(_row(question, answer, f"{IMAGE_DIR}/{name}"))
        _write_atomic(out / f"{split}.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
        all_rows.extend(rows)
    if len(used) != len(image_names):  # held-out images must never repeat a train image
        raise AssertionError("duplicate (shape, colour, position, size) across splits")
    _remove_stale_images(out, set(image_names))

    from vlm_peft.tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer(_tokenizer_texts(all_rows), vocab_size=vocab_size)
    tokenizer.save_pretrained(out / TOKENIZER_DIR)

    manifest = {"params": params, "counts": sizes, "images": image_names}
    _write_atomic(out / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    log.info(
        "shapes dataset: align %d/%d, sft %d/%d rows (train/eval), %d images of %d px, tokenizer of %d tokens, "
        "seed %d -> %s in %.1fs",
        align_train, align_eval, sft_train, sft_eval, len(image_names), image_size, len(tokenizer), seed, out,
        time.perf_counter() - start,
    )  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m data_tools.synth", description="Write the synthetic coloured-shapes dataset."
    )
    parser.add_argument("out_dir", type=Path, help="dataset dir (jsonl files, images/, tokenizer/)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--align-train", type=int, default=3000, help="align (captioning) train rows")
    parser.add_argument("--align-eval", type=int, default=200, help="align held-out rows")
    parser.add_argument("--sft-train", type=int, default=3000, help="sft (instruction) train rows")
    parser.add_argument("--sft-eval", type=int, default=300, help="sft held-out rows")
    parser.add_argument("--image-size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--vocab-size", type=int, default=384, help="tokenizer vocabulary size")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    make_shapes_dataset(
        args.out_dir,
        seed=args.seed,
        align_train=args.align_train,
        align_eval=args.align_eval,
        sft_train=args.sft_train,
        sft_eval=args.sft_eval,
        image_size=args.image_size,
        vocab_size=args.vocab_size,
    )


if __name__ == "__main__":
    main()
