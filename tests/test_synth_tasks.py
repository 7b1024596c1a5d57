"""The task suite beside the shapes demo: each task deterministic, balanced, its held-out drawings new,
its answers true to the pixels (read back independently of the generator), loadable by the processor."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from transformers import AutoTokenizer

from data_tools import synth
from data_tools.synth import make_dataset
from data_tools.synth.compare import ANSWERS as COMPARE_ANSWERS
from data_tools.synth.spatial import QUESTIONS as SPATIAL_QUESTIONS
from vlm_peft import VLMProcessor
from vlm_peft.tiny import tiny_image_processor

from .test_synth import seen

SMALL = dict(align_train=40, align_eval=12, sft_train=40, sft_eval=36, vocab_size=320)
TASKS = ("glyphs", "counting", "spatial", "compare")


@pytest.fixture(scope="module", params=TASKS)
def task(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    return request.param, make_dataset(request.param, tmp_path_factory.mktemp(request.param), **SMALL)


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def answer(row: dict) -> str:
    return row["messages"][1]["content"][0]["text"]


def pixels(dataset: Path, ref: str) -> np.ndarray:
    with Image.open(dataset / ref) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int32)


def blobs(mask: np.ndarray) -> list[np.ndarray]:
    """Connected foreground regions (4-neighbour), as arrays of (y, x)."""
    seen = np.zeros_like(mask, dtype=bool)
    found = []
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        stack, points = [(y, x)], []
        seen[y, x] = True
        while stack:
            cy, cx = stack.pop()
            points.append((cy, cx))
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        found.append(np.array(points))
    return found


def foreground(image: np.ndarray, threshold: int = 90) -> np.ndarray:
    return np.abs(image - image[0, 0]).sum(-1) > threshold


def test_rows_are_canonical_and_load_through_the_processor(task: tuple[str, Path]) -> None:
    name, dataset = task
    tokenizer = AutoTokenizer.from_pretrained(dataset / "tokenizer")
    processor = VLMProcessor(tiny_image_processor(32), tokenizer, num_image_tokens=4)
    images_per_row = 2 if name == "compare" else 1
    for split in ("align_train", "align_eval", "sft_train", "sft_eval"):
        split_rows = rows(dataset / f"{split}.jsonl")
        assert len(split_rows) == SMALL[split]
        for row in split_rows:
            assert len(row["images"]) == images_per_row
            assert [p["type"] for p in row["messages"][0]["content"]] == ["image"] * images_per_row + ["text"]
    row = rows(dataset / "sft_eval.jsonl")[0]
    text = processor.apply_chat_template(row["messages"], tokenize=False)
    batch = processor(text=text, images=[Image.open(dataset / ref) for ref in row["images"]])
    assert batch["pixel_values"].shape == (images_per_row, 3, 32, 32)
    assert json.loads((dataset / "synth.json").read_text())["params"]["task"] == name


def test_answers_are_balanced_and_held_out_drawings_new(task: tuple[str, Path]) -> None:
    name, dataset = task
    # spatial: balanced over layouts (its answers are the colours drawn)
    answers = collections.Counter(
        r["messages"][0]["content"][-1]["text"] if name == "spatial" else answer(r)
        for r in rows(dataset / "sft_eval.jsonl")
    )
    classes = {"glyphs": 10, "counting": 9, "spatial": 2, "compare": 2}[name]
    assert len(answers) == classes and max(answers.values()) - min(answers.values()) <= 1
    train = {tuple(r["images"]) for s in ("align_train", "sft_train") for r in rows(dataset / f"{s}.jsonl")}
    for split in ("align_eval", "sft_eval"):
        for row in rows(dataset / f"{split}.jsonl"):
            drawn = [pixels(dataset, ref).tobytes() for ref in row["images"]]
            assert tuple(row["images"]) not in train
            assert all(d not in {pixels(dataset, ref).tobytes() for ref in t} for t in list(train)[:10] for d in drawn)


def test_answers_are_true_to_the_pixels(task: tuple[str, Path]) -> None:
    name, dataset = task
    for row in rows(dataset / "sft_eval.jsonl"):
        images = [pixels(dataset, ref) for ref in row["images"]]
        if name == "counting":
            count = len([b for b in blobs(foreground(images[0])) if len(b) >= 4])
            assert answer(row) == f"{synth.common.NUMBERS[count].capitalize()}.", row
        elif name == "spatial":  # the colour of the shape with the lower x (side by side) or y (stacked)
            question = row["messages"][0]["content"][-1]["text"]
            centres = {c: centre_of(images[0], c) for c in synth.COLOURS if present(images[0], c)}
            assert len(centres) == 2, row
            (ca, (ya, xa)), (cb, (yb, xb)) = centres.items()
            side_by_side = abs(xa - xb) > abs(ya - yb)
            assert question == SPATIAL_QUESTIONS["horizontal" if side_by_side else "vertical"], row
            first = ca if ((xa < xb) if side_by_side else (ya < yb)) else cb
            assert answer(row) == f"{first.capitalize()}.", row
        elif name == "compare":  # read back as the shapes demo's images are
            (colour_a, _, _), (colour_b, _, _) = (
                seen(Image.open(dataset / ref).convert("RGB")) for ref in row["images"]
            )
            assert answer(row) == COMPARE_ANSWERS["same" if colour_a == colour_b else "different"], row
    if name == "glyphs":  # each image read back by matching against the font's clean digits
        matched = [
            read_digit(pixels(dataset, r["images"][0])) + "." == answer(r) for r in rows(dataset / "sft_eval.jsonl")
        ]
        assert sum(matched) / len(matched) >= 0.75  # template matching: ~0.9 (chance: 0.1)


def digit_vector(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    crop = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].astype(np.uint8) * 255
    v = np.asarray(Image.fromarray(crop).resize((12, 16), Image.BILINEAR), dtype=np.float32).flatten()
    v -= v.mean()
    return v / (np.linalg.norm(v) + 1e-6)


def read_digit(image: np.ndarray) -> str:
    from PIL import ImageDraw, ImageFont

    templates = {}
    for digit in "0123456789":
        clean = Image.new("L", (128, 128), 0)
        ImageDraw.Draw(clean).text((64, 64), digit, fill=255, font=ImageFont.load_default(size=60), anchor="mm")
        templates[digit] = digit_vector(np.asarray(clean) > 128)
    grey = image.mean(-1)
    ink = digit_vector(grey < np.median(grey) - 60)
    return max(templates, key=lambda d: float(templates[d] @ ink))


def close_to(image: np.ndarray, colour: str) -> np.ndarray:
    return ((image - np.array(synth.COLOURS[colour])) ** 2).sum(-1) < 40**2


def present(image: np.ndarray, colour: str) -> bool:
    return int(close_to(image, colour).sum()) > 10


def centre_of(image: np.ndarray, colour: str) -> tuple[float, float]:
    ys, xs = np.nonzero(close_to(image, colour))
    assert len(ys) > 10, colour
    return float(ys.mean()), float(xs.mean())


def test_deterministic_and_seeded(tmp_path: Path) -> None:
    for name in TASKS:
        a = make_dataset(name, tmp_path / f"{name}-a", seed=3, **SMALL)
        b = make_dataset(name, tmp_path / f"{name}-b", seed=3, **SMALL)
        assert (a / "sft_train.jsonl").read_bytes() == (b / "sft_train.jsonl").read_bytes()
        first = rows(a / "sft_train.jsonl")[0]["images"][0]
        assert (a / first).read_bytes() == (b / first).read_bytes()
        c = make_dataset(name, tmp_path / f"{name}-c", seed=4, **SMALL)
        assert (c / first).read_bytes() != (a / first).read_bytes()


def test_cli_task_and_unknown_task(tmp_path: Path) -> None:
    synth.main([str(tmp_path / "ds"), "--task", "counting", "--align-train", "4", "--align-eval", "2",
                "--sft-train", "4", "--sft-eval", "2", "--vocab-size", "300"])  # fmt: skip
    assert json.loads((tmp_path / "ds" / "synth.json").read_text())["params"]["task"] == "counting"
    with pytest.raises(ValueError, match="unknown task 'letters'; one of"):
        make_dataset("letters", tmp_path / "x")
