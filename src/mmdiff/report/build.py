"""The study's HTML report: runs/<name>/report/index.html, one self-contained file.

`build_report(run_dir)` discovers what the earlier stages wrote into the run directory and renders
the answers first, then the evidence, then the provenance:

- the first screen (`mmdiff.report.summary`): the study's five questions, each answered in one line
  with its number and interval, the control section's selectivity matrix, and the seed paper's
  findings with their statuses (`mmdiff.report.findings`);
- evidence sections in the order of the questions (`EVIDENCE`), each opening with a two-line reading
  and its figure; tables with more than `COLLAPSE_ROWS` rows start collapsed and every table sorts
  and filters in place; columns that never vary are named once under their table;
- qualitative examples chosen by rule in the removal stage (`control.removal.choose_examples`);
- a feature browser (`mmdiff.report.browser`): one card per feature, drawn by the page's script;
- provenance last, collapsed.

A stage that did not run gives a short "not run" note; a malformed file gives a visible warning.
Plots are embedded as base64 PNG data URIs (the PNG files stay beside the report). The page's one
script (templates/report.js) is written into it and fetches nothing, so the report opens offline
from the file system. Jinja2 autoescape is on with nothing from data marked safe (the feature data
is JSON with <, > and & escaped), so dataset text is always escaped.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmdiff.errors import ConfigError
from mmdiff.report.findings import STATUSES, Finding, findings
from mmdiff.report.sections._common import (
    COLLAPSE_ROWS,
    NOT_RUN,
    Figure,
    Link,
    Section,
    drop_constant,
    guarded,
)
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
# a cell that is a number, maybe with its interval and significance star: right-aligned
NUMERIC = re.compile(r"[▶ ]*(< )?[+\-−]?(\d[\d,]*\.?\d*(e[+\-]?\d+)?%?|–|∞)( \[[^\]]*\])?( \*)?")
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
    env.tests["numeric"] = lambda v: isinstance(v, str) and NUMERIC.fullmatch(v) is not None
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


EVIDENCE = (
    # id, title, short title in the top bar, how to read the section's opening figure
    ("adapted", "What changed: adapted features", "What changed",
     "Each dot is one SAE feature: the adapted set (top left) fires far more on images than on their captions "
     "and its decoder direction turned away from the base SAE's."),
    ("tasks", "Which features carry each task", "Task features",
     "Per task, firing frequency on the task split against generic VQA; the kept features fire more on the task."),
    ("attribution", "Which heads drive them", "Heads",
     "Attribution patching: how much each attention head's output moves the features' activations, by layer."),
    ("control", "Removing and steering them, against controls", "Removal & steering",
     "Rows: the removed set; columns: the task scored. Blue cells: the removal costs more than random "
     "features of the same layers and firing frequencies; * marks an interval that excludes 0."),
    ("examples", "Examples: answers with and without the features", "Examples",
     "Held-out records chosen by rule: those whose probability of the correct answer drops most when the "
     "task's set is removed (the score for generated answers)."),
    ("browser", "What they mean: the feature browser", "Feature browser",
     "Search a feature, task or head; the card shows the scores that selected it, its explanation with "
     "its measured scores, top examples with token activations and image heatmaps, heads and effects."),
    ("concepts", "Concept shift", "Concept shift", ""),
    ("sae", "SAE adaptation quality", "SAE quality",
     "Reconstruction of the SAEs adapted to the VLM: lower FVU is better; spliced loss near the clean loss "
     "means the SAE keeps what the model uses."),
    ("findings", "Seed findings in detail", "Findings", "Each finding's numbers and the criterion that decided its status."),
    ("provenance", "Provenance: configuration, stages, versions", "Provenance",
     "What ran, with which configuration, inputs and package versions."),
)  # fmt: skip


def report_sections(
    run_dir: Path, config: StudyConfig | None = None, explanations: dict[str, Any] | None = None
) -> list[Section]:
    """The evidence sections, in the order of the study's questions, then provenance, as data.
    `explanations`: interp/explanations.json as `load_explanations` reads it (read here when None)."""
    interp_notes = Section("tasks", "Task features")
    if explanations is None:
        explanations = load_explanations(run_dir, interp_notes)
    builders: dict[str, Callable[[], Section]] = {
        "adapted": lambda: adapted_section(run_dir, explanations),
        "tasks": lambda: tasks_section(run_dir, explanations),
        "attribution": lambda: attribution_section(run_dir),
        "control": lambda: control_section(run_dir),
        "examples": lambda: Section("examples", ""),
        "browser": lambda: Section("browser", ""),
        "concepts": lambda: concepts_section(run_dir),
        "sae": lambda: sae_section(run_dir),
        "findings": lambda: Section("findings", ""),
        "provenance": lambda: provenance_section(run_dir, config),
    }
    sections = []
    for sid, title, short, reading in EVIDENCE:
        section = _guarded(sid, title, builders[sid])
        section.title, section.short = title, short
        section.reading = reading if not section.reading else section.reading
        sections.append(section)
    by_id = {s.id: s for s in sections}
    by_id["tasks"].warnings[:0] = interp_notes.warnings
    return sections


def _finish_tables(sections: list[Section]) -> None:
    """Columns that never vary are dropped from every table and named once under it."""
    for s in sections:
        for b in s.blocks:
            b.tables = [drop_constant(t) for t in b.tables]


def summary_figure(sections: list[Section]) -> Figure | None:
    """The first screen's figure: the control section's opening figure (the selectivity matrix),
    else the first figure of the first section that has one."""
    ordered = sorted(sections, key=lambda s: s.id != "control")
    for s in ordered:
        for b in s.blocks:
            if b.figures:
                f = b.figures[0]
                return Figure(f.title, _smaller(f.uri), f.caption)
    return None


def _smaller(uri: str, width: int = 720) -> str:
    """The figure again for the first screen, where it shows at most `width` px wide: resampled and
    palette-quantised, so the second copy costs a fraction of the first (the original when that fails)."""
    import base64
    import io

    from PIL import Image

    from mmdiff.report.sections._common import png_uri

    try:
        with Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) as im:
            im = im.convert("RGB")
            if im.width > width:
                im = im.resize((width, round(im.height * width / im.width)), Image.LANCZOS)
            buf = io.BytesIO()
            im.quantize(colors=128).save(buf, format="PNG", optimize=True)
    except Exception:  # noqa: BLE001 - the full-size copy still shows
        return uri
    small = png_uri(buf.getvalue())
    return small if len(small) < len(uri) else uri


def removal_examples(run_dir: Path, section: Section) -> dict[str, list[dict[str, Any]]]:
    """effects.json's qualitative examples (control.removal.choose_examples), formatted."""
    from mmdiff.control.removal import EFFECTS
    from mmdiff.report.sections._common import fmt, read_json

    data = read_json(EFFECTS.path_in(run_dir).with_suffix(".json"), run_dir, section) or {}
    examples = (data.get("removal") or {}).get("examples") if isinstance(data, dict) else None
    if not isinstance(examples, dict) or not examples:
        section.status = NOT_RUN if not section.warnings else section.status
        section.notes.append(
            "No qualitative examples: the removal stage stores them in eval/effects.json (\"examples\") "
            "since this version; re-run it (`mmdiff run --from ablate`)."
        )
        return {}
    out = {}
    for name, items in examples.items():
        rows = []
        for e in items if isinstance(items, list) else []:
            if not isinstance(e, dict):
                continue
            image = e.get("image")
            rows.append({
                **{k: str(e.get(k, "")) for k in ("record", "eval_task", "rule", "question", "clean_answer", "treated_answer")},
                "answers": [str(a) for a in e.get("answers", [])],
                "image": image if isinstance(image, str) and _is_base64(image) else None,
                "clean_p": fmt(e.get("clean_p_correct"), 2), "treated_p": fmt(e.get("treated_p_correct"), 2),
                "clean_s": fmt(e.get("clean_score"), 2), "treated_s": fmt(e.get("treated_score"), 2),
            })  # fmt: skip
        out[str(name)] = rows
    return out


