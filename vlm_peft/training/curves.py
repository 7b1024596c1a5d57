"""A stage's loss curve from the trainer's log history: `loss.csv` always, `loss.png` with matplotlib."""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

COLUMNS = ("step", "loss", "eval_loss", "learning_rate")
_warned = False


def curve_rows(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per logged step: train loss and learning rate, eval loss where the trainer evaluated."""
    rows: dict[int, dict[str, Any]] = {}
    for entry in log_history:
        if "step" not in entry:
            continue
        row = rows.setdefault(entry["step"], {"step": entry["step"]})
        for key in COLUMNS[1:]:
            if entry.get(key) is not None:
                row[key] = entry[key]
    return [rows[step] for step in sorted(rows) if len(rows[step]) > 1]


def write_loss_curve(log_history: list[dict[str, Any]], out_dir: str | Path, title: str) -> Path | None:
    """`out_dir/loss.csv`, and `out_dir/loss.png` when matplotlib is installed; returns the picture's
    path, or the CSV's without matplotlib, or None when nothing was logged."""
    global _warned
    rows = curve_rows(log_history)
    if not rows:
        return None
    out_dir = Path(out_dir)
    with (out_dir / "loss.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    try:
        # A Figure of its own, not pyplot: no backend is switched under a notebook that calls train().
        from matplotlib.figure import Figure
    except ImportError:
        if not _warned:
            logger.warning("matplotlib is not installed: loss curves are written as loss.csv only (pip install "
                           "matplotlib, or vlm-peft[plot], for loss.png)")  # fmt: skip
            _warned = True
        return out_dir / "loss.csv"
    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot()
    for key, style in (("loss", "-"), ("eval_loss", "o-")):
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            ax.plot(*zip(*points), style, label=key.replace("_", " "), markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    lr = [(r["step"], r["learning_rate"]) for r in rows if "learning_rate" in r]
    handles, labels = ax.get_legend_handles_labels()
    if lr:
        ax2 = ax.twinx()
        (line,) = ax2.plot(*zip(*lr), "--", color="gray", label="learning rate")
        ax2.set_ylabel("learning rate")
        handles, labels = [*handles, line], [*labels, "learning rate"]
    ax.legend(handles, labels, loc="upper right")
    fig.tight_layout()
    path = out_dir / "loss.png"
    fig.savefig(path)
    return path
