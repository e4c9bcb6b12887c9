"""Writing the control stage's tables: Parquet for analysis, a JSON mirror for people and tools."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mmdiff.atomic import write_json, write_parquet
from mmdiff.schema import Artifact


def write_table(
    df: pd.DataFrame,
    artifact: Artifact,
    out: str | Path,
    *,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """out/<name>.parquet (exactly the artifact's columns, validated against it) and out/<name>.json
    ({name: rows, **extra}, with NaN and NA written as null); <name> is the artifact's file stem."""
    out = Path(out)
    table = artifact.validate(df).copy()
    table.attrs = {}
    name = Path(artifact.path).stem
    paths = {"parquet": out / f"{name}.parquet", "json": out / f"{name}.json"}
    write_parquet(paths["parquet"], table)
    rows = [
        {k: (None if v is pd.NA or (isinstance(v, float) and np.isnan(v)) else v) for k, v in r.items()}
        for r in table.astype(object).to_dict("records")
    ]
    write_json(paths["json"], {name: rows, **(extra or {})})
    return paths
