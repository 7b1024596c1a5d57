"""Validate a canonical dataset before a GPU hour is spent on it.

Every row is checked, and every problem found is collected (a row can have several):

    bad_row           the row is not in the canonical format (invalid JSON, no messages, unknown role, ...)
    image_missing     an image file does not exist
    image_unreadable  an image file is not an image PIL can identify
    image_truncated   an image's pixel data cannot be decoded (truncated or corrupt file)
    image_empty       a zero-byte image file, or an image with a zero-sized dimension
    image_aspect      max(w, h) / min(w, h) > max_aspect
    image_too_large   w * h > max_pixels (read from the header: the pixels are never decoded for this)
    image_count       the number of image parts differs from the number of `images` entries
    no_answer         the last message is not an assistant turn, or its text is empty
    role_order        the first non-system turn is not the user's, two user (or two assistant) turns in a
                      row, or a tool result that does not follow an assistant turn (or another tool result)
    too_long          with a processor and max_length: the rendered conversation, image runs expanded, is
                      longer than max_length; the detail says whether truncation would cut an image run or
                      the whole answer (training drops both, see vlm_peft.data.rows.fit_to_length) or only
                      the end of the answer

    python -m data_tools.check data/train.jsonl --processor runs/adapter --max-length 2048 --fix data/clean.parquet

prints a summary table, writes the bad rows (one JSON line each, with every problem and how to fix it)
to `<stem>.bad.jsonl` next to the data, and with `--fix` writes the dataset without the bad rows. The
exit code is 0 for a clean dataset, 1 when problems were found, 2 for usage errors (including a dataset
that cannot be read at all).
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import shutil
import sys
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
from PIL import Image
from tqdm.auto import tqdm

from vlm_peft.data.rows import MESSAGES, WHERE, check_tool_columns, normalize_row

from .check_report import KINDS, Problem, Report
from .check_rows import RowChecker, Unparsable

__all__ = ["KINDS", "Problem", "Report", "check_dataset", "fix", "main"]

log = logging.getLogger(__name__)

CHUNK_ROWS = 256  # rows per unit of work: one batched render + tokenize, one task for a worker
SUFFIXES = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}


# --- reading rows ------------------------------------------------------------------------------


def _format(path: Path, fmt: str) -> str:
    if not path.exists():
        raise FileNotFoundError(f"dataset {path} not found.")
    if fmt == "auto":
        fmt = "arrow" if path.is_dir() else SUFFIXES.get(path.suffix, "")
        if not fmt:
            raise ValueError(f"{path}: unknown suffix; pass fmt (--format) as one of jsonl, json, parquet, arrow.")
    if fmt not in ("jsonl", "json", "parquet", "arrow"):
        raise ValueError(f"unknown format {fmt!r}; use one of jsonl, json, parquet, arrow.")
    return fmt


def _open_table(path: Path, fmt: str) -> datasets.Dataset:
    raw = datasets.load_from_disk(str(path)) if fmt == "arrow" else datasets.Dataset.from_parquet(str(path))
    if not isinstance(raw, datasets.Dataset):
        raise ValueError(f"{path}: holds a DatasetDict ({list(raw)}); point at one split's dir.")
    if "messages" not in raw.column_names:
        raise ValueError(f"{path}: no 'messages' column (columns: {raw.column_names}).")
    check_tool_columns(raw.features, str(path))
    if "images" in raw.column_names:
        try:  # as load_rows does: datasets.Image columns as {"bytes", "path"}, never decoded here
            raw = raw.cast_column("images", datasets.List(datasets.Image(decode=False)))
        except Exception as err:  # noqa: BLE001 - the rows' images are then checked one by one
            log.warning(
                "%s: the 'images' column cannot be read as images (%s); checking its entries as they are.", path, err
            )
    return raw


def _count_rows(path: Path, fmt: str) -> int | None:
    if fmt == "jsonl":
        with path.open("rb") as handle:
            return sum(1 for line in handle if line.strip())
    return None


def _raw_rows(path: Path, fmt: str, table: datasets.Dataset | None = None) -> Iterator[tuple[str, Any]]:
    """(origin, raw row) in dataset order; a JSONL line that cannot be parsed comes as `Unparsable`."""
    if fmt == "jsonl":
        with path.open("rb") as handle:  # bytes: one undecodable line must not stop the whole check
            for line_no, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                where = f"{path}:{line_no}"
                try:
                    yield where, json.loads(line.decode("utf-8"))
                except UnicodeDecodeError as err:
                    yield where, Unparsable(f"line is not UTF-8 ({err})")
                except json.JSONDecodeError as err:
                    yield where, Unparsable(f"not valid JSON ({err})")
    elif fmt == "json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: not valid JSON ({err}); a .json dataset is one list of rows.") from err
        if not isinstance(data, list):
            raise ValueError(f"{path}: a .json dataset must hold a list of rows.")
        yield from ((f"{path}: row {i}", row) for i, row in enumerate(data))
    else:
        table = _open_table(path, fmt) if table is None else table
        i = 0
        for batch in table.iter(batch_size=1000):
            columns = list(batch)
            for k in range(len(batch[columns[0]])):
                yield f"{path}: row {i}", {c: batch[c][k] for c in columns}
                i += 1


def _chunks(rows: Iterator[tuple[str, Any]], size: int) -> Iterator[list[tuple[int, str, Any]]]:
    chunk: list[tuple[int, str, Any]] = []
    for index, (where, raw) in enumerate(rows):
        chunk.append((index, where, raw))
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# --- checking a dataset --------------------------------------------------------------------

_WORKER: RowChecker | None = None


def _init_worker(checker: RowChecker) -> None:
    global _WORKER
    _WORKER = checker
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the processes are the parallelism


def _check_in_worker(chunk: list[tuple[int, str, Any]]) -> tuple[list[Problem], list[tuple[int, int]]]:
    assert _WORKER is not None
    return _WORKER.check(chunk)


def _longest_first(measured: tuple[int, int]) -> tuple[int, int]:
    return measured[0], -measured[1]  # the most tokens; among ties, the first row


def _default_image_root(path: Path) -> Path:
    """As training resolves it: the data file's folder (for a saved dataset dir, the folder holding it)."""
    return path.resolve().parent


