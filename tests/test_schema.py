"""Artifact schemas: writers are held to them, readers read through them, and tables written before
a column (the effects table's `kind`) existed are still read, with the kind derived once."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from mmdiff.atomic import write_parquet
from mmdiff.control import EFFECTS, STEERING
from mmdiff.errors import DataError
from mmdiff.schema import Artifact, Column

TOY = Artifact(
    "out/toy_{task}.parquet",
    "make_toy",
    columns=(
        Column("name", str),
        Column("kind", str, kinds={"a": "an a", "b": "a b"}),
        Column("n", int),
        Column("score", float, default=math.nan),
    ),
    legacy_kind=lambda df: np.where(df["name"].str.startswith("a"), "a", "b"),
)


def test_validate_names_the_mismatch():
    ok = pd.DataFrame({"n": [1, 2], "name": ["ax", "by"], "kind": ["a", "b"], "score": [0.5, np.nan]})
    ok.attrs["why"] = "kept"
    out = TOY.validate(ok)
    assert list(out.columns) == ["name", "kind", "n", "score"] and out.attrs == {"why": "kept"}
    with pytest.raises(DataError, match=r"lacks columns \['score'\]; build it with make_toy"):
        TOY.validate(ok.drop(columns="score"))
    with pytest.raises(DataError, match="does not declare"):
        TOY.validate(ok.assign(extra=1))
    with pytest.raises(DataError, match="'n' holds floating values, expected int"):
        TOY.validate(ok.assign(n=[0.5, 1.0]))
    with pytest.raises(DataError, match=r"values \['c'\]"):
        TOY.validate(ok.assign(kind=["a", "c"]))
    TOY.validate(ok.assign(score=[None, None]))  # all missing: any type


def test_read_is_tolerant(tmp_path):
    assert TOY.read(tmp_path, task="x") == (None, "out/toy_x.parquet does not exist (stage not run)", False)
    path = TOY.path_in(tmp_path, task="x")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not parquet")
    loaded = TOY.read(tmp_path, task="x")
    assert loaded.table is None and loaded.exists and "could not be read" in loaded.why
    write_parquet(path, pd.DataFrame({"name": ["a"]}))
    assert "lacks columns ['n']" in TOY.read(tmp_path, task="x").why
    # written before `kind` and `score` existed: kind derived from the label once, score filled
    write_parquet(path, pd.DataFrame({"name": ["ax", "by"], "n": [1, 2]}))
    df = TOY.read(tmp_path, task="x").table
    assert df["kind"].tolist() == ["a", "b"] and df["score"].isna().all()
    assert TOY.found(tmp_path) == ["x"]


def test_effects_written_before_the_kind_column(tmp_path):
    """An effects table from before `kind`, `baseline_ci_lo` and `floor`: kinds as the labels said."""
    labels = [
        "remove spatial",
        "remove ocr (mismatched control for spatial)",
        "feature_ablation",
        "mean_ablate_heads",
        "steer spatial",
    ]
    old = pd.DataFrame({c: [0.0] * len(labels) for c in EFFECTS.needed})
    old["intervention"], old["n"] = labels, 10
    write_parquet(tmp_path / "eval" / "effects.parquet", old)
    df = EFFECTS.read(tmp_path).table
    assert df["kind"].tolist() == ["removal", "control_mismatched", "removal", "other", "other"]
    assert df["floor"].isna().all() and df["baseline_ci_lo"].isna().all()


def test_steering_written_before_split_and_selection(tmp_path):
    old = pd.DataFrame({c: [1.0] for c in STEERING.needed}).assign(method="feature", task="ocr")
    write_parquet(tmp_path / "eval" / "steering.parquet", old)
    df = STEERING.read(tmp_path).table
    assert df["split"].tolist() == ["test"] and df["selected"].tolist() == [False]
    assert df["layer"].isna().all() and str(df["layer"].dtype) == "Int64"


def test_every_schema_is_consistent():
    """Kinds sit in one column per artifact, legacy readers only where a kind exists, paths unique."""
    from mmdiff import concept_study, detect, diff
    from mmdiff.attribution import frames
    from mmdiff.sae import training_report

    modules = (concept_study, detect, diff, frames, training_report)
    artifacts = [EFFECTS, STEERING] + [
        v for m in modules for v in vars(m).values() if isinstance(v, Artifact)
    ]
    assert len({a.path for a in artifacts}) == len(artifacts) >= 18
    for a in artifacts:
        assert sum(c.kinds is not None for c in a.columns) <= 1, a.path
        assert set(a.needed) <= set(a.names), a.path
