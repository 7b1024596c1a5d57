"""The synthetic shapes dataset: deterministic, in the canonical row format, answers true to the images,
held-out splits disjoint from train, idempotent, with a tokenizer that loads with transformers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from transformers import AutoTokenizer

from data_tools import synth
from data_tools.synth import make_shapes_dataset
from vlm_peft import VLMProcessor
from vlm_peft.tiny import tiny_image_processor

SMALL = dict(align_train=60, align_eval=20, sft_train=60, sft_eval=30, vocab_size=320)
SPLITS = ("align_train", "align_eval", "sft_train", "sft_eval")
CAPTION = re.compile(r"An? (\w+) (\w+)\.")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes") / "ds", seed=0, **SMALL)


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def file_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def foreground(image: Image.Image) -> np.ndarray:
    """Mask of the pixels that differ clearly from the (corner) background."""
    pixels = np.asarray(image, dtype=np.int32)
    return np.abs(pixels - pixels[0, 0]).sum(-1) > 60


def seen(image: Image.Image) -> tuple[str, str, tuple[int, int, int, int]]:
    """(colour, shape, foreground box) as read back from the pixels alone."""
    pixels = np.asarray(image, dtype=np.int32)
    mask = foreground(image)
    median = np.median(pixels[mask], axis=0)
    colour = min(synth.COLOURS, key=lambda c: float(((median - np.array(synth.COLOURS[c])) ** 2).sum()))
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
    box = mask[y0 : y1 + 1, x0 : x1 + 1]
    fill = box.mean()
    # Fill of the shape's own bounding box: square 1, circle pi/4, cross 5/9, triangle 1/2, star ~0.38;
    # a triangle is the one with both bottom corners filled.
    if fill > 0.93:
        shape = "square"
    elif fill > 0.7:
        shape = "circle"
    elif box[-1, 0] and box[-1, -1]:
        shape = "triangle"
    elif fill < 0.46:
        shape = "star"
    else:
        shape = "cross"
    return colour, shape, (int(x0), int(y0), int(x1), int(y1))


def test_files_and_row_format(dataset: Path) -> None:
    for split in SPLITS:
        rows = read_rows(dataset / f"{split}.jsonl")
        assert len(rows) == SMALL[split]
        for row in rows:
            assert set(row) == {"messages", "images"}
            user, assistant = row["messages"]
            assert user["role"] == "user" and assistant["role"] == "assistant"
            assert user["content"][0] == {"type": "image"}
            assert user["content"][1]["type"] == "text" and user["content"][1]["text"]
            assert assistant["content"] == [{"type": "text", "text": assistant["content"][0]["text"]}]
            (path,) = row["images"]
            assert path.startswith("images/") and not Path(path).is_absolute()
            with Image.open(dataset / path) as image:
                assert image.mode == "RGB" and image.size == (64, 64)
    manifest = json.loads((dataset / "synth.json").read_text())
    assert manifest["params"]["seed"] == 0 and manifest["params"]["sft_eval"] == SMALL["sft_eval"]


def test_question_kinds(dataset: Path) -> None:
    align = read_rows(dataset / "align_train.jsonl")
    assert all(r["messages"][0]["content"][1]["text"] in synth.ALIGN_PROMPTS for r in align)
    assert all(CAPTION.fullmatch(r["messages"][1]["content"][0]["text"]) for r in align)
    sft = read_rows(dataset / "sft_train.jsonl")
    questions = [r["messages"][0]["content"][1]["text"] for r in sft]
    counts = {q: questions.count(q) for q in (synth.SFT_SHAPE_Q, synth.SFT_COLOUR_Q, synth.SFT_DESCRIBE_Q)}
    assert counts == {q: len(sft) // 3 for q in counts}  # evenly mixed
    for row, question in zip(sft, questions):
        answer = row["messages"][1]["content"][0]["text"]
        if question == synth.SFT_SHAPE_Q:
            assert answer in {f"A {s}." for s in synth.SHAPES}
        elif question == synth.SFT_COLOUR_Q:
            assert answer in {f"{c.capitalize()}." for c in synth.COLOURS}
        else:
            assert CAPTION.fullmatch(answer)


@pytest.mark.parametrize("split", ["align_train", "align_eval", "sft_eval"])
def test_answers_match_pixels(dataset: Path, split: str) -> None:
    for row in read_rows(dataset / f"{split}.jsonl"):
        with Image.open(dataset / row["images"][0]) as image:
            colour, shape, box = seen(image.convert("RGB"))
        answer = row["messages"][1]["content"][0]["text"]
        if match := CAPTION.fullmatch(answer):
            assert match.groups() == (colour, shape), row
        elif answer.startswith("A "):
            assert answer == f"A {shape}.", row
        else:
            assert answer == f"{colour.capitalize()}.", row
        side = min(box[2] - box[0], box[3] - box[1]) + 1
        assert side >= 0.3 * 64  # big enough to survive a 32 px downscale
        assert min(box[:2]) >= 2 and max(box[2:]) <= 61  # well inside the image


def test_held_out_disjoint_from_train(dataset: Path) -> None:
    def drawn(split: str) -> list[tuple]:
        out = []
        for row in read_rows(dataset / f"{split}.jsonl"):
            with Image.open(dataset / row["images"][0]) as image:
                out.append(seen(image.convert("RGB")))
        return out

    train = set(drawn("align_train")) | set(drawn("sft_train"))
    for split in ("align_eval", "sft_eval"):
        assert not train & set(drawn(split))
    train_paths = {r["images"][0] for s in ("align_train", "sft_train") for r in read_rows(dataset / f"{s}.jsonl")}
    for split in ("align_eval", "sft_eval"):
        assert not train_paths & {r["images"][0] for r in read_rows(dataset / f"{split}.jsonl")}


def test_deterministic(tmp_path: Path) -> None:
    a = file_bytes(make_shapes_dataset(tmp_path / "a", seed=3, **SMALL))
    b = file_bytes(make_shapes_dataset(tmp_path / "b", seed=3, **SMALL))
    assert a.keys() == b.keys() and a == b
    c = file_bytes(make_shapes_dataset(tmp_path / "c", seed=4, **SMALL))
    for split in SPLITS:
        assert a[f"{split}.jsonl"] != c[f"{split}.jsonl"] or SMALL[split] == 0
    assert sum(a[k] != c[k] for k in a if k.startswith("images/")) > len(a) // 2


def test_eval_splits_independent_of_train_sizes(tmp_path: Path) -> None:
    a = file_bytes(make_shapes_dataset(tmp_path / "a", **SMALL))
    b = file_bytes(make_shapes_dataset(tmp_path / "b", **{**SMALL, "align_train": 90, "sft_train": 30}))
    for split in ("align_eval", "sft_eval"):
        assert a[f"{split}.jsonl"] == b[f"{split}.jsonl"]


def test_idempotent_and_regenerates(tmp_path: Path) -> None:
    out = make_shapes_dataset(tmp_path / "ds", **SMALL)
    before = mtimes(out)
    assert make_shapes_dataset(tmp_path / "ds", **SMALL) == out
    assert mtimes(out) == before  # nothing rewritten

    smaller = {**SMALL, "align_train": 30}
    make_shapes_dataset(out, **smaller)
    assert len(read_rows(out / "align_train.jsonl")) == 30
    assert json.loads((out / "synth.json").read_text())["params"]["align_train"] == 30
    names = {p.name for p in (out / "images").iterdir()}
    assert "align_train_00029.png" in names and "align_train_00030.png" not in names  # stale ones removed
    assert file_bytes(out) == file_bytes(make_shapes_dataset(tmp_path / "fresh", **smaller))


def test_interrupted_run_is_redone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt  # after the images and jsonl files, before tokenizer and manifest

    monkeypatch.setattr(synth.writer, "remove_stale_images", boom)
    with pytest.raises(KeyboardInterrupt):
        make_shapes_dataset(tmp_path / "ds", **SMALL)
    assert not (tmp_path / "ds" / "synth.json").exists()
    monkeypatch.undo()
    out = make_shapes_dataset(tmp_path / "ds", **SMALL)
    assert (out / "synth.json").exists() and (out / "tokenizer" / "tokenizer.json").exists()
    assert file_bytes(out) == file_bytes(make_shapes_dataset(tmp_path / "fresh", **SMALL))


def test_tokenizer(dataset: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(dataset / "tokenizer")
    assert len(tokenizer) == SMALL["vocab_size"]
    assert "<|image_pad|>" in tokenizer.get_vocab()
    text = "What colour is the shape? An orange star."
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert len(tokenizer.tokenize("Describe the image.")) < len("Describe the image.")  # merges learnt

    # The rows go through the project's processor as they are.
    processor = VLMProcessor(tiny_image_processor(32), tokenizer, num_image_tokens=8)
    row = read_rows(dataset / "sft_eval.jsonl")[0]
    text = processor.apply_chat_template(row["messages"], tokenize=False)
    batch = processor(text=text, images=[Image.open(dataset / row["images"][0])])
    assert batch["pixel_values"].shape == (1, 3, 32, 32)
    assert (batch["input_ids"] == processor.image_token_id).sum() == 8


def test_cli(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    args = [str(tmp_path / "ds"), "--seed", "1", "--align-train", "6", "--align-eval", "3"]
    args += ["--sft-train", "6", "--sft-eval", "3", "--image-size", "48", "--vocab-size", "300"]
    with caplog.at_level("INFO", logger="data_tools.synth"):
        synth.main(args)
    assert "shapes dataset" in caplog.text
    params = json.loads((tmp_path / "ds" / "synth.json").read_text())["params"]
    assert params["seed"] == 1 and params["image_size"] == 48 and params["vocab_size"] == 300
    with Image.open(tmp_path / "ds" / read_rows(tmp_path / "ds" / "sft_eval.jsonl")[0]["images"][0]) as image:
        assert image.size == (48, 48)


def test_rejects_bad_sizes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sizes"):
        make_shapes_dataset(tmp_path / "ds", align_train=-1)
    with pytest.raises(ValueError, match="image_size"):
        make_shapes_dataset(tmp_path / "ds", image_size=8)
