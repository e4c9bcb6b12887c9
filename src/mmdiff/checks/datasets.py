"""The dry run's dataset checks: a known loader, its arguments and paths, a few records read through
the loader itself, and the analysis dataset's task splits."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mmdiff.config import DatasetSpec, StudyConfig
from mmdiff.data.loaders import LOADERS
from mmdiff.data.selection import dataset_loader, load_records, task_splits
from mmdiff.errors import MMDiffError

SAMPLE_RECORDS = 3
"""Records each dataset check draws through its loader (their images must exist)."""


def _is_path_param(p: inspect.Parameter) -> bool:
    return "Path" in str(p.annotation)


def _type_problems(where: str, fn: Callable[..., Any], spec: DatasetSpec) -> list[str]:
    """Arguments whose YAML value is not of the loader's annotated type (`n_per_family: eight`);
    strict, so "8" is not an int either. Paths are left to the existence check."""
    import typing

    from pydantic import TypeAdapter, ValidationError
    from pydantic.errors import PydanticSchemaGenerationError

    try:
        hints = typing.get_type_hints(fn)
    except (NameError, TypeError):
        return []
    problems = []
    for arg, value in spec.args.items():
        hint = hints.get(arg)
        if hint is None or "Path" in str(hint):
            continue
        try:
            TypeAdapter(hint).validate_python(value, strict=True)
        except ValidationError as exc:
            name = getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
            problems.append(
                f"{where}.args.{arg}: {value!r} is not of the type the {spec.kind} loader takes "
                f"({arg}: {name}; {exc.errors()[0]['msg']})"
            )
        except PydanticSchemaGenerationError:
            continue
    return problems


def check_dataset(
    name: str, spec: DatasetSpec, *, sample: int = SAMPLE_RECORDS, read_records: bool = True
) -> list[str]:
    """One configured dataset: a known loader, its arguments, its paths, and (read_records) a few
    records read through the loader itself, so the fields checked are exactly the ones a run
    needs. The loader parses its whole annotation file: about 16 s for VQAv2 val (157 MB)."""
    where = f"datasets.{name}"
    fn = dataset_loader(spec.kind)
    if fn is None:
        return [
            (
                f"{where}.kind: unknown dataset kind {spec.kind!r}; expected one of "
                f"{sorted([*LOADERS, 'shapes'])}"
            )
        ]
    params = inspect.signature(fn).parameters
    required = [n for n, p in params.items() if p.default is inspect.Parameter.empty]
    problems: list[str] = []
    unknown = [k for k in spec.args if k not in params]
    if unknown:
        problems.append(
            f"{where}.args: unknown argument(s) {unknown} for kind {spec.kind!r} (misspelt?); "
            f"it takes {list(params)}"
        )
    missing = [n for n in required if n not in spec.args]
    if missing:
        problems.append(
            f"{where}.args: kind {spec.kind!r} needs {missing}, which are not given; add "
            f"them under args (it takes {list(params)})"
        )
    problems += _type_problems(where, fn, spec)
    if spec.kind == "shapes" and isinstance(spec.args.get("n_per_family"), int) and spec.args["n_per_family"] < 1:
        problems.append(
            f"{where}.args.n_per_family: {spec.args['n_per_family']} records per question family "
            "makes the dataset empty; expected an int >= 1"
        )
    for arg, value in spec.args.items():
        if arg not in params or not _is_path_param(params[arg]) or value is None:
            continue
        for v in value if isinstance(value, list) else [value]:
            if not Path(str(v)).expanduser().exists():
                problems.append(
                    f"{where}.args.{arg}: {v} does not exist: the {spec.kind} loader's "
                    f"`{arg}` must name an existing file or folder; check the path (and "
                    "MMDIFF_DATA)"
                )
    if problems or not read_records:
        return problems
    kwargs = dict(spec.args)
    if spec.kind == "shapes" and "n_per_family" in params:
        kwargs["n_per_family"] = 1  # generated, no files: one record per family checks the args
    if "limit" in params:
        kwargs["limit"] = min(sample, kwargs.get("limit") or sample)
    if "seed" in params:
        kwargs.setdefault("seed", spec.seed)
    if "check_images" in params:
        kwargs["check_images"] = True
    try:
        records = fn(**kwargs)
    except MMDiffError as exc:
        return [f"{where}: {exc}"]
    except (OSError, TypeError, ValueError, KeyError) as exc:
        return [
            (
                f"{where}: the {spec.kind} loader failed on these arguments "
                f"({type(exc).__name__}: {exc}); check args against the loader's documentation"
            )
        ]
    if not records:
        return [
            f"{where}: the {spec.kind} loader found no records in {dict(spec.args)}: is the file empty?"
        ]
    return []


def check_analysis_splits(cfg: StudyConfig) -> list[str]:
    """The analysis dataset (stats.dataset) holds records of every task split the stats stage
    contrasts (stats.tasks and stats.base_split), found by reading it as the run will (images
    unchecked), so a study does not fail at the stats stage after hours of SAE training."""
    name = cfg.stats.dataset
    spec = cfg.datasets[name]
    fn = dataset_loader(spec.kind)
    args = dict(spec.args)
    if fn is not None and "check_images" in inspect.signature(fn).parameters:
        args["check_images"] = False  # images were sampled by check_dataset
    try:
        records = load_records(spec.model_copy(update={"args": args}))
    except MMDiffError as exc:
        return [f"datasets.{name}: {exc}"]
    try:
        task_splits(records, cfg.stats.base_split, cfg.stats.tasks)
    except MMDiffError as exc:
        carried = sorted({t for r in records for t in r.tasks})
        return [
            (
                f"stats: {exc} (stats.dataset {name!r}: {len(records)} records carrying the tags "
                f"{carried})"
            )
        ]
    return []
