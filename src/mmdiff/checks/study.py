"""`check_study`: every check of the dry run over one study config, in order."""

from __future__ import annotations

import functools
from collections.abc import Callable

from mmdiff.checks.datasets import SAMPLE_RECORDS, check_analysis_splits, check_dataset
from mmdiff.checks.models import ModelFacts, check_models
from mmdiff.checks.references import check_references
from mmdiff.checks.saes import check_base_saes
from mmdiff.config import DatasetSpec, StudyConfig


def check_study(
    cfg: StudyConfig,
    *,
    sample: int = SAMPLE_RECORDS,
    read_records: bool = True,
    progress: bool = False,
) -> list[str]:
    """Problems with everything a study config names, without loading weights: one message each,
    saying what was expected, what was found and what to do. Empty means the dry run passes.

    Order: cross-references, the model pair, the base SAEs (against the models' hidden size), each
    dataset (with read_records, a `sample` of records through its loader), then (read_records)
    the analysis dataset's task splits. read_records=False checks files by name and header only:
    seconds instead of about a minute per VQAv2-sized dataset, for a check before every run.
    """
    from mmdiff.models.loading import hub_offline

    m = cfg.model
    offline = m.local_files_only if m.local_files_only is not None else hub_offline()
    facts: dict[str, ModelFacts] = {}
    dataset_ok: dict[str, bool] = {}

    def models() -> list[str]:
        found, facts["vlm"], facts["base"] = check_models(cfg)
        return found

    def saes() -> list[str]:
        if cfg.train.base_saes is None:
            return []
        d_model = facts["base"].hidden_size or facts["vlm"].hidden_size
        return check_base_saes(cfg.train.base_saes, cfg.layers, d_model, offline=offline)

    def dataset(name: str, spec: DatasetSpec) -> list[str]:
        found = check_dataset(name, spec, sample=sample, read_records=read_records)
        dataset_ok[name] = not found
        return found

    def splits() -> list[str]:
        if not read_records or not dataset_ok.get(cfg.stats.dataset):
            return []
        return check_analysis_splits(cfg)

    steps: list[tuple[str, Callable[[], list[str]]]] = [
        ("references", lambda: check_references(cfg)),
        ("models", models),
        ("base SAEs", saes),
        *[(f"dataset {n}", functools.partial(dataset, n, s)) for n, s in cfg.datasets.items()],
        ("task splits", splits),
    ]
    problems: list[str] = []
    if not progress:
        for _, step in steps:
            problems += step()
        return problems
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task("checking the config", total=len(steps))
        for label, step in steps:
            bar.update(task, description=f"checking {label}")
            problems += step()
            bar.advance(task)
    return problems
