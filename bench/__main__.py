"""`python -m bench [--quick] [--only NAME …]`: every benchmark, one after the other, in one run.

Each prints its own side-by-side table (ratios of medians of interleaved repetitions); BENCHMARKS.md
records the latest full run. `--quick` runs everything at toy size so CI keeps the scripts working.
"""

from __future__ import annotations

import argparse
import importlib
import platform
import time

import torch

BENCHMARKS = (
    "projector", "overhead", "answer_logits", "feature_cache", "data_loading", "packing", "demo_task", "learning",
    "serve", "gpu",
)  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="toy sizes (CI)")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS))
    args = parser.parse_args(argv)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    machine = platform.processor() or platform.machine()
    print(f"# vlm-peft benchmarks: {machine}, {torch.get_num_threads()} threads, torch {torch.__version__}, {device}")
    for name in args.only:
        start = time.perf_counter()
        print(f"\n## {name}")
        if name == "gpu" and not args.quick and not torch.cuda.is_available():
            print("skipped: no CUDA device (`python -m bench.gpu --quick`: toy size on CPU; `--device cpu`: full size)")
            continue
        module = importlib.import_module(f"bench.{name}")
        module.main(["--quick"] if args.quick else [])
        print(f"({name}: {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
