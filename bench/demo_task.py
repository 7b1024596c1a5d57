"""Projector variants learning the demo task side by side: same recipe, data, seeds; only the projector differs.

Why: the projector is the one part we choose (cross-attention with N queries vs LLaVA-1.5's `mlp` vs
MiniMind-V's `linear`, one token per patch), and fewer image tokens are cheaper per step. This runs the
demo recipe's stages (`recipes/demo.yaml`, through `vlm_peft.training.stages.train`) once per variant in a fresh
output dir, and a callback measures held-out exact match on a fixed subset of the sft eval split every K
sft steps, so that learning speed can be compared in steps and in wall-clock seconds.

The clock ("train s") counts only the trainer loops of both stages (align + sft) and excludes the probe
evaluations themselves, so probes do not distort timings; "total s" is the whole `train()` call (model
building and end-of-stage evaluations included), probes excluded too.

Run: `python -m bench.demo_task [--out results.json]` (4 variants, under 9 min measured, 1 thread) or
`python -m bench.demo_task --quick` (tiny data and steps, 2 variants, under a minute; for CI).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from data_tools.synth import make_shapes_dataset
from vlm_peft.data.rows import load_rows
from vlm_peft.training.recipe import load_recipe
from vlm_peft.training.stages import train

from .probe import Probe, em_at

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "demo.yaml"
THRESHOLD = 0.9


@dataclass(frozen=True)
class Variant:
    name: str
    kind: str
    tokens: int


# The demo tower has 16 patches: mlp and linear emit one token per patch, so they must use 16.
CA16 = Variant("cross_attention-16", "cross_attention", 16)
CA4 = Variant("cross_attention-4", "cross_attention", 4)
MLP = Variant("mlp-16", "mlp", 16)
LINEAR = Variant("linear-16", "linear", 16)


@dataclass(frozen=True)
class Mode:
    """Sizes of one run. The first two variants get the same-wall-clock-budget comparison."""

    variants: tuple[Variant, ...]
    data: dict[str, int]
    every: int  # probe every K sft steps
    probe_rows: int  # first N rows of the sft eval split
    overrides: tuple[str, ...] = ()


FULL = Mode(
    variants=(CA16, CA4, MLP, LINEAR),
    data={"align_train": 3000, "align_eval": 200, "sft_train": 3000, "sft_eval": 300},  # the demo's data
    every=100,
    probe_rows=100,
)
QUICK = Mode(
    variants=(CA16, MLP),
    data={"align_train": 64, "align_eval": 16, "sft_train": 64, "sft_eval": 16},
    every=10,
    probe_rows=16,
    overrides=tuple(
        f"stages.{stage}.args.{key}={value}"
        for stage, steps in (("align", 10), ("sft", 20))
        for key, value in (("max_steps", steps), ("warmup_steps", 2), ("save_steps", 1000), ("logging_steps", 10))
    ),
)


def run_variant(variant: Variant, mode: Mode, data: Path, work: Path, seed: int) -> dict[str, Any]:
    """Both demo stages for one projector variant, in its own output dir (the random base is rebuilt, same seed)."""
    sets = [
        f"output_dir={work / variant.name}",
        f"seed={seed}",
        f"llm.tokenizer={data / 'tokenizer'}",
        f"projector.kind={variant.kind}",
        f"projector.num_image_tokens={variant.tokens}",
        *(f"stages.{s}.data.{x}={data / f'{s}_{x}.jsonl'}" for s in ("align", "sft") for x in ("train", "eval")),
        *(f"stages.{s}.args.disable_tqdm=true" for s in ("align", "sft")),  # logs as lines, not progress bars
        *mode.overrides,
    ]
    recipe = load_recipe(RECIPE, sets)
    sft = recipe.stage("sft")
    rows = load_rows(data / "sft_eval.jsonl")
    probe = Probe(
        rows=rows.select(range(min(mode.probe_rows, len(rows)))),
        image_root=str(data),
        every=mode.every,
        batch_size=sft.eval.batch_size,
        max_new_tokens=sft.eval.max_new_tokens,
    )
    print(f"{variant.name}: projector {variant.kind}, {variant.tokens} image tokens", flush=True)
    start = time.perf_counter()
    metrics = train(recipe, callbacks=[probe])
    total = time.perf_counter() - start - probe.probe_s
    reached = next((p for p in probe.curve if p["em"] >= THRESHOLD), None)
    # The stage's own predictions on the full eval split: what a variant that plateaus gets wrong.
    with (recipe.stage_dir("sft") / "eval_predictions.jsonl").open() as handle:
        wrong = [p for p in map(json.loads, handle) if not p["correct"]]
    errors = collections.Counter(f"{p['target']!r} -> {p['prediction']!r}" for p in wrong).most_common(3)
    return {
        "variant": asdict(variant),
        "final_em": metrics["sft"]["eval_exact_match"],
        "final_token_accuracy": metrics["sft"]["eval_token_accuracy"],
        "final_eval_samples": metrics["sft"]["eval_samples"],
        "align_token_accuracy": metrics["align"].get("eval_token_accuracy"),
        "reach_90": reached and {"step": reached["step"], "train_s": reached["train_s"]},
        "train_s": round(probe.banked, 2),
        "total_s": round(total, 2),
        "probe_s": round(probe.probe_s, 2),
        "sft_step_ms_median": round(1000 * statistics.median(probe.step_s), 1),
        "trainable_align": metrics["align"]["projector"] + metrics["align"]["lora"],
        "trainable_sft": metrics["sft"]["projector"] + metrics["sft"]["lora"],
        "trainable_sft_projector": metrics["sft"]["projector"],
        "curve": probe.curve,
        "top_errors": errors,
        "metrics": metrics,
    }


def same_budget(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """EM each variant had reached when the faster of the two finished training (train clock)."""
    budget = min(a["train_s"], b["train_s"])
    return {
        "budget_train_s": budget,
        "faster": (a if a["train_s"] <= b["train_s"] else b)["variant"]["name"],
        "em": {r["variant"]["name"]: em_at(r["curve"], budget) for r in (a, b)},
    }


def report(results: list[dict[str, Any]], budget: dict[str, Any], probe_rows: int) -> str:
    header = (
        f"{'variant':<20}{'final EM':>9}{'tok acc':>9}{'90% EM at':>16}{'train s':>9}{'total s':>9}"
        f"{'sft step':>10}{'trainable sft':>15}{'(projector)':>13}"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        hit = r["reach_90"]
        reach = f"{hit['train_s']:.0f} s / st {hit['step']}" if hit else "not reached"
        lines.append(
            f"{r['variant']['name']:<20}{r['final_em']:>9.1%}{r['final_token_accuracy']:>9.1%}{reach:>16}"
            f"{r['train_s']:>9.1f}{r['total_s']:>9.1f}{r['sft_step_ms_median']:>8.0f}ms"
            f"{r['trainable_sft']:>15,}{r['trainable_sft_projector']:>13,}"
        )
    lines += [
        "",
        f"final EM: full sft eval split ({results[0]['final_eval_samples']} rows), end of stage; 90% EM: first probe "
        f"at >= 90% on the first {probe_rows} rows; train s: trainer loops of align + sft, probes excluded;",
        "total s: the whole train() call, probes excluded; sft step: median wall time per sft optimizer step.",
        "",
        f"curves: held-out EM on the first {probe_rows} sft eval rows (step / train s / EM)",
    ]
    for r in results:
        points = "  ".join(f"{p['step']}/{p['train_s']:.0f}s/{p['em']:.0%}" for p in r["curve"])
        lines.append(f"{r['variant']['name']:<20}{points}")
    lines += ["", "most common errors on the full sft eval split (target -> prediction: count)"]
    for r in results:
        shown = ", ".join(f"{e}: {n}" for e, n in r["top_errors"]) or "none"
        lines.append(f"{r['variant']['name']:<20}{shown}")
    names = list(budget["em"])
    ems = ", ".join(f"{n} {e:.1%}" for n, e in budget["em"].items())
    lines += [
        "",
        f"same wall-clock budget ({names[0]} vs {names[1]}): when {budget['faster']} finished "
        f"({budget['budget_train_s']:.1f} train s): {ems} (interpolated)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny data and steps, two variants (CI)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--seed", type=int, default=0, help="recipe seed, the same for every variant")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: with 2 threads on 2 cores beside one other busy process, each of the tiny "
        "model's many small ops can wait a scheduler slice for its 2nd thread: --quick took 643 s instead of 10 s; "
        "OMP_WAIT_POLICY=PASSIVE also avoids that)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    mode = QUICK if args.quick else FULL
    start = time.perf_counter()
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="demo_task_") as tmp:
        data = make_shapes_dataset(Path(tmp) / "data", seed=args.seed, **mode.data)
        results = [run_variant(v, mode, data, Path(tmp) / "runs", args.seed) for v in mode.variants]
    budget = same_budget(results[0], results[1])
    wall = time.perf_counter() - start
    print()
    print(report(results, budget, mode.probe_rows))
    print(
        f"\nbenchmark wall time {wall:.0f} s (probes included); torch threads {torch.get_num_threads()}, "
        f"cores {os.cpu_count()}, 1-min load {load_start:.2f} at start, {os.getloadavg()[0]:.2f} at end"
    )
    if args.out:
        out = {
            "mode": "quick" if args.quick else "full",
            "seed": args.seed,
            "probe_every": mode.every,
            "probe_rows": mode.probe_rows,
            "data": mode.data,
            "overrides": list(mode.overrides),
            "wall_s": round(wall, 1),
            "torch_threads": torch.get_num_threads(),
            "cores": os.cpu_count(),
            "load_1min": [round(load_start, 2), round(os.getloadavg()[0], 2)],
            "results": results,
            "same_budget": budget,
        }
        args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
