"""Feature dashboards: one self-contained HTML page per feature, and an index linking them all.

A page shows the feature's statistics (every scalar column of its row in each given table, e.g.
the diff table's variance gap and decoder cosine, a task table's firing frequencies and odds
ratio, firing frequency by token type from a statistics summary), a histogram of its activations,
the top examples with each token's background set by its activation and the image heatmaps, the
explanation with its detection score, the top heads from attribution patching and their attention
overlays. Images are inlined as base64 data URIs, so a page is one file.

Templates are rendered by Jinja2 with autoescape on: every piece of dataset text (questions,
captions, tokens, explanations) is escaped, and nothing from data is ever marked safe.
`write_interp` is the interp pipeline stage.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mmdiff.errors import DataError
from mmdiff.interp.examples import FeatureKey, feature_id
from mmdiff.interp.explain import ActivatingExample, Explanation, FeatureEvidence
from mmdiff.interp.heatmap import PNG_COMPRESS_LEVEL, printable
from mmdiff.models.base import TokenType

TEMPLATES = Path(__file__).resolve().parent.parent / "report" / "templates"
_KEYS = ("layer", "feature")


@dataclass
class FeatureCard:
    """Everything one feature's dashboard shows; every part but the key is optional."""

    layer: int
    feature: int
    evidence: FeatureEvidence | None = None
    explanation: Explanation | None = None
    detection: Any = None  # DetectionMetrics, or a mapping of metric name -> value
    tables: dict[str, dict[str, Any]] = field(default_factory=dict)  # table name -> {column: value}
    activations: np.ndarray | None = None  # values for the histogram (e.g. per-record max activation)
    # or the histogram itself: (bin edges [n + 1], counts [n]), e.g. the statistics pass's token activations
    histogram: tuple[np.ndarray, np.ndarray] | None = None
    heads: pd.DataFrame | None = None  # this feature's rows of attribution/heads.parquet
    overlays: dict[str, bytes] = field(default_factory=dict)  # name -> PNG (attention overlays)
    records: dict[str, Any] = field(default_factory=dict)  # record id -> Record, for question and caption

    @property
    def key(self) -> FeatureKey:
        return (int(self.layer), int(self.feature))

    @property
    def feature_id(self) -> str:
        return feature_id(self.key)

    @property
    def file_name(self) -> str:
        return f"L{int(self.layer)}_F{int(self.feature)}.html"


