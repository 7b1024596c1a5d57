"""Convert the dataset formats people have into the canonical format (see README, "Datasets").

Sources (`fmt`, autodetected from the file's content when "auto"):

- `minimind`: MiniMind-V JSONL,
  `{"conversations": [{"role": "user", "content": "…<image>"}, …], "image": "a.jpg, b.jpg"}`: comma-separated
  names under the image root; a turn without a role takes its place (user, assistant, user, …).
  `minimind-parquet`: its parquet form, `conversations` a JSON string of that list and `image_bytes` one blob or a
  list of blobs (embedded in the output).
- `llava`: LLaVA JSON (a list) or JSONL, `{"id", "image": "x.jpg" | [...], "conversations": [{"from": "human",
  "value": "<image>\\n…"}, {"from": "gpt", "value": "…"}]}`; no `image` for text-only rows. ShareGPT rows
  (`conversations` of `{from, value}` plus `images`, optional top-level `system`) read the same way.
- `messages`: `{"messages": [{"role", "content": str | [parts]}], "images": [...]}`; string content has `<image>`
  markers, part lists have `{"type": "text"}`, `{"type": "image"}` (the next entry of `images`), an inline
  `{"type": "image", "image" | "path" | "url": …}` or OpenAI's `{"type": "image_url", "image_url": {"url": …}}`
  (a local path, `file://` or a `data:image/…;base64,` URL, whose bytes are embedded).
- `captions`: a folder of images with same-stem `.txt` captions, or a CSV/TSV/JSONL/parquet of `image,caption`
  pairs, turned into align-stage rows: user = [image, a prompt drawn from a pool], assistant = the caption.

Each `<image>` marker becomes an image part in place (the text around it kept, one newline right after a marker
dropped, as in LLaVA's "<image>\\n"). A row that cannot be converted as it is (marker count differs from image
count, unknown role, no final assistant answer, a remote image, …) is not repaired: it is skipped, counted under a
reason, logged, and listed with the reason in `x.rejects.jsonl` beside the output `x.parquet` or dir `x`.

Images stay references: a path relative to the output's folder (the default image root when training on it) when
the image lies under it, else an absolute path; or embedded bytes `{"bytes": …, "path": None}` where the source
embeds them. The output (`.parquet` → one parquet file, anything else → a `save_to_disk` dir) loads with
`vlm_peft.data.rows.load_rows`.

    python -m data_tools.convert llava_v1_5_mix665k.json data/llava.parquet --image-root data/images
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import shutil
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
from datasets.table import InMemoryTable
from tqdm.auto import tqdm

from vlm_peft.data.rows import MESSAGES, WHERE, normalize_row

from .formats import CONVERTERS, FORMATS
from .formats.captions import load_prompts
from .formats.common import Context, Reject
from .sources import detect_format, read_rows

__all__ = ["FORMATS", "convert", "detect_format", "main", "rejects_path"]

log = logging.getLogger(__name__)

CHUNK = 2000  # rows per conversion chunk (and per worker task with num_proc)
MAX_LOGGED_REJECTS = 20
MISSING_SAMPLE_ROWS = 200  # rows whose image paths are looked for on disk after converting

# Images are a plain {bytes, path} struct, not a `datasets.Image` feature: `save_to_disk` embeds the files of
# Image columns (reading relative paths from the current dir), and path references must stay references.
# `load_rows` casts the column to `Image(decode=False)` when it reads the output.
FEATURES = datasets.Features(
    {
        "messages": MESSAGES,
        "images": datasets.List({"bytes": datasets.Value("binary"), "path": datasets.Value("string")}),
        "tools": datasets.Value("string"),
    }
)
SCHEMA = FEATURES.arrow_schema


def _json_safe(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        return f"<{len(value)} bytes>"
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _convert_chunk(args: tuple[Context, list[tuple[int, str, Any]]]) -> tuple[pa.Table, list[dict[str, Any]]]:
    """Convert (index, where, raw row) triples: the canonical rows as an Arrow table, and the rejects."""
    ctx, items = args
    convert_row = CONVERTERS[ctx.fmt]
    rows, rejects = [], []
    for index, where, raw in items:
        try:
            if isinstance(raw, str):  # a JSONL line
                try:
                    raw = json.loads(raw)
                except json.JSONDecodeError as err:
                    raise Reject("bad_json", f"not valid JSON: {err}") from None
            if not isinstance(raw, dict):
                raise Reject("bad_row", f"a row must be an object, got {type(raw).__name__}.")
            try:  # the canonical reader's own check and form (tool calls, tools as JSON): the output must load
                row = normalize_row(convert_row(raw, index, ctx), where)
            except ValueError as err:
                raise Reject("invalid", str(err)) from None
            row.pop(WHERE)
            rows.append(row)
        except Reject as err:
            rejects.append({"where": where, "reason": err.reason, "message": str(err), "row": _json_safe(raw)})
    return pa.Table.from_pylist(rows, schema=SCHEMA), rejects


def _chunks(items: Iterable[tuple[str, Any]], ctx: Context) -> Iterator[tuple[Context, list[tuple[int, str, Any]]]]:
    chunk: list[tuple[int, str, Any]] = []
    for index, (where, raw) in enumerate(items):
        chunk.append((index, where, raw))
        if len(chunk) == CHUNK:
            yield ctx, chunk
            chunk = []
    if chunk:
        yield ctx, chunk


def rejects_path(out: str | os.PathLike[str]) -> Path:
    """Where `convert` lists the skipped rows: `x.parquet` → `x.rejects.jsonl`, dir `x` → `x.rejects.jsonl`."""
    out = Path(out)
    return out.with_name(f"{out.stem if out.suffix == '.parquet' else out.name}.rejects.jsonl")


def _check_output(source: Path, out: Path) -> None:
    if out.suffix.lower() in (".json", ".jsonl", ".csv", ".tsv", ".arrow"):
        raise ValueError(f"{out}: the output is a .parquet file or a dir (save_to_disk), not {out.suffix}.")
    if os.path.abspath(out) == os.path.abspath(source):
        raise ValueError(f"{out}: the output would overwrite the source.")
    if out.suffix != ".parquet" and out.exists():
        if not out.is_dir():
            raise ValueError(f"{out}: exists and is not a dir.")
        if any(out.iterdir()) and not (out / "state.json").is_file():
            raise ValueError(f"{out}: exists, is not empty and is not a saved dataset; not overwriting it.")


def convert(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    fmt: str = "auto",
    image_root: str | os.PathLike[str] | None = None,
    prompts: str | os.PathLike[str] | Sequence[str] | None = None,
    seed: int = 0,
    num_proc: int | None = None,
) -> dict[str, Any]:
    """Convert `source` to canonical rows in `out` (`.parquet` → one parquet file, else a `save_to_disk` dir).

    `image_root` is where the source's relative image names resolve (default: the source file's folder, or the
    folder itself for a captions folder). `prompts` (a list, or a file with one per line or a JSON list) and
    `seed` choose the caption prompts. Returns `{"rows": written, "skipped": n, "reasons": {reason: n},
    "rejects": path of the rejects list or None}`.
    """
    source, out = Path(source), Path(out)
    if not source.exists():
        raise FileNotFoundError(f"source {source} not found.")
    if fmt == "auto":
        fmt = detect_format(source)
        log.info("%s: detected format %s", source, fmt)
    elif fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; one of {('auto', *FORMATS)}.")
    _check_output(source, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image_root_given = image_root is not None
    if image_root is None:
        image_root = source if source.is_dir() else source.parent
    ctx = Context(
        fmt=fmt,
        image_root=os.path.abspath(image_root),
        out_root=os.path.abspath(out.parent),
        prompts=load_prompts(prompts) if fmt == "captions" else (),
        seed=seed,
    )

    start = time.perf_counter()
    tables: list[pa.Table] = []
    reasons: dict[str, int] = {}
    skipped = 0
    reject_file = rejects_path(out)
    tmp_rejects = reject_file.with_name(f".{reject_file.name}.tmp")
    pool = multiprocessing.Pool(num_proc) if num_proc and num_proc > 1 else None
    try:
        with (
            tmp_rejects.open("w", encoding="utf-8") as rejects,
            tqdm(desc=f"converting {source.name}", unit=" rows", disable=None) as bar,
        ):
            chunks = _chunks(read_rows(source), ctx)
            results = pool.imap(_convert_chunk, chunks) if pool else map(_convert_chunk, chunks)
            for table, chunk_rejects in results:
                tables.append(table)
                for reject in chunk_rejects:
                    skipped += 1
                    reasons[reject["reason"]] = reasons.get(reject["reason"], 0) + 1
                    rejects.write(json.dumps(reject, ensure_ascii=False) + "\n")
                    if skipped <= MAX_LOGGED_REJECTS:
                        log.warning("skipped %s: %s: %s", reject["where"], reject["reason"], reject["message"])
                    elif skipped == MAX_LOGGED_REJECTS + 1:
                        log.warning("more rows skipped; all are listed in %s", reject_file)
                bar.update(table.num_rows + len(chunk_rejects))
    except BaseException:
        tmp_rejects.unlink(missing_ok=True)
        raise
    finally:
        if pool is not None:
            pool.terminate()
    if skipped:
        os.replace(tmp_rejects, reject_file)
    else:
        tmp_rejects.unlink()
        reject_file.unlink(missing_ok=True)  # stale, from an earlier run into the same output

    n_rows = sum(t.num_rows for t in tables)
    counts = {
        "rows": n_rows,
        "skipped": skipped,
        "reasons": dict(sorted(reasons.items())),
        "rejects": str(reject_file) if skipped else None,
    }
    if not n_rows:
        raise ValueError(f"{source}: no row converted as {fmt} ({counts}).")
    table = pa.concat_tables(tables)
    _warn_missing_images(table, out.parent, ctx.image_root, image_root_given)
    dataset = datasets.Dataset(InMemoryTable(table), info=datasets.DatasetInfo(features=FEATURES))
    _write(dataset, out)
    elapsed = time.perf_counter() - start
    log.info(
        "%s (%s) -> %s: %d rows written, %d skipped%s in %.1fs (%.0f rows/s)",
        source, fmt, out, n_rows, skipped, f" {counts['reasons']}" if skipped else "", elapsed,
        (n_rows + skipped) / max(elapsed, 1e-9),
    )  # fmt: skip
    return counts


def _warn_missing_images(table: pa.Table, out_root: Path, image_root: str, given: bool) -> None:
    """Look for a sample of the referenced image files now: a wrong image root otherwise shows only
    later, as every row failing `check` (or training) with a missing image."""
    paths = []
    for images in table.column("images").slice(0, MISSING_SAMPLE_ROWS).to_pylist():
        paths += [ref["path"] for ref in images or [] if not ref.get("bytes") and ref.get("path")]
    missing = [p for p in paths if not (out_root / p).exists()]  # relative paths are relative to the output
    if missing:
        hint = "check --image-root" if given else "pass --image-root DIR (the folder the source's image names are in)"
        log.warning(
            "WARNING: %d of %d image paths sampled from the first %d rows do not exist (e.g. %s); relative image "
            "names were resolved under %s: %s.",
            len(missing), len(paths), min(MISSING_SAMPLE_ROWS, table.num_rows), out_root / missing[0], image_root,
            hint,
        )  # fmt: skip


def _write(dataset: datasets.Dataset, out: Path) -> None:
    """Write atomically: under a temporary name, renamed when complete."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.is_dir():
        shutil.rmtree(tmp)
    if out.suffix == ".parquet":
        dataset.to_parquet(str(tmp))
        os.replace(tmp, out)
        return
    dataset.save_to_disk(str(tmp))
    if out.exists():  # an empty dir or a saved dataset (checked before converting)
        shutil.rmtree(out)
    os.replace(tmp, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_tools.convert",
        description="Convert MiniMind-V, LLaVA, messages/ShareGPT/OpenAI or caption data to the canonical format.",
    )
    parser.add_argument("source", type=Path, help="source file (json, jsonl, parquet, csv) or caption folder")
    parser.add_argument("out", type=Path, help="output: a .parquet file, or else a save_to_disk dir")
    parser.add_argument("--format", default="auto", choices=("auto", *FORMATS), help="source format (auto: detect)")
    parser.add_argument("--image-root", type=Path, help="where relative image names resolve (default: the source's)")
    parser.add_argument("--prompts", type=Path, help="caption prompt pool: one prompt per line, or a JSON list")
    parser.add_argument("--seed", type=int, default=0, help="seed of the caption prompt choice")
    parser.add_argument("--num-proc", type=int, help="worker processes")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        counts = convert(
            args.source,
            args.out,
            fmt=args.format,
            image_root=args.image_root,
            prompts=args.prompts,
            seed=args.seed,
            num_proc=args.num_proc,
        )
    except (ValueError, FileNotFoundError) as err:
        log.error("error: %s", err)
        return 1
    log.info("counts: %s", json.dumps(counts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
