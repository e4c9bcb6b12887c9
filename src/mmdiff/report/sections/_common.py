"""The pieces every report section is made of, the reader that builds them and the guard around them.

A section never crashes the report: a stage that did not run gives `status="not run"` and a note,
a file that cannot be read or lacks columns gives a visible warning. Figures are embedded as base64
PNG data URIs so the report is one self-contained file; the PNGs themselves stay beside it.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd

from mmdiff.schema import Artifact

NOT_RUN = "not run"
OK = "ok"


@dataclass
class Figure:
    """One embedded image: a data: URI (base64 only, so it needs no escaping) and its caption."""

    title: str
    uri: str
    caption: str = ""


@dataclass
class Link:
    """A cell that links somewhere relative to the report (a feature dashboard)."""

    text: str
    href: str


@dataclass
class Table:
    """A small table already formatted for display: every cell a str or a `Link`."""

    title: str
    columns: list[str]
    rows: list[list[Any]]
    caption: str = ""
    total_rows: int | None = None  # rows in the source, when only the first ones are shown
    constant: list[tuple[str, str]] = field(default_factory=list)  # dropped columns, one value each


COLLAPSE_ROWS = 8  # a table with more rows starts collapsed (<details>), with a filter box


def drop_constant(table: Table, min_rows: int = 3) -> Table:
    """The table without the columns (but the first) that hold one value in every row, each named
    once in `constant`: printing "step 234" in 20 rows says nothing the caption cannot."""
    if len(table.rows) < min_rows or len(table.columns) <= 2:
        return table
    keep = [0] + [
        j for j in range(1, len(table.columns)) if len({str(r[j]) for r in table.rows}) > 1
    ]
    if len(keep) == len(table.columns) or len(keep) < 2:
        return table
    dropped = [(table.columns[j], str(table.rows[0][j])) for j in range(len(table.columns)) if j not in keep]
    return Table(
        table.title,
        [table.columns[j] for j in keep],
        [[r[j] for j in keep] for r in table.rows],
        table.caption,
        table.total_rows,
        table.constant + dropped,
    )


@dataclass
class Block:
    """A titled group inside a section (one task, one intervention family, ...)."""

    title: str
    notes: list[str] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    pre: str | None = None  # preformatted text (the resolved config)


@dataclass
class Section:
    """One numbered part of the report."""

    id: str
    title: str
    status: str = OK  # OK or NOT_RUN
    intro: str = ""
    reading: str = ""  # the two-line reading under the title: the answer, and how to read the figure
    short: str = ""  # the title in the top bar
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    blocks: list[Block] = field(default_factory=list)

    def warn(self, message: str) -> None:
        self.warnings.append(message)


def rel(path: Path, run_dir: Path) -> str:
    """A path as the reader sees it: relative to the run directory."""
    try:
        return str(path.relative_to(run_dir))
    except ValueError:
        return str(path)


def read(artifact: Artifact, run_dir: Path, section: Section, **fields: Any) -> pd.DataFrame | None:
    """The artifact's table in `run_dir` (through its schema's one tolerant reader), or None: with
    a warning on `section` when the file exists but cannot be used, silently when it is missing
    (the caller decides what a stage that did not run means)."""
    loaded = artifact.read(run_dir, **fields)
    if loaded.table is None and loaded.exists:
        section.warn(loaded.why)
    return loaded.table


T = TypeVar("T")


def guarded(compute: Callable[[], T], fallback: Callable[[str], T]) -> T:
    """`compute()`, or `fallback(why)` when it raises: one malformed artifact costs only the part of
    the report built from it, with the reason shown, never the whole report."""
    try:
        return compute()
    except Exception as exc:  # noqa: BLE001 - any failure becomes a visible note
        return fallback(f"{type(exc).__name__}: {exc}")


def read_json(path: Path, run_dir: Path, section: Section) -> Any | None:
    """The JSON at `path`, or None (with a warning when it exists but is not valid JSON)."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        section.warn(
            f"{rel(path, run_dir)} is not valid JSON ({exc}); re-run the stage that writes it"
        )
        return None


def png_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def png_figure(path: Path, title: str, caption: str = "") -> Figure:
    """An existing PNG file as an embedded figure."""
    return Figure(title, png_uri(path.read_bytes()), caption)


