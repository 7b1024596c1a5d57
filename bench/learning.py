"""Every projector kind on every task of the synthetic suite, same budget, several seeds: does the
cross-attention projector learn as well as LLaVA's MLP on tasks it was not tuned on?

Each run trains the tiny embedded models (random Qwen3 and CLIP tower, 16 patches) with the demo's
settings on one task (`data_tools.synth`), by default without captions (`recipes/demo-sft.yaml`: one
stage, projector + LoRA) or with them (`--align`: `recipes/demo.yaml`), and differs from the others
only in projector kind and image tokens (cross-attention at N = patches and N / 4, mlp, linear), task
and recipe seed. Held-out exact match is measured on the whole sft eval split at the end, and on its
first rows every K steps on a clock that leaves the probes out (time to 90 %).

    python -m bench.learning [--tasks …] [--variants …] [--seeds 0 1 2] [--jobs 2] [--out runs.json]
    python -m bench.learning --quick          # toy sizes, for CI

Runs go to `--jobs` worker processes of one torch thread each (on 2 cores, two single-thread runs do
more in the same time than one run on two threads: the tiny model's ops are too small to split).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
THRESHOLD = 0.9
PATCHES = 16  # the demo tower: 32 px images, 8 px patches


@dataclass(frozen=True)
class Variant:
    name: str
    kind: str
    tokens: int
    revision: int = 2


VARIANTS = {
    v.name: v
    for v in (
        Variant("cross_attention", "cross_attention", PATCHES),
        Variant("cross_attention/4", "cross_attention", PATCHES // 4),
        # Revision 1 (slots reading through attention only): the design issue 14 measured against mlp.
        Variant("cross_attention.r1", "cross_attention", PATCHES, revision=1),
        Variant("cross_attention.r1/4", "cross_attention", PATCHES // 4, revision=1),
        Variant("mlp", "mlp", PATCHES),
        Variant("linear", "linear", PATCHES),
    )
}
TASKS = ("shapes", "glyphs", "counting", "spatial", "compare")


@dataclass(frozen=True)
class Mode:
    data: dict[str, int]
    steps: int
    every: int  # probe every K steps
    probe_rows: int
    seeds: tuple[int, ...]
    tasks: tuple[str, ...]
    variants: tuple[str, ...]


FULL = Mode(
    data={"align_train": 3000, "align_eval": 200, "sft_train": 3000, "sft_eval": 300},
    steps=900,
    every=100,
    probe_rows=100,
    seeds=(0, 1, 2),
    tasks=TASKS,
    variants=tuple(v for v in VARIANTS if ".r1" not in v),
)
QUICK = Mode(
    data={"align_train": 48, "align_eval": 8, "sft_train": 48, "sft_eval": 12},
    steps=10,
    every=5,
    probe_rows=8,
    seeds=(0,),
    tasks=("glyphs", "compare"),
    variants=("cross_attention", "mlp"),
)


def run(job: dict[str, Any]) -> dict[str, Any]:
    """One training run (in a worker process)."""
    import torch
    import transformers

    from vlm_peft.data.rows import load_rows
    from vlm_peft.training.recipe import load_recipe
    from vlm_peft.training.stages import train

    from .probe import Probe

    torch.set_num_threads(job["threads"])
    # Each run's own output (progress, trainer logs) to a file beside its output dir, not into the table.
    Path(job["out"]).parent.mkdir(parents=True, exist_ok=True)
    log = os.open(f"{job['out']}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    sys.stdout.flush(), sys.stderr.flush()
    os.dup2(log, 1), os.dup2(log, 2)
    transformers.logging.set_verbosity_error()
    data, variant, align = Path(job["data"]), VARIANTS[job["variant"]], job["align"]
    stages = ("align", "sft") if align else ("sft",)
    sets = [
        f"output_dir={job['out']}",
        f"seed={job['seed']}",
        f"llm.tokenizer={data / 'tokenizer'}",
        f"projector.kind={variant.kind}",
        f"projector.num_image_tokens={variant.tokens}",
        f"projector.revision={variant.revision}",
        *(f"stages.{s}.data.{x}={data / f'{s}_{x}.jsonl'}" for s in stages for x in ("train", "eval")),
        *(f"stages.{s}.args.{k}={v}" for s in stages for k, v in (("disable_tqdm", "true"), ("save_steps", 100000))),
        f"stages.sft.args.max_steps={job['steps']}",
        *job["sets"],
    ]
    recipe = load_recipe(ROOT / "recipes" / ("demo.yaml" if align else "demo-sft.yaml"), sets)
    sft = recipe.stage("sft")
    rows = load_rows(data / "sft_eval.jsonl")
    probe = Probe(rows=rows.select(range(min(job["probe_rows"], len(rows)))), image_root=str(data),
                  every=job["every"], batch_size=sft.eval.batch_size, max_new_tokens=sft.eval.max_new_tokens,
                  quiet=True)  # fmt: skip
    start = time.perf_counter()
    metrics = train(recipe, callbacks=[probe])
    reached = next((p for p in probe.curve if p["em"] >= THRESHOLD), None)
    return {
        **{k: job[k] for k in ("task", "variant", "seed")},
        "em": metrics["sft"]["eval_exact_match"],
        "token_accuracy": metrics["sft"]["eval_token_accuracy"],
        "reach_90": reached and {"step": reached["step"], "train_s": reached["train_s"]},
        "train_s": round(probe.banked, 1),
        "wall_s": round(time.perf_counter() - start - probe.probe_s, 1),
        "curve": probe.curve,
    }


def summarize(results: list[dict[str, Any]], mode: Mode) -> dict[str, dict[str, dict[str, Any]]]:
    """Per task and variant: EM mean / min over seeds, time to 90 % (mean over the seeds that got there)."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for task in mode.tasks:
        for name in mode.variants:
            runs = [r for r in results if r["task"] == task and r["variant"] == name]
            if not runs:
                continue
            reached = [r["reach_90"] for r in runs if r["reach_90"]]
            table.setdefault(task, {})[name] = {
                "em_mean": statistics.mean(r["em"] for r in runs),
                "em_min": min(r["em"] for r in runs),
                "seeds": len(runs),
                "reached": len(reached),
                "to_90_s": statistics.mean(x["train_s"] for x in reached) if reached else None,
                "to_90_step": statistics.mean(x["step"] for x in reached) if reached else None,
                "train_s": statistics.mean(r["train_s"] for r in runs),
            }
    return table


