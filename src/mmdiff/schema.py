"""One definition per artifact: where a stage writes a table inside the run directory, its columns
with their types, and what kind of thing each row is; the writer validates against it, every reader
reads through it.

    EFFECTS = Artifact("eval/effects.parquet", "removal_experiment", columns=(
        Column("intervention", str, "what was done, for people"),
        Column("kind", str, "what the row is, for machines", kinds={"removal": ..., ...}),
        Column("floor", float, "added later", default=math.nan),
        ...))
    EFFECTS.validate(df)                  # the writer: exactly these columns, of these types
    loaded = EFFECTS.read(run_dir)        # every reader: loaded.table, or None and loaded.why

Reading is tolerant and happens once, here: a missing file, an unreadable one or one without the
columns every version wrote gives `table=None` and a reason in words (the report shows it, never
crashes); a column added later (`default=`) is filled for tables written before it existed, and
a kind column added later is derived once by the artifact's `legacy_kind`, so readers never look
at labels. Adding a column or a kind is one line in the artifact's definition, beside its writer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd

from mmdiff.errors import DataError

REQUIRED: Any = object()  # `Column.default` of a column every version of the writer wrote

# pandas.api.types.infer_dtype's answers (NA skipped) that each declared type accepts
_INFERRED: dict[type, tuple[str, ...]] = {
    int: ("integer", "empty"),
    float: ("floating", "integer", "mixed-integer-float", "empty"),
    str: ("string", "empty"),
    bool: ("boolean", "empty"),
}


@dataclass(frozen=True)
class Column:
    """One column: its name, its type (int, float, str, bool; missing values allowed), what it means,
    and, for a column added after the first version, the value older tables are read with."""

    name: str
    type: type
    doc: str = ""
    default: Any = REQUIRED
    kinds: Mapping[str, str] | None = None  # the closed set of values, each with its meaning


class Loaded(NamedTuple):
    """What `Artifact.read` found: the table, or None and why (`exists` False: the stage did not run)."""

    table: pd.DataFrame | None
    why: str
    exists: bool


@dataclass(frozen=True)
class Artifact:
    """A table a stage writes: `path` relative to the run directory (fields such as {task} filled in
    by `path_in`), the function that builds it, and its columns in order (`open`: further columns
    may follow them).

    `legacy_kind(df) -> values` derives the column with `kinds` for tables written before it existed.
    `required` names the columns a table must have to be read at all; by default every column that
    has no `default` (so a table from an older version lacking a newer column is still readable).
    """

    path: str
    writer: str
    columns: tuple[Column, ...]
    legacy_kind: Callable[[pd.DataFrame], Any] | None = None
    required: tuple[str, ...] | None = None
    doc: str = ""
    open: bool = False  # more columns may follow the declared ones (e.g. an evaluation's fields)
    _by_name: dict[str, Column] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names = [c.name for c in self.columns]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.path}: column names repeat: {names}")
        object.__setattr__(self, "_by_name", {c.name: c for c in self.columns})
        if self.legacy_kind is not None and self.kind_column is None:
            raise ValueError(f"{self.path}: legacy_kind needs a column with kinds")

    # ------------------------------------------------------------------ the definition
    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    @property
    def kind_column(self) -> str | None:
        """The column whose values say what each row is (None when the table has none)."""
        return next((c.name for c in self.columns if c.kinds is not None), None)

    @property
    def kinds(self) -> tuple[str, ...]:
        col = self.kind_column
        return tuple(self._by_name[col].kinds or {}) if col else ()

    @property
    def needed(self) -> tuple[str, ...]:
        """The columns a readable table must have."""
        if self.required is not None:
            return self.required
        return tuple(
            c.name
            for c in self.columns
            if c.default is REQUIRED and not (c.kinds is not None and self.legacy_kind is not None)
        )

    def path_in(self, run_dir: str | Path, **fields: Any) -> Path:
        """The file inside `run_dir` (`fields` fill the path's {placeholders})."""
        return Path(run_dir) / self.path.format(**fields)

    def rel(self, **fields: Any) -> str:
        return self.path.format(**fields)

    def found(self, run_dir: str | Path) -> list[str]:
        """The values of the path's one {placeholder} whose file exists in `run_dir` (in the order
        of the files' sorted paths): the tasks of "stats/detect_{task}.parquet"."""
        prefix, _, rest = self.path.partition("{")
        suffix = rest.partition("}")[2]
        rels = [p.relative_to(run_dir).as_posix() for p in sorted(Path(run_dir).glob(prefix + "*" + suffix))]
        return [r[len(prefix) : len(r) - len(suffix)] for r in rels]

    def empty(self) -> pd.DataFrame:
        """A table with no rows and every column."""
        return pd.DataFrame(columns=list(self.names))

    # ------------------------------------------------------------------ writing
    def validate(self, df: pd.DataFrame) -> pd.DataFrame:
        """`df` with exactly this artifact's columns, in order (attrs kept); DataError naming the
        first mismatch (missing or undeclared column, wrong type, unknown kind) otherwise."""
        name = self.path
        missing = [c for c in self.names if c not in df.columns]
        if missing:
            raise DataError(f"the {name} table lacks columns {missing}; build it with {self.writer}")
        extra = [c for c in df.columns if c not in self._by_name]
        if extra and not self.open:
            raise DataError(
                f"the {name} table has columns {extra} that its schema does not declare; "
                f"add them to the artifact's columns beside {self.writer}"
            )
        for c in self.columns:
            found = pd.api.types.infer_dtype(df[c.name], skipna=True)
            if found not in _INFERRED[c.type] and not df[c.name].isna().all():
                raise DataError(
                    f"the {name} table's column {c.name!r} holds {found} values, expected "
                    f"{c.type.__name__}; build it with {self.writer}"
                )
            if c.kinds is not None:
                unknown = sorted(set(df[c.name].dropna().astype(str)) - set(c.kinds))
                if unknown:
                    raise DataError(
                        f"the {name} table's column {c.name!r} has values {unknown}; the known ones "
                        f"are {list(c.kinds)} (a new one is one line in the artifact's definition)"
                    )
        out = df[list(self.names) + (extra if self.open else [])]
        out.attrs = dict(df.attrs)
        return out

    # ------------------------------------------------------------------ reading
    def read(self, run_dir: str | Path, **fields: Any) -> Loaded:
        """The table of a run, tolerant: see `read_file`."""
        return self.read_file(self.path_in(run_dir, **fields), self.rel(**fields))

    def read_file(self, path: str | Path, name: str | None = None) -> Loaded:
        """The table at `path` with newer columns filled in and the kind derived for older tables;
        or None and why (missing, unreadable, lacking columns every version wrote). Never raises."""
        path = Path(path)
        name = name or f"{path.parent.name}/{path.name}"
        if not path.is_file():
            return Loaded(None, f"{name} does not exist (stage not run)", False)
        try:
            df = pd.read_parquet(path)
        except Exception as exc:  # noqa: BLE001 - an unreadable file is reported, never raised
            return Loaded(
                None,
                f"{name} could not be read ({type(exc).__name__}: {exc}); re-run the stage that writes it",
                True,
            )
        missing = [c for c in self.needed if c not in df.columns]
        if missing:
            return Loaded(
                None,
                f"{name} lacks columns {missing} (it has {list(df.columns)}); it was written by another "
                "version of mmdiff or edited by hand: re-run the stage that writes it",
                True,
            )
        return Loaded(self.upgrade(df), "", True)

    def upgrade(self, df: pd.DataFrame) -> pd.DataFrame:
        """A table written before some columns existed, with their defaults and its derived kind."""
        kind = self.kind_column
        if kind is not None and kind not in df.columns and self.legacy_kind is not None:
            df[kind] = self.legacy_kind(df)
        for c in self.columns:
            if c.name not in df.columns and c.default is not REQUIRED:
                df[c.name] = (
                    pd.array([pd.NA] * len(df), dtype="Int64")
                    if c.type is int and c.default is pd.NA
                    else c.default
                )
        return df