def check_dataset(
    path: str | os.PathLike[str],
    *,
    image_root: str | os.PathLike[str] | None = None,
    processor: Any = None,
    max_length: int | None = None,
    fmt: str = "auto",
    max_aspect: float = 20.0,
    max_pixels: int | None = None,
    num_proc: int | None = None,
    progress: bool = True,
) -> Report:
    """Check every row of a canonical dataset (see the module doc for the kinds of problems).

    `image_root`: where relative image paths live (default: the data file's folder, as in training).
    `processor` + `max_length`: also count each conversation's tokens, image runs expanded, as training
    renders it. `max_pixels` defaults to PIL's `Image.MAX_IMAGE_PIXELS` (a limit above it passes images
    that PIL will warn about, or refuse beyond twice it, at training time). `num_proc` > 1 checks
    chunks of rows in that many processes. Raises (FileNotFoundError, ValueError) only when the
    dataset cannot be read at all.
    """
    start_time = time.perf_counter()
    path = Path(path)
    fmt = _format(path, fmt)
    if max_length is not None and processor is None:
        raise ValueError("max_length needs a processor to count tokens with.")
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}.")
    if max_aspect < 1:
        raise ValueError(f"max_aspect must be >= 1, got {max_aspect}.")
    root = Path(image_root).resolve() if image_root is not None else _default_image_root(path)
    pil_limit = Image.MAX_IMAGE_PIXELS
    checker = RowChecker(
        root, max_aspect, pil_limit if max_pixels is None else max_pixels, processor, max_length, pil_limit
    )
    report = Report(str(path), fmt, str(root), max_length=max_length)
    table = _open_table(path, fmt) if fmt in ("parquet", "arrow") else None
    total = len(table) if table is not None else _count_rows(path, fmt)
    rows = _raw_rows(path, fmt, table)
    measured: list[tuple[int, int]] = []
    bar = tqdm(total=total, unit="row", desc=f"checking {path.name}", disable=not progress, dynamic_ncols=True)

    def collect(result: tuple[list[Problem], list[tuple[int, int]]], n: int) -> None:
        report.problems.extend(result[0])
        if result[1]:
            measured.append(max(result[1], key=_longest_first))
        report.total += n
        bar.update(n)

    with bar:
        if not num_proc or num_proc <= 1:
            for chunk in _chunks(rows, CHUNK_ROWS):
                collect(checker.check(chunk), len(chunk))
        else:
            # Bounded in flight, so that a dataset of embedded images is never all in memory at once.
            with multiprocessing.get_context().Pool(num_proc, _init_worker, (checker,)) as pool:
                pending: deque[tuple[Any, int]] = deque()
                for chunk in _chunks(rows, CHUNK_ROWS):
                    pending.append((pool.apply_async(_check_in_worker, (chunk,)), len(chunk)))
                    while len(pending) >= 2 * num_proc:
                        task, n = pending.popleft()
                        collect(task.get(), n)
                while pending:
                    task, n = pending.popleft()
                    collect(task.get(), n)
    report.problems.sort(key=lambda p: (p.index, KINDS.index(p.kind)))
    if measured:
        report.longest = max(measured, key=_longest_first)
    report.seconds = time.perf_counter() - start_time
    return report


