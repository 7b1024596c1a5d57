"""A stage's trainer checkpoints: which one to resume from, and what the stage trained before it."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from .distributed import world_size
from .trainer import LOSS_KEY

logger = logging.getLogger(__name__)

# transformers writes trainer_state.json after everything else of a checkpoint: with it, the rest is whole.
CHECKPOINT_FILES = ("vlm_config.json", "projector.safetensors", "trainer_state.json")


def last_complete_checkpoint(stage_dir: Path) -> str | None:
    """The newest checkpoint that was written to the end. transformers writes trainer_state.json
    last, so a checkpoint torn by a kill or a full disk lacks it (or holds half of it); such a dir is
    renamed `incomplete-checkpoint-N` (kept for a look, out of transformers' way) with a warning, and
    the one before it is taken."""
    found = []
    for path in stage_dir.iterdir():
        match = re.fullmatch(r"checkpoint-(\d+)", path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    for _, path in sorted(found, reverse=True):
        # Under several processes each writes its own RNG state, with no barrier before trainer_state.json.
        ranks = [f"rng_state_{r}.pth" for r in range(world_size())] if world_size() > 1 else []
        missing = [name for name in (*CHECKPOINT_FILES, *ranks) if not (path / name).is_file()]
        try:
            json.loads((path / "trainer_state.json").read_text())
        except (OSError, ValueError):
            missing.append("complete trainer_state.json")
        if not missing:
            return str(path)
        aside = path.with_name(f"incomplete-{path.name}")
        while aside.exists():
            aside = aside.with_name(aside.name + "-")
        path.rename(aside)
        logger.warning(
            "%s is incomplete (no %s: the run died while writing it); moved to %s, resuming from the checkpoint "
            "before it",
            path, ", ".join(missing), aside.name,
        )  # fmt: skip
    return None


def history(checkpoint: str) -> list[dict[str, Any]]:
    return json.loads((Path(checkpoint) / "trainer_state.json").read_text()).get("log_history", [])


def finished_checkpoint(checkpoint: str | None, max_steps: int) -> int | None:
    """The steps of `checkpoint` when it already reached max_steps, else None."""
    if not checkpoint or max_steps <= 0:
        return None
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    return state["global_step"] if state["global_step"] >= max_steps else None


def loss_so_far(checkpoint: str) -> tuple[float, int]:
    """(sum of the per-step train losses, steps) up to `checkpoint`: as VLMTrainer records it, or, in a
    checkpoint without the record, from the logged losses (each the mean since the previous log)."""
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    record = state.get("stateful_callbacks", {}).get(LOSS_KEY)
    if record:
        return float(record["loss_sum"]), int(record["steps"])
    total, last = 0.0, 0
    for entry in state.get("log_history", []):
        if "loss" in entry and entry.get("step", 0) > last:
            total += entry["loss"] * (entry["step"] - last)
            last = entry["step"]
    return total, last


def trainable_record(checkpoint: str) -> dict[str, int] | None:
    """Trainable parameter count by role when `checkpoint` was saved (None in checkpoints without it)."""
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    return state.get("stateful_callbacks", {}).get(LOSS_KEY, {}).get("trainable")


STREAM_KEY = "StreamPosition"


class StreamPosition(TrainerCallback, ExportableState):
    """The rows of a streamed stage's data that finished optimizer steps consumed, saved with each
    checkpoint (trainer_state.json), so that a resume skips exactly those rows, also when the batch
    size or the number of processes changed since. transformers itself would skip batches by running
    the collator on every one of them (`skip_first_batches`), images and all."""

    def __init__(self, rows: int = 0) -> None:
        self.rows = rows

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.rows += rows_per_step(args)

    def state(self) -> dict[str, Any]:
        return {"args": {"rows": self.rows}, "attributes": {}}


def rows_per_step(args: Any) -> int:
    """Rows of the (one, shared) stream an optimizer step consumes over all processes."""
    return args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size


def stream_position(checkpoint: str | None, args: Any) -> int:
    """Rows of the stream consumed up to `checkpoint` (0 without one)."""
    if checkpoint is None:
        return 0
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    saved = state.get("stateful_callbacks", {}).get(STREAM_KEY)
    if saved:
        return int(saved["args"]["rows"])
    steps = state["global_step"]
    logger.warning("%s holds no stream position (it was not streamed); skipping %d steps' rows", checkpoint, steps)
    return steps * rows_per_step(args)
