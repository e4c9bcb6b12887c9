"""The study's HTML report: runs/<name>/report/index.html, one self-contained file.

`build_report(run_dir)` discovers what the earlier stages wrote into the run directory and renders
one section per stage: configuration and provenance, SAE adaptation, adapted features, task
features, attribution, control, concept shift, and the seed paper's findings (`mmdiff.report.findings`). A stage
that did not run gives a short "not run" note; a malformed file gives a visible warning. Plots are
embedded as base64 PNG data URIs (the PNG files stay beside the report), there is no script, font
or stylesheet from outside, and Jinja2 autoescape is on with nothing from data marked safe, so
dataset text (questions, explanations, config values) is always escaped.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmdiff.errors import ConfigError
from mmdiff.report.findings import STATUSES, Finding, findings
from mmdiff.report.sections._common import Link, Section, guarded
from mmdiff.report.sections.adapted import adapted_section
from mmdiff.report.sections.attribution import attribution_section
from mmdiff.report.sections.concepts import concepts_section
from mmdiff.report.sections.control import control_section
from mmdiff.report.sections.provenance import provenance_section
from mmdiff.report.sections.sae import sae_section
from mmdiff.report.sections.tasks import tasks_section

if TYPE_CHECKING:
    from mmdiff.config import StudyConfig

TEMPLATES = Path(__file__).resolve().parent / "templates"
REPORT_FILE = "index.html"


def _environment() -> Any:
    from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

    env = Environment(
        loader=FileSystemLoader(str(TEMPLATES)),
        autoescape=select_autoescape(enabled_extensions=("html", "j2"), default=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.tests["link"] = lambda v: isinstance(v, Link)
    return env


def load_explanations(run_dir: Path, section: Section) -> dict[str, Any]:
    """interp/explanations.json by feature id ("L12/F807"); {} (and a warning when malformed) otherwise."""
    from mmdiff.errors import DataError
    from mmdiff.interp.explain import read_explanations

    path = run_dir / "interp" / "explanations.json"
    if not path.is_file():
        return {}
    try:
        return {e.feature_id: e for e in read_explanations(path)}
    except DataError as exc:
        section.warn(str(exc))
        return {}


def model_depth(run_dir: Path, config: StudyConfig | None) -> int | None:
    """Decoder layers of the VLM's language backbone, read from its config.json; None when unknown."""
    try:
        if config is None:
            from mmdiff.config import load_config

            if not (run_dir / "config.yaml").is_file():
                return None
            config = load_config(run_dir / "config.yaml")
        from mmdiff.config import ORGANISM

        vlm = config.model.vlm
        if vlm == ORGANISM:
            from mmdiff.organism import vlm_path

            vlm = str(vlm_path())
        cfg = json.loads(
            (Path(vlm) / "config.json").read_text()
        )  # a local folder; hub ids give None
    except Exception:  # noqa: BLE001 - the depth only refines one finding; unknown is fine
        return None
    for part in (cfg.get("text_config") or {}, cfg):
        if isinstance(part, dict) and isinstance(part.get("num_hidden_layers"), int):
            return int(part["num_hidden_layers"])
    return None


def _guarded(section_id: str, title: str, build: Callable[[], Section]) -> Section:
    """Build a section; a failure anywhere inside it becomes a warning in the report, not a crash."""

    def failed(why: str) -> Section:
        section = Section(section_id, title)
        section.warn(
            f"this section could not be built ({why}); the files it reads may be malformed: "
            "re-run the stage that writes them"
        )
        return section

    return guarded(build, failed)


def report_sections(run_dir: Path, config: StudyConfig | None = None) -> list[Section]:
    """Sections 1-7 of the report, as data."""
    interp_notes = Section("tasks", "Task features")
    explanations = load_explanations(run_dir, interp_notes)
    sections = [
        _guarded(
            "provenance",
            "Configuration and provenance",
            lambda: provenance_section(run_dir, config),
        ),
        _guarded("sae", "SAE adaptation", lambda: sae_section(run_dir)),
        _guarded("adapted", "Adapted features", lambda: adapted_section(run_dir, explanations)),
        _guarded("tasks", "Task features", lambda: tasks_section(run_dir, explanations)),
        _guarded(
            "attribution", "Attribution to attention heads", lambda: attribution_section(run_dir)
        ),
        _guarded("control", "Control: removal and steering", lambda: control_section(run_dir)),
        _guarded("concepts", "Concept shift", lambda: concepts_section(run_dir)),
    ]
    sections[3].warnings[:0] = interp_notes.warnings
    return sections


def render_report(
    sections: list[Section], found: list[Finding], *, title: str, generated: str
) -> str:
    """The report's HTML from its sections and findings."""
    counts = {s: sum(f.status == s for f in found) for s in STATUSES}
    return (
        _environment()
        .get_template("index.html.j2")
        .render(
            title=title,
            generated=generated,
            sections=sections,
            findings=found,
            counts=counts,
        )
    )


def build_report(run_dir: str | Path, config: StudyConfig | None = None) -> Path:
    """Report stage: write runs/<name>/report/index.html from whatever the run directory holds.

    Plots the earlier stages did not draw are drawn into report/ beside it. Returns the path.
    """
    from mmdiff import __version__
    from mmdiff.atomic import write_text

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(
            f"run directory {run_dir} does not exist; run `mmdiff run` first or pass runs/<name>"
        )
    sections = report_sections(run_dir, config)
    try:
        found = findings(run_dir, n_layers=model_depth(run_dir, config))
    except Exception as exc:  # noqa: BLE001 - findings must not take the report down
        sections[-1].warn(f"the findings could not be computed ({type(exc).__name__}: {exc})")
        found = []
    name = config.name if config is not None else run_dir.name
    generated = (
        dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC") + f", mmdiff {__version__}"
    )
    html = render_report(sections, found, title=f"mmdiff study: {name}", generated=generated)
    path = run_dir / "report" / REPORT_FILE
    write_text(path, html)
    return path
