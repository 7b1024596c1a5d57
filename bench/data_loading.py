"""Data loading: load time and peak memory of `load_rows` at 10k / 100k / 1M rows (JSONL, and parquet
with embedded PNG bytes), before (the code up to issue 15: every row a Python dict, `Dataset.from_list`)
and after (Arrow on disk, `Dataset.map` in worker processes), each in a fresh process; then the
collator's throughput with 0 / 1 / 2 / 4 DataLoader workers against the training step it must feed.

Run: `python -m bench.data_loading` (about 7 minutes on 2 cores) or `--quick` (toy sizes, for CI; its memory
figures mean nothing: all but one load run in the one process).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Rows of each size, and the largest size the old loader is run at by default (its 1M-row JSONL run
# alone takes minutes and GBs: --before-up-to 1000000 runs it anyway).
SIZES = (10_000, 100_000, 1_000_000)
QUICK_SIZES = (1_000,)
BEFORE_UP_TO = 100_000
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
SHAPES = ("circle", "square", "triangle", "star")


def _pngs(count: int = 16, size: int = 16) -> list[bytes]:
    """Small noisy PNGs (~0.8 KB each: noise does not compress, so the bytes are real bytes)."""
    from PIL import Image

    rng = random.Random(0)
    out = []
    for _ in range(count):
        image = Image.frombytes("RGB", (size, size), bytes(rng.randrange(256) for _ in range(size * size * 3)))
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def _messages(i: int, parts: bool) -> list[dict]:
    question = f"What is in picture {i}? Answer with the colour and the shape."
    answer = f"A {COLOURS[i % len(COLOURS)]} {SHAPES[i % len(SHAPES)]}."
    user = [{"type": "image"}, {"type": "text", "text": question}]
    if parts:  # as `vlm-peft data convert` writes parquet: every part with both keys
        user = [{"type": "image", "text": None}, {"type": "text", "text": question}]
        return [{"role": "user", "content": user}, {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def write_jsonl(path: Path, rows: int) -> None:
    with path.open("w") as handle:
        for i in range(rows):
            row = {"messages": _messages(i, parts=False), "images": [f"images/{i % 16}.png"]}
            handle.write(json.dumps(row) + "\n")


def write_parquet(path: Path, rows: int, batch: int = 20_000) -> None:
    """Canonical rows with embedded image bytes, in the layout `vlm-peft data convert` writes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_tools.convert import FEATURES

    pngs = _pngs()
    with pq.ParquetWriter(path, FEATURES.arrow_schema) as writer:
        for start in range(0, rows, batch):
            chunk = [
                {"messages": _messages(i, parts=True), "images": [{"bytes": pngs[i % 16], "path": None}], "tools": None}
                for i in range(start, min(start + batch, rows))
            ]
            writer.write_table(pa.Table.from_pylist(chunk, schema=FEATURES.arrow_schema))


def load_before(path: Path):
    """`load_rows` as it was before issue 15 (rows as Python dicts, then `Dataset.from_list`)."""
    import datasets

    from vlm_peft.data.rows import normalize_row

    if path.suffix == ".jsonl":
        with path.open("rb") as handle:
            rows = [normalize_row(json.loads(line), f"{path}:{i}") for i, line in enumerate(handle, 1) if line.strip()]
        return datasets.Dataset.from_list(rows)
    raw = datasets.Dataset.from_parquet(str(path))
    raw = raw.cast_column("images", datasets.List(datasets.Image(decode=False)))
    return datasets.Dataset.from_list([normalize_row(row, f"{path}: row {i}") for i, row in enumerate(raw)])