def ensure_plot(
    path: Path,
    draw: Callable[[Path], Any],
    title: str,
    caption: str,
    section: Section,
    run_dir: Path,
    sources: Sequence[Path] = (),
) -> Figure | None:
    """The figure at `path`, drawn with `draw(path)` first when the file does not exist or is older
    than one of its `sources` (a stage re-ran since); None with a warning when drawing fails."""
    try:
        if not path.is_file() or _stale(path, sources):
            draw(path)
        return png_figure(path, title, caption)
    except Exception as exc:  # noqa: BLE001 - a broken plot must not break the report
        section.warn(f"plot {rel(path, run_dir)} could not be drawn ({type(exc).__name__}: {exc})")
        return None


def _stale(path: Path, sources: Sequence[Path]) -> bool:
    mtime = path.stat().st_mtime
    return any(src.is_file() and src.stat().st_mtime > mtime for src in sources)


def save_png(fig: Any, path: Path, dpi: int = 120) -> Path:
    """Write a matplotlib Figure as PNG atomically (plots live beside the report)."""
    from mmdiff.atomic import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    return path


def fmt(value: Any, digits: int = 3) -> str:
    """A cell value for display: floats with `digits` significant digits, NaN/None as an en dash."""
    if value is None or value is pd.NA:
        return "–"
    if isinstance(value, bool) or getattr(getattr(value, "dtype", None), "kind", "") == "b":
        return "yes" if bool(value) else "no"
    if isinstance(value, int) or (
        hasattr(value, "dtype") and getattr(value.dtype, "kind", "") in "iu"
    ):
        return f"{int(value):,}"
    if isinstance(value, float) or (
        hasattr(value, "dtype") and getattr(value.dtype, "kind", "") == "f"
    ):
        v = float(value)
        if math.isnan(v):
            return "–"
        if math.isinf(v):
            return "∞" if v > 0 else "−∞"
        if v != 0 and (abs(v) >= 1e6 or abs(v) < 1e-3):
            return f"{v:.{digits - 1}e}"
        if abs(v) >= 10**digits:
            return f"{v:,.0f}"
        return f"{v:.{digits}g}"
    return str(value)


P_FLOOR = 1e-6
"""The smallest p- or q-value printed: below it a cell reads "< 1e-6". The Fisher tests count every
token as an independent draw (docs/design.md), so their tail probabilities are a ranking device, and
values like 1e-303 (or 0 after underflow) state a precision no test here has."""


def fmt_p(value: Any, floor: float = P_FLOOR) -> str:
    """A p- or q-value for display, floored at `floor` ("< 1e-6"); NaN as an en dash."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return fmt(value)
    if math.isnan(v):
        return "–"
    if v < floor:
        exponent = math.log10(floor)
        bound = f"1e{int(exponent)}" if exponent == int(exponent) else f"{floor:.1g}"
        return f"< {bound}"
    return fmt(v)


def frame_table(
    df: pd.DataFrame,
    title: str,
    columns: Sequence[str],
    *,
    caption: str = "",
    max_rows: int = 50,
    cell: Callable[[str, Any, pd.Series], Any] | None = None,
) -> Table:
    """A Table of the first `max_rows` rows of `df`, the given columns (those present), formatted
    with `fmt` unless `cell(column, value, row)` returns something else than None."""
    cols = [c for c in columns if c in df.columns]
    rows = []
    for _, r in df.head(max_rows).iterrows():
        out = []
        for c in cols:
            custom = cell(c, r[c], r) if cell is not None else None
            out.append(custom if custom is not None else fmt(r[c]))
        rows.append(out)
    return Table(title, cols, rows, caption, total_rows=len(df) if len(df) > max_rows else None)


def feature_label(layer: int, feature: int) -> str:
    """ "L12/F807", the id explanations and dashboards use."""
    return f"L{int(layer)}/F{int(feature)}"


def dashboard_link(run_dir: Path, layer: int, feature: int) -> Link:
    """A link that opens the feature's card in the report's feature browser ("#f-L3-F5")."""
    return Link(feature_label(layer, feature), f"#f-L{int(layer)}-F{int(feature)}")
