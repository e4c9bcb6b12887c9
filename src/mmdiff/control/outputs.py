"""Writing the control stage's tables: Parquet for analysis, a JSON mirror for people and tools."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mmdiff.atomic import write_json, write_parquet
from mmdiff.errors import DataError


def write_table(
    df: pd.DataFrame,
    columns: Sequence[str],
    out: str | Path,
    name: str,
    *,
    builder: str,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """out/<name>.parquet (exactly `columns`) and out/<name>.json ({name: rows, **extra}, with NaN
    and NA written as null). `builder` names the function that makes such a table, for the error."""
    out = Path(out)
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataError(f"the {name} table lacks columns {missing}; build it with {builder}")
    table = df[list(columns)].copy()
    table.attrs = {}
    paths = {"parquet": out / f"{name}.parquet", "json": out / f"{name}.json"}
    write_parquet(paths["parquet"], table)
    rows = [
        {k: (None if v is pd.NA or (isinstance(v, float) and np.isnan(v)) else v) for k, v in r.items()}
        for r in table.astype(object).to_dict("records")
    ]
    write_json(paths["json"], {name: rows, **(extra or {})})
    return paths