# --- writing a cleaned dataset -------------------------------------------------------------


def fix(
    path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    report: Report,
    *,
    image_root: str | os.PathLike[str] | None = None,
) -> tuple[int, int]:
    """Write the dataset without the report's bad rows, in canonical form; returns (dropped, kept).

    `out` ending in .parquet gets a parquet file, anything else a `save_to_disk` dir; both load with
    `vlm_peft.data.rows.load_rows`. Relative image paths are rewritten to absolute ones when `out`'s folder
    (the image root training defaults to) is not the image root the check used.
    """
    path, out = Path(path), Path(out)
    if out.resolve() == path.resolve():
        raise ValueError(f"{out}: write the cleaned dataset to a new path, not over the data it is read from.")
    if out.is_dir() and any(out.iterdir()) and not (out / "state.json").is_file():
        raise ValueError(f"{out} is a non-empty dir that is not a saved dataset; pick another path.")
    fmt = _format(path, report.fmt)
    root = Path(image_root or report.image_root).resolve()
    absolute = _default_image_root(out) != root
    bad = set(report.bad_rows)
    kept: list[dict[str, Any]] = []
    seen = 0
    for index, (where, raw) in enumerate(_raw_rows(path, fmt)):
        seen += 1
        if index in bad:
            continue
        row = normalize_row(raw, where)
        row.pop(WHERE)
        if absolute:
            row["images"] = [_absolute(ref, root) for ref in row["images"]]
        kept.append(row)
    if seen != report.total:
        raise ValueError(
            f"{path} has {seen} rows but the report counted {report.total}; it changed since the check, check it again."
        )
    if not kept:
        raise ValueError(f"{path}: every row has problems; nothing to write.")
    images: Any = datasets.List(datasets.Value("string"))
    if not all(isinstance(ref, str) for row in kept for ref in row["images"]):
        images = datasets.List(datasets.Image(decode=False))
        for row in kept:
            row["images"] = [
                {"bytes": None, "path": r} if isinstance(r, str) else _image_dict(r) for r in row["images"]
            ]
    features = datasets.Features({"messages": MESSAGES, "images": images, "tools": datasets.Value("string")})
    table = datasets.Dataset.from_list(kept, features=features)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    if out.suffix == ".parquet":
        table.to_parquet(str(tmp))
        os.replace(tmp, out)
    else:
        table.save_to_disk(str(tmp))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    if absolute and any(row["images"] for row in kept):
        log.info("relative image paths were made absolute (image root %s).", root)
    return len(bad), len(kept)


