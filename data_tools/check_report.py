"""What `data_tools.check` finds: the kinds of problem, one `Problem` each, and the `Report` of a whole dataset
(summary table, bad-rows JSONL)."""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from vlm_peft.atomic import write_text

KINDS = (
    "bad_row",
    "image_missing",
    "image_unreadable",
    "image_truncated",
    "image_empty",
    "image_aspect",
    "image_too_large",
    "image_count",
    "no_answer",
    "role_order",
    "too_long",
)


@dataclass(frozen=True)
class Problem:
    index: int  # position of the row in the dataset (0-based, blank JSONL lines not counted)
    origin: str  # file and line (or row) of the row, as training errors name it
    kind: str
    detail: str  # names the field or file and says how to fix it


@dataclass
class Report:
    path: str
    fmt: str
    image_root: str
    total: int = 0
    problems: list[Problem] = field(default_factory=list)
    max_length: int | None = None
    longest: tuple[int, int] | None = None  # (tokens, row index) when a processor was given
    seconds: float = 0.0

    @property
    def counts(self) -> dict[str, int]:
        """Problems per kind (every kind, zeros included)."""
        have = Counter(p.kind for p in self.problems)
        return {kind: have[kind] for kind in KINDS}

    @property
    def row_counts(self) -> dict[str, int]:
        """Rows with at least one problem of each kind."""
        have = Counter(kind for kind, _ in {(p.kind, p.index) for p in self.problems})
        return {kind: have[kind] for kind in KINDS}

    @property
    def bad_rows(self) -> list[int]:
        return sorted({p.index for p in self.problems})

    @property
    def num_bad(self) -> int:
        return len({p.index for p in self.problems})

    @property
    def clean(self) -> bool:
        return self.total > 0 and not self.problems

    def by_row(self) -> dict[int, list[Problem]]:
        rows: dict[int, list[Problem]] = {}
        for p in sorted(self.problems, key=lambda p: p.index):
            rows.setdefault(p.index, []).append(p)
        return rows

    def summary_table(self) -> str:
        rows_by_kind, problems_by_kind = self.row_counts, self.counts
        width = max(len(k) for k in KINDS)
        lines = [f"{'kind':<{width}}  {'rows':>8}  {'problems':>8}", f"{'-' * width}  {'-' * 8}  {'-' * 8}"]
        lines += [f"{k:<{width}}  {rows_by_kind[k]:>8}  {problems_by_kind[k]:>8}" for k in KINDS]
        lines.append(f"{'-' * width}  {'-' * 8}  {'-' * 8}")
        share = f" ({100 * self.num_bad / self.total:.1f}%)" if self.total else ""
        lines.append(f"{'bad rows':<{width}}  {self.num_bad:>8}  {len(self.problems):>8}{share}")
        lines.append(f"{'total rows':<{width}}  {self.total:>8}")
        if self.longest is not None:
            limit = f" (max_length {self.max_length})" if self.max_length else ""
            lines.append(f"longest row: {self.longest[0]} tokens, row {self.longest[1]}{limit}")
        if self.total == 0:
            lines.append("the dataset is empty.")
        return "\n".join(lines)

    def write_bad_rows(self, path: str | os.PathLike[str]) -> Path:
        """One JSON line per bad row: index, origin and its problems ({kind, detail}), in dataset order."""
        lines = []
        for index, problems in self.by_row().items():
            record = {
                "index": index,
                "origin": problems[0].origin,
                "problems": [{"kind": p.kind, "detail": p.detail} for p in problems],
            }
            lines.append(json.dumps(record, ensure_ascii=False) + "\n")
        return write_text(path, "".join(lines))  # a link at `path` is replaced, never written through
