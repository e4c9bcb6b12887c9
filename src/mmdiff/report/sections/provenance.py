"""Section 1: the resolved config and the manifest (per-stage status, time, memory, versions, hashes)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from mmdiff.report.sections._common import NOT_RUN, Block, Section, Table, fmt, read_json

HASH_CHARS = 12  # abbreviated hashes: enough to tell runs apart at a glance


def _short(h: Any) -> str:
    return str(h)[:HASH_CHARS] if h else "–"


def _when(ts: Any) -> str:
    try:
        return dt.datetime.fromtimestamp(float(ts), tz=dt.timezone.utc).strftime(
            "%Y-%m-%d %H:%M:%S UTC"
        )
    except (TypeError, ValueError, OverflowError, OSError):
        return "–"


def _config_text(run_dir: Path, config: Any, section: Section) -> str | None:
    path = run_dir / "config.yaml"
    if path.is_file():
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            section.warn(f"config.yaml could not be read ({exc})")
    if config is not None:
        from mmdiff.config import dump_config

        section.notes.append(
            "config.yaml is not in the run directory; showing the config passed to the report."
        )
        return dump_config(config)
    return None


def _stale_stages(run_dir: Path, manifest: dict[str, Any], text: str | None) -> list[str]:
    """Finished stages that ran with another config than the run directory's config.yaml."""
    from mmdiff.config import StudyConfig
    from mmdiff.pipeline import config_mismatch

    if text is None or not (run_dir / "config.yaml").is_file():
        return []
    try:
        import yaml

        config = StudyConfig.model_validate(yaml.safe_load(text))
    except Exception:  # noqa: BLE001  an unreadable config.yaml is shown as text, not judged
        return []
    return config_mismatch(manifest, config)


def provenance_section(run_dir: Path, config: Any = None) -> Section:
    """The resolved config as text, and one row per stage of manifest.json."""
    section = Section("provenance", "Configuration and provenance")
    text = _config_text(run_dir, config, section)
    manifest = read_json(run_dir / "manifest.json", run_dir, section)
    if text is None and manifest is None:
        section.status = NOT_RUN
        section.notes.append(
            "No config.yaml or manifest.json in the run directory: no stage has run yet."
        )
        return section
    if text is not None:
        section.blocks.append(Block("Resolved config (config.yaml)", pre=text))
    if manifest is None:
        return section
    stages = manifest.get("stages") if isinstance(manifest, dict) else None
    if not isinstance(stages, dict):
        section.warn(
            "manifest.json has no `stages` mapping; it was not written by mmdiff's pipeline"
        )
        return section
    rows, versions = [], {}
    for name, st in stages.items():
        if name == "report" and isinstance(st, dict) and st.get("status") == "running":
            continue  # this very stage, writing the report: its row is only final after it
        if not isinstance(st, dict):
            section.warn(
                f"manifest.json: stage {name!r} is not a mapping ({type(st).__name__}); skipped"
            )
            continue
        outputs = st.get("outputs") or {}
        rows.append(
            [
                str(name),
                str(st.get("status", "–")),
                fmt(st.get("seconds")),
                fmt(st.get("peak_rss_mib")),
                fmt(st.get("peak_cuda_mib")),
                _when(st.get("finished") or st.get("started")),
                _short(st.get("inputs_hash")),
                ", ".join(f"{k}: {_short(v)}" for k, v in outputs.items())
                if isinstance(outputs, dict)
                else "–",
                str(st.get("error") or ""),
            ]
        )
        for pkg, ver in (st.get("versions") or {}).items():
            versions.setdefault(str(pkg), {}).setdefault(str(ver), []).append(str(name))
    stale = _stale_stages(run_dir, manifest, text)
    if stale:
        section.warn(
            f"config.yaml is not the config that stages {', '.join(stale)} ran with (their recorded "
            "config hashes differ): their results come from another config. Run the study with "
            "config.yaml (mmdiff run -c config.yaml) to redo them, or restore the config they ran with."
        )
    block = Block("Stages (manifest.json)")
    if manifest.get("mmdiff_version"):
        block.notes.append(f"Run directory created by mmdiff {manifest['mmdiff_version']}.")
    block.tables.append(
        Table(
            "Per-stage status",
            [
                "stage",
                "status",
                "seconds",
                "peak RSS (MiB)",
                "peak CUDA (MiB)",
                "finished",
                "inputs hash",
                "outputs (hash)",
                "error",
            ],
            rows,
            caption=f"Hashes are SHA-256, first {HASH_CHARS} hex digits.",
        )
    )
    if versions:
        vrows = [
            [pkg, ver, ", ".join(names)]
            for pkg, by_ver in sorted(versions.items())
            for ver, names in by_ver.items()
        ]
        block.tables.append(
            Table(
                "Package versions",
                ["package", "version", "stages"],
                vrows,
                caption="A package listed with several versions means stages ran in different environments.",
            )
        )
    section.blocks.append(block)
    return section