def data_uri(png: bytes) -> str:
    """A PNG as a data: URI (base64 only, so it needs no escaping)."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def histogram_png(values: Sequence[float] | np.ndarray | None, *, bins: int = 30, title: str = "",
                  binned: tuple[np.ndarray, np.ndarray] | None = None) -> bytes:
    """PNG bytes of a histogram of the positive values, or of counts already binned: `binned` =
    (edges [n + 1], counts [n]) (e.g. the statistics' log-spaced bins, drawn one bar per bin). Bar
    heights are log(1 + count); the axis ends are labelled. Drawn with PIL (a matplotlib figure per
    feature cost ~0.3 s)."""
    from PIL import Image, ImageDraw

    if binned is not None:
        edges, counts = (np.asarray(a, dtype=np.float64) for a in binned)
    else:
        v = np.asarray(values if values is not None else [], dtype=np.float64).ravel()
        v = v[np.isfinite(v) & (v > 0)]
        counts, edges = np.histogram(v, bins=bins) if v.size else (np.zeros(0), np.zeros(1))
    width, height, left, bottom, top = 320, 170, 44, 18, 16
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((left, 2), printable(title), fill="black")
    plot_w, plot_h = width - left - 8, height - top - bottom
    draw.line([(left, top), (left, top + plot_h), (left + plot_w, top + plot_h)], fill="black")
    if counts.size == 0 or counts.sum() <= 0:
        draw.text((left + plot_w // 2 - 30, top + plot_h // 2), "never fires", fill="black")
    else:
        first, last = np.flatnonzero(counts)[[0, -1]]  # draw the occupied range only
        counts, edges = counts[first : last + 1], edges[first : last + 2]
        scale = np.log1p(counts) / np.log1p(counts.max())
        step = plot_w / len(counts)
        for i, h in enumerate(scale):
            if counts[i] > 0:
                x0 = left + 1 + i * step
                draw.rectangle([x0, top + plot_h - h * plot_h, x0 + max(step - 1, 1), top + plot_h - 1], fill="#e7298a")
        draw.text((2, top), f"{int(counts.max()):,}", fill="black")
        draw.text((2, top + plot_h - 10), "0", fill="black")
        draw.text((left, top + plot_h + 3), f"{edges[0]:.3g}", fill="black")
        draw.text((left + plot_w - 40, top + plot_h + 3), f"{edges[-1]:.3g}", fill="black")
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def _fmt(value: Any) -> str:
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        x = float(value)
        if math.isnan(x):
            return "n/a"
        return f"{x:.4g}"
    return str(value)


def feature_row(table: pd.DataFrame, key: FeatureKey) -> dict[str, Any]:
    """The scalar columns (all but layer and feature) of the table's row for `key`; {} if absent."""
    missing = [c for c in _KEYS if c not in table.columns]
    if missing:
        raise DataError(f"a statistics table needs columns layer and feature; it has {list(table.columns)}")
    rows = table[(table["layer"] == key[0]) & (table["feature"] == key[1])]
    if rows.empty:
        return {}
    row = rows.iloc[0]
    out: dict[str, Any] = {}
    for column, value in row.items():
        if column in _KEYS or not np.isscalar(value):
            continue
        out[str(column)] = value
    # firing frequency by token type, from a FeatureStats summary's counts
    for kind in ("text", "image"):
        fires, tokens = out.get(f"fires_{kind}"), out.get(f"tokens_{kind}")
        if fires is not None and tokens:
            out[f"firing_frequency_{kind}"] = float(fires) / float(tokens)
    return out


def _rows_by_key(table: pd.DataFrame) -> dict[FeatureKey, pd.DataFrame]:
    """The table's rows grouped by (layer, feature), for `feature_row` on each key without a scan."""
    missing = [c for c in _KEYS if c not in table.columns]
    if missing:
        raise DataError(f"a statistics table needs columns layer and feature; it has {list(table.columns)}")
    return {(int(layer), int(f)): rows for (layer, f), rows in table.groupby(list(_KEYS), sort=False)}


def _pieces(example: ActivatingExample, peak: float) -> list[dict[str, Any]]:
    """Tokens as display pieces; image-token runs collapse to one piece (the heatmap shows them)."""
    pieces: list[dict[str, Any]] = []
    types = example.types()
    i = 0
    while i < len(example.tokens):
        if types[i] == TokenType.IMAGE:
            j = i
            while j < len(types) and types[j] == TokenType.IMAGE:
                j += 1
            acts = example.activations[i:j]
            pieces.append(
                {"kind": "image", "text": f"<image x{j - i}>", "title": f"{j - i} image tokens, max activation {max(acts):.3g}"}
            )
            i = j
            continue
        a = float(example.activations[i])
        kind = "special" if types[i] == TokenType.SPECIAL else "text"
        alpha = min(1.0, max(0.0, a / peak)) if peak > 0 else 0.0
        pieces.append({"kind": kind, "text": example.tokens[i], "alpha": f"{alpha:.3f}", "title": f"activation {a:.3g}"})
        i += 1
    return pieces


def _detection_rows(detection: Any) -> list[tuple[str, str]]:
    if detection is None:
        return []
    if isinstance(detection, Mapping):
        items = detection.items()
    else:
        names = ("balanced_accuracy", "precision", "recall", "f1")
        items = [(n, getattr(detection, n)) for n in names if hasattr(detection, n)]
    return [(str(k), _fmt(v)) for k, v in items]


def _heads_table(heads: pd.DataFrame | None, n: int) -> dict[str, Any] | None:
    if heads is None or heads.empty:
        return None
    score = "score_a" if "score_a" in heads.columns else None
    if score is None:
        raise DataError(f"the heads table needs a score_a column (attribution/heads.parquet); it has {list(heads.columns)}")
    top = heads.reindex(heads[score].abs().sort_values(ascending=False).index).head(n)
    columns = [c for c in ("layer", "head", "score_a", "score_b", "exact") if c in top.columns]
    return {"columns": columns, "rows": [[_fmt(v) for v in row] for row in top[columns].itertuples(index=False)]}


@functools.lru_cache(maxsize=1)
def _environment() -> Any:
    """The dashboards' Jinja2 environment, built once (it caches the compiled templates)."""
    import jinja2

    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        autoescape=True,  # every {{ }} is HTML-escaped; templates never use |safe on data
        undefined=jinja2.StrictUndefined,
    )