def _is_base64(text: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9+/=]+", text) is not None


def render_report(
    sections: list[Section],
    found: list[Finding],
    *,
    title: str,
    generated: str,
    answers: list[Any] = (),
    summary_warnings: list[str] = (),
    features: list[dict[str, Any]] = (),
    examples: dict[str, Any] | None = None,
) -> str:
    """The report's HTML from its sections, findings, summary answers and feature records."""
    from markupsafe import Markup

    from mmdiff.report.browser import script_json

    _finish_tables(sections)
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
            answers=list(answers),
            summary_warnings=list(summary_warnings),
            summary_figure=summary_figure(sections),
            examples=examples or {},
            collapse_rows=COLLAPSE_ROWS,
            # the two pieces not escaped by Jinja: JSON with <, > and & as \u escapes, and our own script
            feature_json=Markup(script_json({"features": list(features)})),
            script=Markup((TEMPLATES / "report.js").read_text(encoding="utf-8")),
        )
    )


def _warn(section: Section, why: str, empty: Any) -> Any:
    section.warn(f"this part could not be built ({why}); the files it reads may be malformed")
    return empty


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
    from mmdiff.report.browser import feature_records
    from mmdiff.report.summary import answers

    interp_notes = Section("tasks", "")
    explanations = load_explanations(run_dir, interp_notes)
    sections = report_sections(run_dir, config, explanations)
    by_id = {s.id: s for s in sections}
    by_id["tasks"].warnings[:0] = interp_notes.warnings
    try:
        found = findings(run_dir, n_layers=model_depth(run_dir, config))
    except Exception as exc:  # noqa: BLE001 - findings must not take the report down
        by_id["findings"].warn(f"the findings could not be computed ({type(exc).__name__}: {exc})")
        found = []
    browser = by_id["browser"]
    features = guarded(lambda: feature_records(run_dir, explanations, browser), lambda why: _warn(browser, why, []))
    if not features:
        browser.status = NOT_RUN if not browser.warnings else browser.status
        browser.notes.append("No features to browse: the detect and diff stages have not run.")
    examples = guarded(
        lambda: removal_examples(run_dir, by_id["examples"]), lambda why: _warn(by_id["examples"], why, {})
    )
    said, warned = answers(run_dir, explanations, found)
    for a in said:  # each evidence section's reading starts with its answer, then how to read it
        s = by_id.get(a.href.lstrip("#"))
        if s is not None and s.status != NOT_RUN and not a.answer.startswith(("not run", "could not")):
            s.reading = f"{a.answer} {s.reading}".strip()
    name = config.name if config is not None else run_dir.name
    generated = (
        dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC") + f", mmdiff {__version__}"
    )
    html = render_report(
        sections, found, title=f"mmdiff study: {name}", generated=generated, answers=said,
        summary_warnings=warned, features=features, examples=examples,
    )  # fmt: skip
    path = run_dir / "report" / REPORT_FILE
    write_text(path, html)
    return path