def report(table: dict[str, dict[str, dict[str, Any]]], mode: Mode, align: bool) -> str:
    names = [n for n in mode.variants if any(n in row for row in table.values())]
    width = max(18, *(len(n) + 4 for n in names))
    header = f"{'task':<10}" + "".join(f"{n:>{width}}" for n in names)
    stages = "align + sft" if align else "sft only"
    lines = [f"held-out EM, mean (min) over {len(mode.seeds)} seed(s); {mode.steps} sft steps, {stages}", header]
    for task, row in table.items():
        cells = [f"{row[n]['em_mean']:.1%} ({row[n]['em_min']:.1%})" if n in row else "-" for n in names]
        lines.append(f"{task:<10}" + "".join(f"{c:>{width}}" for c in cells))
    lines += ["", f"time to {THRESHOLD:.0%} on the first {mode.probe_rows} eval rows: train s (step), mean over the "
              "seeds that got there; [reached/seeds]", header]  # fmt: skip
    for task, row in table.items():
        cells = []
        for n in names:
            cell = row.get(n)
            if cell is None:
                cells.append("-")
            elif cell["to_90_s"] is None:
                cells.append(f"never [0/{cell['seeds']}]")
            else:
                cells.append(f"{cell['to_90_s']:.0f} s ({cell['to_90_step']:.0f}) [{cell['reached']}/{cell['seeds']}]")
        lines.append(f"{task:<10}" + "".join(f"{c:>{width}}" for c in cells))
    if {"cross_attention", "mlp"} <= set(names):
        lines += ["", "cross-attention vs mlp, mean EM (points): N = patches (target >= -1), N/4 (target >= -3)"]
        for task, row in table.items():
            gaps = [f"{n} {100 * (row[n]['em_mean'] - row['mlp']['em_mean']):+.1f}"
                    for n in ("cross_attention", "cross_attention/4") if n in row and "mlp" in row]  # fmt: skip
            lines.append(f"{task:<10}" + ", ".join(gaps))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="toy data and steps, 2 tasks x 2 variants (CI)")
    parser.add_argument("--tasks", nargs="+", choices=TASKS)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int)
    parser.add_argument("--steps", type=int, help="sft steps (default: demo-sft's 900)")
    parser.add_argument("--align", action="store_true", help="with the caption stage first (recipes/demo.yaml)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="runs at once")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--set", action="append", default=[], help="recipe override for every run (key=value)")
    parser.add_argument("--data", type=Path, help="where the task datasets go (default: a temporary dir)")
    parser.add_argument("--runs", type=Path, help="keep each run's output dir and log here (default: a temporary dir)")
    parser.add_argument("--out", type=Path, help="write every run's results as JSON here")
    args = parser.parse_args(argv)
    base = QUICK if args.quick else FULL
    mode = Mode(
        data=base.data, steps=args.steps or base.steps, every=base.every, probe_rows=base.probe_rows,
        seeds=tuple(args.seeds or base.seeds), tasks=tuple(args.tasks or base.tasks),
        variants=tuple(args.variants or base.variants),
    )  # fmt: skip
    from data_tools.synth import make_dataset

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="learning_") as tmp:
        data_root = args.data or Path(tmp) / "data"
        datasets = {t: make_dataset(t, data_root / t, seed=0, **mode.data) for t in mode.tasks}
        jobs = [
            {"task": t, "variant": v, "seed": s, "data": str(datasets[t]), "align": args.align, "steps": mode.steps,
             "out": str((args.runs or Path(tmp) / "runs") / f"{t}-{v.replace('/', '_')}-{s}"), "every": mode.every,
             "probe_rows": mode.probe_rows, "threads": args.threads, "sets": args.set}
            for t in mode.tasks for s in mode.seeds for v in mode.variants
        ]  # fmt: skip
        results = []
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
            for result in pool.map(run, jobs):
                results.append(result)
                print(f"{result['task']:<9} {result['variant']:<18} seed {result['seed']}: EM {result['em']:.1%}, "
                      f"{result['train_s']:.0f} train s", flush=True)  # fmt: skip
    table = summarize(results, mode)
    print()
    print(report(table, mode, args.align))
    print(f"\nwall time {time.perf_counter() - start:.0f} s, {args.jobs} job(s) x {args.threads} thread(s), "
          f"{os.cpu_count()} cores; {' '.join(sys.argv[1:]) or 'defaults'}")  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps({"mode": asdict(mode), "align": args.align, "sets": args.set,
                                        "table": table, "runs": results}, indent=1) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