def render_feature_page(card: FeatureCard, *, index_href: str = "index.html", top_heads: int = 10) -> str:
    """The HTML of one feature's dashboard."""
    ev = card.evidence
    examples = []
    if ev is not None:
        peak = max((ex.max_activation for ex in ev.examples), default=0.0)
        for ex in sorted(ev.examples, key=lambda e: -e.max_activation):
            record = card.records.get(ex.record_id)
            examples.append(
                {
                    "question": getattr(record, "question", None),
                    "caption": getattr(record, "caption", None),
                    "source": ex.source or "examples",
                    "record_id": ex.record_id,
                    "max_activation": _fmt(ex.max_activation),
                    "pieces": _pieces(ex, peak),
                    "heatmap": data_uri(ex.heatmap_png) if ex.heatmap_png else None,
                }
            )
    histogram = None
    if card.histogram is not None:
        histogram = data_uri(histogram_png(None, binned=card.histogram, title="token activations (statistics pass)"))
    elif card.activations is not None:
        histogram = data_uri(histogram_png(card.activations, title="per-record max activation"))
    page = {
        "title": f"Feature {card.feature_id}",
        "index_href": index_href,
        "explanation": card.explanation,
        "detection": _detection_rows(card.detection),
        "tables": [{"name": name, "rows": [(k, _fmt(v)) for k, v in row.items()]} for name, row in card.tables.items() if row],
        "histogram": histogram,
        "promoted": [(tok, _fmt(logit)) for tok, logit in (ev.promoted_tokens if ev else [])],
        "image_share": _fmt(ev.image_token_share()) if ev is not None else None,
        "examples": examples,
        "heads": _heads_table(card.heads, top_heads),
        "overlays": [(name, data_uri(png)) for name, png in card.overlays.items()],
    }
    return _environment().get_template("feature.html.j2").render(page=page)


def render_index(cards: Sequence[FeatureCard], *, title: str = "Feature dashboards") -> str:
    """The HTML of the index page linking every feature's dashboard."""
    rows = []
    for card in cards:
        ex = card.explanation
        ev = card.evidence
        rows.append(
            {
                "href": card.file_name,
                "feature_id": card.feature_id,
                "description": ex.description if ex else "",
                "score": (ex.measured_score() or "not measured") if ex else "",
                "image_share": _fmt(ev.image_token_share()) if ev else "",
                "n_examples": len(ev.examples) if ev else 0,
            }
        )
    return _environment().get_template("feature_index.html.j2").render(title=title, rows=rows)


