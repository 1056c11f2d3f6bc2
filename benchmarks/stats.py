"""Progress lines and the text tables; timing and percentiles are the library's (``channel_registry.timing``)."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field

_START = time.perf_counter()


def progress(message: str) -> None:
    """One line per step on stderr, with the seconds since the run started."""
    print(f"[{time.perf_counter() - _START:6.1f}s] {message}", file=sys.stderr, flush=True)


def ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if math.isnan(value):
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.1f}"
    return f"{value:.{digits}f}"


@dataclass
class Verdict:
    """One acceptance point of the issue: what was required, what was measured."""

    text: str
    met: bool | None  # None: could not be decided (not measured)
    detail: str = ""


@dataclass
class Table:
    """One target's results: rows of cells, verdicts, and raw data for the JSON file."""

    key: str
    title: str
    columns: list[str]
    rows: list[list] = field(default_factory=list)
    verdicts: list[Verdict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    data: dict = field(default_factory=dict)

    def add(self, *cells) -> None:
        self.rows.append(list(cells))

    def check(self, text: str, met: bool | None, detail: str = "") -> None:
        self.verdicts.append(Verdict(text, met, detail))

    def render(self) -> str:
        cells = [[fmt(c) for c in row] for row in self.rows]
        widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(self.columns)]
        line = "  ".join("-" * w for w in widths)

        def row_text(row):
            first = row[0].ljust(widths[0])
            return "  ".join([first, *(c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True))])

        out = [f"== {self.title}", row_text(self.columns), line, *(row_text(r) for r in cells)]
        for verdict in self.verdicts:
            mark = {True: "MET    ", False: "NOT MET", None: "n/a    "}[verdict.met]
            out.append(f"  [{mark}] {verdict.text}" + (f" — {verdict.detail}" if verdict.detail else ""))
        out.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(out)

    def as_json(self) -> dict:
        return {
            "title": self.title,
            "columns": self.columns,
            "rows": [[None if isinstance(c, float) and math.isnan(c) else c for c in row] for row in self.rows],
            "verdicts": [{"text": v.text, "met": v.met, "detail": v.detail} for v in self.verdicts],
            "notes": self.notes,
            "data": self.data,
        }
