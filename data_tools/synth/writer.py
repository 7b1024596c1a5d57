"""Writing one synthetic task to disk: images, the canonical jsonl splits, a tiny tokenizer, a manifest.

Every task draws its samples per split from its own random stream (the eval splits first, so held-out
sets stay the same when only the train sizes change), with keys that never repeat across splits, and
says what each sample's images, caption (align) and question/answer (sft) are; this module does the
rest the same way for all of them.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

log = logging.getLogger(__name__)

MANIFEST = "synth.json"
IMAGE_DIR = "images"
TOKENIZER_DIR = "tokenizer"
# Eval splits are drawn first, from their own random streams, so that the held-out sets stay the
# same when only the train sizes change (train draws skip anything eval already used).
SPLITS = ("align_eval", "sft_eval", "align_train", "sft_train")
ALIGN_PROMPTS = (
    "Describe the image.",
    "What do you see?",
    "Caption this image.",
    "What is in the picture?",
    "Give a short caption.",
)


class Task(Protocol):
    """What a synthetic task draws; `Sample`s carry a hashable `key` (what a drawing shows, jitter aside)."""

    name: str

    def draw(self, rng: random.Random, n: int, image_size: int, used: set) -> list[Any]:
        """`n` samples, classes balanced, every key new to `used` (and added to it)."""

    def images(self, sample: Any, image_size: int) -> list[Image.Image]: ...

    def qa(self, split: str, samples: list[Any], rng: random.Random) -> list[tuple[str, str]]:
        """(question, answer) per sample: a caption for align splits, an instruction for sft ones."""


def row(question: str, answer: str, image_paths: list[str]) -> dict[str, Any]:
    images = [{"type": "image"} for _ in image_paths]
    return {
        "messages": [
            {"role": "user", "content": [*images, {"type": "text", "text": question}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ],
        "images": image_paths,
    }


def _texts(message: dict[str, Any]) -> str:
    return "".join(p["text"] for p in message["content"] if p["type"] == "text")


def tokenizer_texts(rows: list[dict[str, Any]]) -> Iterator[str]:
    """The rendered chat texts of `rows`, cut at special tokens.

    The BPE trainer does not skip special tokens, so whole rendered texts would spend merges on
    pieces like `|><|`; the pieces between them are exactly what the tokenizer will see.
    """
    from vlm_peft import VLMProcessor
    from vlm_peft.tiny import SPECIAL_TOKENS, tiny_image_processor, tiny_tokenizer

    # Only the chat template is needed here; the bootstrap tokenizer is never used for the data.
    processor = VLMProcessor(tiny_image_processor(32), tiny_tokenizer(["user"], vocab_size=300), num_image_tokens=1)
    split = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))
    rendered: dict[tuple[str, str, int], list[str]] = {}
    for r in rows:
        msgs = r["messages"]
        qa = (_texts(msgs[0]), _texts(msgs[1]), len(r["images"]))
        if qa not in rendered:  # few distinct conversations: render each once
            text = processor.apply_chat_template(msgs, tokenize=False)
            rendered[qa] = [p for p in split.split(text) if p]
        yield from rendered[qa]
    yield "system\n"  # for system prompts, which the rows do not have


def _write_atomic(path: Path, data: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(data, encoding="utf-8")
    os.replace(tmp, path)


def is_complete(out: Path, params: dict[str, Any]) -> bool:
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


def remove_stale_images(out: Path, keep: set[str]) -> None:
    """Remove images an earlier run of this module wrote that this run did not rewrite; nothing else."""
    ours = re.compile(r"(align|sft)_(train|eval)_\d+(_\d+)?\.png")
    for name in os.listdir(out / IMAGE_DIR):
        if ours.fullmatch(name) and name not in keep:
            (out / IMAGE_DIR / name).unlink()


def check_sizes(sizes: dict[str, int], image_size: int) -> None:
    if any(n < 0 for n in sizes.values()):
        raise ValueError(f"split sizes must be >= 0, got {sizes}.")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}.")


def write_task(
    task: Task, out_dir: str | os.PathLike[str], params: dict[str, Any], sizes: dict[str, int], seed: int,
    image_size: int, vocab_size: int,
) -> Path:  # fmt: skip
    """Write `task`'s dataset to `out_dir` (left as is when a complete one with the same `params` is there).

    The manifest `synth.json` is written last, so an interrupted run is redone rather than taken as
    complete; images are overwritten in place (creating thousands of files right after deleting them
    is several times slower on ext4) and stale ones removed after."""
    out = Path(out_dir)
    if is_complete(out, params):
        log.info("%s dataset in %s is up to date (seed %d).", task.name, out, seed)
        return out
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # first: from here on the dir is not complete
    (out / IMAGE_DIR).mkdir(exist_ok=True)
    used: set = set()
    all_rows: list[dict[str, Any]] = []
    image_names: list[str] = []
    drawn = 0
    for split in SPLITS:
        rng = random.Random(f"{task.name}-{seed}-{split}")
        samples = task.draw(rng, sizes[split], image_size, used)
        drawn += len(samples)
        rows = []
        for i, (sample, (question, answer)) in enumerate(zip(samples, task.qa(split, samples, rng))):
            images = task.images(sample, image_size)
            names = (
                [f"{split}_{i:05d}.png"]
                if len(images) == 1
                else [f"{split}_{i:05d}_{j}.png" for j in range(len(images))]
            )
            for name, image in zip(names, images):
                image.save(out / IMAGE_DIR / name, format="PNG")
            image_names += names
            rows.append(row(question, answer, [f"{IMAGE_DIR}/{name}" for name in names]))
        _write_atomic(out / f"{split}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        all_rows.extend(rows)
    if len(used) != drawn:  # held-out images must never repeat a train image
        raise AssertionError(f"{task.name}: a sample key repeats across splits")
    remove_stale_images(out, set(image_names))

    from vlm_peft.tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer(tokenizer_texts(all_rows), vocab_size=vocab_size)
    tokenizer.save_pretrained(out / TOKENIZER_DIR)
    manifest = {"params": params, "counts": sizes, "images": image_names}
    _write_atomic(out / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    log.info(
        "%s dataset: align %d/%d, sft %d/%d rows (train/eval), %d images of %d px, tokenizer of %d tokens, "
        "seed %d -> %s in %.1fs",
        task.name, sizes["align_train"], sizes["align_eval"], sizes["sft_train"], sizes["sft_eval"], len(image_names),
        image_size, len(tokenizer), seed, out, time.perf_counter() - start,
    )  # fmt: skip
    return out