def write_dashboards(cards: Sequence[FeatureCard], out_dir: str | Path, *, title: str = "Feature dashboards") -> dict[str, Path]:
    """Write one page per card (L{layer}_F{feature}.html) and index.html under out_dir, atomically."""
    from mmdiff.atomic import write_text

    if not cards:
        raise DataError("no feature cards to write: pass at least one FeatureCard")
    out = Path(out_dir)
    paths: dict[str, Path] = {}
    for card in cards:
        path = out / card.file_name
        write_text(path, render_feature_page(card))
        paths[card.feature_id] = path
    paths["index"] = out / "index.html"
    write_text(paths["index"], render_index(cards, title=title))
    return paths


def write_interp(
    adapter: Any,
    saes: Mapping[int, Any],
    features: pd.DataFrame,
    sources: Mapping[str, Sequence[Any]],
    out_dir: str | Path,
    *,
    explainer: Any = None,
    tables: Mapping[str, pd.DataFrame] | None = None,
    heads: pd.DataFrame | None = None,
    overlays_dir: str | Path | None = None,
    detections: Mapping[str, Any] | None = None,
    grounding: Any = None,
    grounding_records: Sequence[Any] = (),
    task_features: pd.DataFrame | None = None,
    top: Mapping[str, pd.DataFrame] | None = None,
    mass: pd.DataFrame | None = None,
    histograms: Mapping[FeatureKey, tuple[np.ndarray, np.ndarray]] | None = None,
    k: int = 10,
    heatmaps: bool = True,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, Path]:
    """Pipeline stage: top examples, explanations and dashboards of every feature in `features`.

    sources: example source name -> records (e.g. {"VQAv2": vqa, "VSR": vsr}). explainer: any
    object with explain(evidence) (default: the offline explainer). tables: name -> a table with
    layer and feature columns shown on each page (the features table itself is always shown as
    "selection"). heads: attribution/heads.parquet; overlays_dir: attribution/overlays;
    detections: feature id ("L12/F807") -> detection metrics (DetectionMetrics or a dict).
    grounding: a concept source (`interp.grounded.ConceptSource`, e.g. the organism's
    `organism_concepts`) scored on `grounding_records` (held-out records) so each explanation carries
    its grounded concepts and scores (docs/method.md#grounded-explanations); every feature is
    grounded, also one without examples, and each (task, feature) of `task_features` (columns
    layer, feature, task; default: `features` when it has a task column) goes to grounding.parquet,
    with the share of each task's features whose best concept is of its kind in
    match_share.parquet (`grounded.GROUNDING`, `grounded.MATCH_SHARE`). top, mass: the
    statistics stage's top records per source and activation mass (`collect_evidence`), so only
    the records shown are run; histograms: feature -> (bin edges, counts) drawn instead of the
    per-record maxima. Writes under out_dir (the run's interp/): examples.parquet (per-record
    maxima of every scanned source; for a source read from `top`, the records shown),
    explanations.json, dashboards/L{L}_F{f}.html, dashboards/index.html and cards.json (compact cards for
    the report, `interp.cards`). Returns the paths.
    """
    from mmdiff.atomic import write_parquet
    from mmdiff.interp.cards import CARDS_FILE, write_cards
    from mmdiff.interp.examples import collect_evidence, feature_keys
    from mmdiff.interp.explain import OfflineExplainer, write_explanations

    out = Path(out_dir)
    keys = feature_keys(features)
    collected = collect_evidence(
        adapter, saes, keys, sources, k=k, heatmaps=heatmaps, batch_size=batch_size, progress=progress,
        top=top, mass=mass,
    )
    grounded_tables = {}
    grounded = {}
    held_out = None
    if grounding is not None and grounding_records:  # grounded first: the LLM explainer gets it as context
        from mmdiff.interp.examples import token_activations, tokenizer_of
        from mmdiff.interp.grounded import GROUNDING, MATCH_SHARE, ground_observed, grounding_table, match_share_table
        from mmdiff.interp.grounded import observe

        rerun = token_activations(adapter, saes, grounding_records, keys, batch_size=batch_size, progress=progress)
        observed = observe(rerun, keys, grounding, tokenizer_of(adapter))
        held_out = observed.held_out
        grounded = ground_observed(observed, keys)
        for key, g in grounded.items():
            collected.evidence[key] = dataclasses.replace(collected.evidence[key], grounded=g.text)
        if task_features is None and "task" in features.columns:
            task_features = features
        if task_features is not None:
            table = grounding_table(task_features, grounded)
            grounded_tables = {GROUNDING: table, MATCH_SHARE: match_share_table(table)}
    explainer = explainer or OfflineExplainer()
    fired = [key for key in keys if collected.evidence[key].examples]
    evidences = [collected.evidence[key] for key in fired]
    if hasattr(explainer, "explain_many"):  # the LLM explainer runs its requests concurrently
        explained = explainer.explain_many(evidences, progress=progress) if evidences else []
    else:
        explained = [explainer.explain(ev) for ev in evidences]
    explanations = dict(zip(fired, explained))
    if held_out is not None and hasattr(explainer, "client"):  # an LLM explanation: judged on the held-out records
        from mmdiff.interp.heldout import score_llm_explanations
        from mmdiff.interp.scoring import DetectionScorer

        explanations = score_llm_explanations(DetectionScorer(explainer.client), explanations, keys, held_out,
                                              progress=progress)
    if grounded:
        from mmdiff.interp.heldout import grounded_detection

        column = {key: f for f, key in enumerate(keys)}
        explanations = {
            key: dataclasses.replace(ex, grounded={
                **grounded[key].to_dict(), "detection": grounded_detection(held_out, column[key], grounded[key])})
            for key, ex in explanations.items()
        }
    all_tables = {"selection": features, **dict(tables or {})}
    rows_of = {name: _rows_by_key(table) for name, table in all_tables.items()}  # one pass per table, not per feature
    maxima_of = _rows_by_key(collected.maxima)
    by_id = {record.id: record for records in sources.values() for record in records}
    cards = []
    for key in keys:
        maxima = maxima_of.get(key, collected.maxima.iloc[:0])
        card_heads = None
        if heads is not None:
            card_heads = heads[(heads["feature_layer"] == key[0]) & (heads["feature"] == key[1])]
        overlays: dict[str, bytes] = {}
        if overlays_dir is not None:
            found = Path(overlays_dir).glob(f"L{key[0]}F{key[1]}_*.png")
            for path in sorted(found, key=lambda q: (not q.stem.split("_", 1)[1].startswith("top"), q.name)):
                overlays[path.stem.split("_", 1)[1]] = path.read_bytes()
        cards.append(
            FeatureCard(
                layer=key[0],
                feature=key[1],
                evidence=collected.evidence[key],
                explanation=explanations.get(key),
                detection=(detections or {}).get(feature_id(key)),
                tables={name: feature_row(rows_of[name].get(key, table.iloc[:0]), key) for name, table in all_tables.items()},
                activations=maxima["max_activation"].to_numpy(),
                histogram=(histograms or {}).get(key),
                heads=card_heads,
                overlays=overlays,
                records={ex.record_id: by_id[ex.record_id] for ex in collected.evidence[key].examples},
            )
        )
    paths = {"examples": out / "examples.parquet", "explanations": out / "explanations.json"}
    write_parquet(paths["examples"], collected.maxima)
    write_explanations(paths["explanations"], list(explanations.values()))
    for artifact, table in grounded_tables.items():
        paths[Path(artifact.path).stem] = out / Path(artifact.path).name
        write_parquet(paths[Path(artifact.path).stem], table)
    if not grounded_tables:  # an earlier run's ground-truth check does not describe these explanations
        for name in ("grounding.parquet", "match_share.parquet"):
            (out / name).unlink(missing_ok=True)
    dashboards = write_dashboards(cards, out / "dashboards")
    paths["dashboards"] = dashboards["index"]
    paths["cards"] = write_cards(cards, out / CARDS_FILE)  # what the report's feature browser shows
    return paths