def _absolute(ref: Any, root: Path) -> Any:
    if isinstance(ref, str):
        return ref if Path(ref).is_absolute() else str(root / ref)
    if isinstance(ref, dict) and not ref.get("bytes") and ref.get("path") and not Path(ref["path"]).is_absolute():
        return {**ref, "path": str(root / ref["path"])}
    return ref


def _image_dict(ref: dict[str, Any]) -> dict[str, Any]:
    return {"bytes": ref.get("bytes"), "path": ref.get("path")}


# --- command line --------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data_tools.check",
        description="Check every row of a canonical dataset (structure, images, roles, answers, token length).",
    )
    parser.add_argument("data", type=Path, help="dataset: .jsonl, .json, .parquet, or a save_to_disk dir")
    parser.add_argument("--format", default="auto", choices=["auto", "jsonl", "json", "parquet", "arrow"])
    parser.add_argument("--image-root", type=Path, help="folder of relative image paths (default: the data's folder)")
    parser.add_argument("--processor", type=Path, help="a saved VLMProcessor (e.g. an adapter dir), for token lengths")
    parser.add_argument("--max-length", type=int, help="flag rows longer than this many tokens (needs --processor)")
    parser.add_argument("--max-aspect", type=float, default=20.0, help="largest allowed max(w,h)/min(w,h)")
    parser.add_argument("--max-pixels", type=int, help="largest allowed w*h (default: PIL's MAX_IMAGE_PIXELS)")
    parser.add_argument("--bad-rows", type=Path, help="where to write the bad rows (default: <stem>.bad.jsonl)")
    parser.add_argument(
        "--fix", type=Path, metavar="OUT", help="write the dataset without the bad rows (.parquet or dir)"
    )
    parser.add_argument("--num-proc", type=int, help="check in this many processes")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        if args.max_length is not None and args.processor is None:
            parser.error("--max-length needs --processor to count tokens.")
        if args.max_length is not None and args.max_length < 1:
            parser.error("--max-length must be >= 1.")
        if args.num_proc is not None and args.num_proc < 1:
            parser.error("--num-proc must be >= 1.")
    except SystemExit as exit_:
        return int(exit_.code or 0)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    processor = None
    if args.processor is not None:
        from vlm_peft import VLMProcessor

        try:
            processor = VLMProcessor.from_pretrained(str(args.processor))
        except Exception as err:  # noqa: BLE001
            print(f"error: cannot load a VLMProcessor from {args.processor}: {err}", file=sys.stderr)
            return 2
    try:
        report = check_dataset(
            args.data,
            image_root=args.image_root,
            processor=processor,
            max_length=args.max_length,
            fmt=args.format,
            max_aspect=args.max_aspect,
            max_pixels=args.max_pixels,
            num_proc=args.num_proc,
            progress=not args.quiet,
        )
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report.summary_table())
    rate = report.total / report.seconds if report.seconds else 0.0
    print(f"checked {report.total} rows in {report.seconds:.1f}s ({rate:.0f} rows/s)")
    bad_rows = args.bad_rows or args.data.with_name(f"{args.data.stem}.bad.jsonl")
    if report.problems or bad_rows.exists():  # an old list of bad rows must not outlive a clean check
        report.write_bad_rows(bad_rows)
        print(f"{report.num_bad} bad rows ({len(report.problems)} problems) written to {bad_rows}")
    if args.fix is not None:
        try:
            dropped, kept = fix(args.data, args.fix, report, image_root=report.image_root)
        except (OSError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        print(f"wrote {args.fix}: dropped {dropped} bad rows, kept {kept}")
    return 0 if report.clean else 1


if __name__ == "__main__":
    sys.exit(main())
