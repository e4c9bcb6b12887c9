"""The dry run's cross-reference checks: stage sections name configured datasets and a trained
regime; dtypes are known."""

from __future__ import annotations

from mmdiff.config import StudyConfig


def check_references(cfg: StudyConfig) -> list[str]:
    """Stage sections name configured datasets and a trained regime; dtypes are known."""
    problems: list[str] = []
    names = sorted(cfg.datasets)
    refs = [(f"capture.datasets[{i}]", n) for i, n in enumerate(cfg.capture.datasets)]
    refs += [
        ("train.dataset", cfg.train.dataset),
        ("train.heldout", cfg.train.heldout),
        ("stats.dataset", cfg.stats.dataset),
    ]
    for where, n in refs:
        if n not in cfg.datasets:
            problems.append(
                f"{where}: names dataset {n!r}, which is not defined under `datasets` "
                f"(defined: {names}); define it or fix the name"
            )
    if cfg.stats.role not in cfg.train.regimes:
        problems.append(
            f"stats.role: {cfg.stats.role!r} is not among train.regimes {cfg.train.regimes}, "
            "so no SAEs of that regime are trained; add it or pick a trained regime"
        )
    for t in cfg.stats.neutral_tasks:
        if t not in cfg.stats.tasks:
            problems.append(
                f"stats.neutral_tasks: {t!r} is not in stats.tasks {cfg.stats.tasks}; the "
                "lexical filter re-runs only tasks that are detected"
            )
    if cfg.capture.dtype.lower().removeprefix("torch.") not in ("float32", "float16", "bfloat16"):
        problems.append(
            f"capture.dtype: {cfg.capture.dtype!r} is not a storage dtype; expected float32, "
            "float16 or bfloat16"
        )
    return problems