def _peak_mb(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # KiB on Linux


def _anon_mb(pid: int | str = "self") -> float:
    """Resident anonymous memory (heap, Python objects, Arrow buffers): what a load costs. The rest of RSS
    is file pages of memory-mapped Arrow files, which the kernel drops under pressure like any page cache."""
    try:
        with open(f"/proc/{pid}/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("RssAnon:")) / 1024
    except (OSError, StopIteration):
        return 0.0


def _children() -> list[str]:
    pids = []
    for task in Path("/proc/self/task").glob("*"):
        try:
            pids += (task / "children").read_text().split()
        except OSError:
            pass
    return pids


class AnonPeak:
    """Samples the peak anonymous memory of this process and of its largest child (every 20 ms)."""

    def __init__(self) -> None:
        import threading

        self.own = self.child = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.own = max(self.own, _anon_mb())
            self.child = max([self.child, *(_anon_mb(pid) for pid in _children())])

    def __enter__(self) -> AnonPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.own = max(self.own, _anon_mb())


def child(impl: str, path: Path, cache: Path) -> None:
    """One load in this fresh process; prints seconds and peak memory as JSON."""
    print(json.dumps(load_once(impl, path, cache)))


def load_once(impl: str, path: Path, cache: Path) -> dict:
    import datasets

    from vlm_peft.data.loading import load_rows

    previous = datasets.config.HF_DATASETS_CACHE
    datasets.config.HF_DATASETS_CACHE = cache
    datasets.disable_progress_bars()
    base, base_anon = _peak_mb(resource.RUSAGE_SELF), _anon_mb()
    with AnonPeak() as anon:
        start = time.perf_counter()
        rows = load_before(path) if impl == "before" else load_rows(path)
        last = rows[len(rows) - 1]  # one row read back: the result is usable, not just built
        seconds = time.perf_counter() - start
    assert last["messages"][-1]["role"] == "assistant"
    result = {
        "seconds": seconds,
        "rows": len(rows),
        "base_mb": base,
        "peak_mb": _peak_mb(resource.RUSAGE_SELF),
        "base_anon_mb": base_anon,
        "anon_mb": anon.own,
        "workers_anon_mb": anon.child,
    }
    datasets.config.HF_DATASETS_CACHE = previous
    return result


def measure(impl: str, path: Path, cache: Path, fresh: bool = True) -> dict:
    """One load, in a fresh process (or, for --quick, in this one: its memory figures then mean nothing)."""
    if not fresh:
        return load_once(impl, path, cache)
    out = subprocess.run(
        [sys.executable, "-m", "bench.data_loading", "--child", impl, str(path), str(cache)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    if out.returncode != 0:
        raise RuntimeError(f"{impl} load of {path} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _progress(cells: tuple[str, ...]) -> None:
    print("  ".join(cells), file=sys.stderr, flush=True)


def loading_table(sizes: tuple[int, ...], before_up_to: int, tmp: Path, quick: bool = False) -> Path:
    """Prints the load table; returns the smallest parquet file (the collator reads it)."""
    print(
        "load_rows, each load in a fresh process. peak MB: the loading process's peak anonymous resident memory "
        "(heap, Python objects, Arrow buffers), + its growth over the process after imports; RSS: its peak "
        "resident set (ru_maxrss), which also counts the pages of memory-mapped Arrow files it touched (page "
        "cache the kernel can drop); workers MB: the largest `Dataset.map` worker's peak anonymous memory. "
        "after s: an empty cache; warm s: the same file again (the cache's Arrow files memory-mapped)."
    )
    header = ("format", "rows", "before s", "before peak MB", "before RSS", "after s", "after peak MB", "after RSS",
              "workers MB", "warm s")  # fmt: skip
    lines = [header]
    smallest = None
    for size in sizes:
        for fmt in ("jsonl", "parquet"):
            path = tmp / f"rows-{size}.{fmt}"
            (write_jsonl if fmt == "jsonl" else write_parquet)(path, size)
            if fmt == "parquet" and smallest is None:
                smallest = path
            cells = [fmt + (" (+PNG bytes)" if fmt == "parquet" else ""), f"{size:,}"]
            if size <= before_up_to:
                before = measure("before", path, tmp / f"cache-before-{size}-{fmt}", fresh=not quick)
                cells += [f"{before['seconds']:.1f}", _mb(before), f"{before['peak_mb']:.0f}"]
            else:
                cells += ["not run", "-", "-"]
            cache = tmp / f"cache-after-{size}-{fmt}"
            # --quick: one load in a fresh process (the path that must not rot), the others here (imports: ~8 s each)
            cold = measure("after", path, cache, fresh=not quick or fmt == "parquet")
            again = f"{measure('after', path, cache)['seconds']:.1f}" if not quick else "-"
            cells += [f"{cold['seconds']:.1f}", _mb(cold), f"{cold['peak_mb']:.0f}"]
            cells += [f"{cold['workers_anon_mb']:.0f}" if cold["workers_anon_mb"] else "-", again]
            lines.append(tuple(cells))
            _progress(cells)
            for cache_dir in tmp.glob("cache-*"):
                subprocess.run(["rm", "-rf", str(cache_dir)], check=False)
            if path != smallest:
                path.unlink()
    _table(lines)
    return smallest


def _mb(result: dict) -> str:
    return f"{result['anon_mb']:.0f} (+{result['anon_mb'] - result['base_anon_mb']:.0f})"


def _table(lines: list[tuple[str, ...]]) -> None:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    print("| " + " | ".join(c.ljust(w) for c, w in zip(lines[0], widths)) + " |")
    print("| " + " | ".join("-" * w for w in widths) + " |")
    for line in lines[1:]:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |")


def collator_table(parquet: Path, quick: bool) -> None:
    """Rows/s the collator delivers through a DataLoader, against the rows/s a training step consumes."""
    import datasets
    import torch

    from vlm_peft import VLMProcessor
    from vlm_peft.data.collator import VLMCollator
    from vlm_peft.data.loading import load_rows
    from vlm_peft.tiny import tiny_image_processor, tiny_tokenizer

    datasets.disable_progress_bars()
    batch_size = 32
    batches = 3 if quick else 40
    workers_list = (0, 1) if quick else (0, 1, 2, 4)
    rows = load_rows(parquet)
    tokenizer = tiny_tokenizer(["What is in picture 12? Answer with the colour and the shape. A red circle."] * 20)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(
        f"\ncollator (chat template, PNG decode, image processor, assistant labels) through a DataLoader, batch "
        f"{batch_size}, {batches} batches after the first; this machine has {cpus} CPU cores (shared with whatever "
        "else runs), so more than 2 workers only queue"
    )
    lines = [("image size", "workers", "rows/s", "vs the tiny step")]
    step_rows_s = None
    for size, n in ((32, 16),) if quick else ((32, 16), (224, 196)):
        processor = VLMProcessor(tiny_image_processor(size), tokenizer, num_image_tokens=n)
        collator = VLMCollator(processor, parquet.parent)
        if step_rows_s is None:  # the demo's model size (Qwen3 hidden 128, 4 layers; CLIP 64 wide, 2 layers)
            step_rows_s = _tiny_step_rows_per_s(processor, collator, rows, batch_size, 3 if quick else 6)
        for workers in workers_list:
            loader = torch.utils.data.DataLoader(
                rows, batch_size=batch_size, num_workers=workers, collate_fn=collator, shuffle=False
            )
            it = iter(loader)
            next(it)  # workers started and warm
            start = time.perf_counter()
            for _ in range(batches):
                next(it)
            rate = batches * batch_size / (time.perf_counter() - start)
            del it
            versus = f"{rate / step_rows_s:.1f}x" if size == 32 else "-"
            lines.append((f"{size} px, N={n}", str(workers), f"{rate:,.0f}", versus))
            _progress(lines[-1])
    print(
        f"\nvs the tiny step: collator rows/s over the rows/s that a training step of the demo's model size (32 px,"
        f" batch {batch_size}, forward + backward + AdamW, collation excluded) consumes here: {step_rows_s:,.0f}. "
        "The 224 px rows (CLIP-B/16 preprocessing) feed a Qwen3-0.6B + CLIP-B/16 step, which this machine has "
        "no GPU to time: compare them with `python -m bench.gpu`'s samples/s on the GPU that trains."
    )
    _table(lines)


def _tiny_step_rows_per_s(processor, collator, rows, batch_size: int, repeats: int) -> float:
    import torch

    from vlm_peft import VLMConfig, attach
    from vlm_peft.tiny import tiny_clip_config, tiny_qwen3

    torch.manual_seed(0)
    llm = tiny_qwen3(
        len(processor.tokenizer), hidden_size=128, layers=4, intermediate_size=256, head_dim=32
    )  # the demo recipe's LLM
    cfg = VLMConfig(
        vision_config=tiny_clip_config(32, 8, 64),
        num_image_tokens=16,
        projector_heads=4,
        projector_dropout=0.0,
        image_token_id=processor.image_token_id,
    )
    model = attach(llm, cfg).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = collator([rows[i] for i in range(batch_size)])
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - start)
    return batch_size / statistics.median(times[1:])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="toy sizes (CI)")
    parser.add_argument("--sizes", type=int, nargs="+", help=f"rows per file (default {SIZES})")
    parser.add_argument("--before-up-to", type=int, default=BEFORE_UP_TO, help="largest size the old loader runs at")
    parser.add_argument("--no-collator", action="store_true", help="the load table only")
    parser.add_argument("--child", nargs=3, metavar=("IMPL", "PATH", "CACHE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        impl, path, cache = args.child
        child(impl, Path(path), Path(cache))
        return
    sizes = tuple(args.sizes or (QUICK_SIZES if args.quick else SIZES))
    with tempfile.TemporaryDirectory(prefix="vlm-peft-bench-data-") as tmp:
        parquet = loading_table(sizes, args.before_up_to, Path(tmp), quick=args.quick)
        if not args.no_collator:
            collator_table(parquet, args.quick)


if __name__ == "__main__":
    main()
