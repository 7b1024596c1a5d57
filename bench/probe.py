"""Held-out exact match probed during training, on a clock that leaves the probes out."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from vlm_peft.training.evaluate import evaluate


@dataclass
class Probe(TrainerCallback):
    """Every `every` sft steps (and before the first), exact match of the trainer's model on `rows`.

    Also keeps the clock: seconds inside the trainer loops of all stages so far, probes excluded.
    """

    rows: Any
    image_root: str
    every: int
    batch_size: int
    max_new_tokens: int
    stage: str = "sft"
    quiet: bool = False
    curve: list[dict[str, float]] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)
    probe_s: float = 0.0
    banked: float = 0.0  # trainer-loop seconds of finished stages
    _begin: float = 0.0
    _paused: float = 0.0  # probe seconds within the current stage
    _last: float = 0.0

    def clock(self) -> float:
        return self.banked + time.perf_counter() - self._begin - self._paused

    def _is_probed(self, args: Any) -> bool:
        return Path(args.output_dir).name == self.stage

    def _probe(self, step: int, model: torch.nn.Module, processor: Any) -> None:
        start = time.perf_counter()
        at = self.clock()
        summary, _ = evaluate(
            model,
            processor,
            self.rows,
            self.image_root,
            batch_size=self.batch_size,
            max_new_tokens=self.max_new_tokens,
        )
        self.curve.append({"step": step, "train_s": round(at, 2), "em": summary["exact_match"]})
        if not self.quiet:
            print(f"  step {step:>4}  {at:7.1f} s  EM {summary['exact_match']:6.1%}", flush=True)
        spent = time.perf_counter() - start
        self._paused += spent
        self.probe_s += spent
        self._last = time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        self._begin, self._paused = time.perf_counter(), 0.0
        self._last = self._begin
        if self._is_probed(args):
            self._probe(state.global_step, kwargs["model"], kwargs["processing_class"])

    def on_step_end(self, args, state, control, **kwargs):
        if not self._is_probed(args):
            return
        self.step_s.append(time.perf_counter() - self._last)
        self._last = time.perf_counter()
        if state.global_step % self.every == 0:
            self._probe(state.global_step, kwargs["model"], kwargs["processing_class"])

    def on_train_end(self, args, state, control, **kwargs):
        self.banked = self.clock()


def em_at(curve: list[dict[str, float]], seconds: float) -> float:
    """EM at `seconds` on the train clock, linearly interpolated between probes (clamped at both ends)."""
    points = [(p["train_s"], p["em"]) for p in curve]
    if seconds <= points[0][0]:
        return points[0][1]
    for (t0, e0), (t1, e1) in zip(points, points[1:]):
        if seconds <= t1:
            return e0 + (e1 - e0) * (seconds - t0) / max(t1 - t0, 1e-9)
    return points[-1][1]
