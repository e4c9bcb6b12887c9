"""Tables and plots of SAE training: FVU-vs-tokens curves per layer and regime, held-out FVU by
token type, decoder cosine to the warm start per layer (the seed paper's Figures 1, 6 and 7).

Table builders return pandas DataFrames; `plot_*` draw a matplotlib Figure (no pyplot state, no
display); `write_training_report` writes the Parquet tables and PNG files given paths.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from mmdiff.atomic import atomic_path, write_parquet
from mmdiff.errors import DataError
from mmdiff.schema import Artifact, Column

REGIME_ORDER = ("base", "full", "image", "text", "random")
REGIME_COLOURS = {
    "base": "#555555",
    "full": "#1f77b4",
    "image": "#ff7f0e",
    "text": "#2ca02c",
    "random": "#d62728",
}
_REGIME, _LAYER = Column("regime", str, "base, full, image, text or random"), Column("layer", int)
FVU_CURVES = Artifact(
    "stats/sae_fvu_curves.parquet", "fvu_curves", required=("regime", "layer", "tokens", "fvu"),
    columns=(_REGIME, _LAYER, Column("step", int), Column("tokens", int), Column("fvu", float, "training batch"),
             Column("l0", float), Column("dead_fraction", float)),
)
HELDOUT = Artifact(
    "stats/sae_heldout.parquet", "heldout_table", open=True,
    doc="One row per (regime, side, layer); the other columns are SAEEvaluation.row()'s fields.",
    required=("regime", "layer", "fvu", "fvu_image", "fvu_text"),
    columns=(_REGIME, Column("side", str, "vlm or base"), _LAYER, Column("fvu", float),
             Column("fvu_image", float), Column("fvu_text", float)),
)
DECODER_COSINE = Artifact(
    "stats/sae_decoder_cosine.parquet", "decoder_cosine_tables",
    columns=(_REGIME, _LAYER, Column("latent", int), Column("cosine", float, "to the warm start")),
)
DECODER_COSINE_BY_LAYER = Artifact(
    "stats/sae_decoder_cosine_by_layer.parquet", "decoder_cosine_tables",
    required=("regime", "layer", "mean_cosine"),
    columns=(_REGIME, _LAYER, Column("mean_cosine", float), Column("median_cosine", float),
             Column("n_latents", int)),
)
SPLICED_LOSS = Artifact(
    "stats/sae_spliced_loss.parquet", "spliced_loss", open=True, required=("regime", "layer"),
    doc="Language-model loss with the SAE's reconstruction spliced in, per (regime, side, layer).",
    columns=(_REGIME, Column("side", str), _LAYER),
)  # fmt: skip


def _order(regimes: Iterable[str]) -> list[str]:
    regimes = list(dict.fromkeys(regimes))
    return [r for r in REGIME_ORDER if r in regimes] + sorted(
        r for r in regimes if r not in REGIME_ORDER
    )


def fvu_curves(
    metrics: Mapping[str, pd.DataFrame | list[dict[str, Any]] | str | Path],
) -> pd.DataFrame:
    """One table of training FVU vs tokens: rows (regime, layer, step, tokens, fvu, l0, dead_fraction).

    metrics: per regime, the trainer's per-step rows (a list of dicts, a DataFrame, or the path of
    its train_metrics.parquet).
    """
    frames = []
    for regime, m in metrics.items():
        df = pd.read_parquet(m) if isinstance(m, (str, Path)) else pd.DataFrame(m)
        missing = {"layer", "step", "tokens", "fvu"} - set(df.columns)
        if missing:
            raise DataError(
                f"training metrics of regime {regime!r} lack columns {sorted(missing)}: "
                "pass the trainer's train_metrics.parquet or TrainResult.metrics"
            )
        df = df.assign(regime=regime)
        for col in ("l0", "dead_fraction"):
            if col not in df:
                df[col] = float("nan")
        frames.append(df[list(FVU_CURVES.names)])
    if not frames:
        return FVU_CURVES.empty()
    return pd.concat(frames, ignore_index=True).sort_values(
        ["regime", "layer", "step"], ignore_index=True
    )


def heldout_table(rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """Held-out metrics, one row per (regime, side, layer): fvu, fvu_image, fvu_text, l0, dead_fraction.

    rows: dicts with "regime" (and optionally "side") plus `SAEEvaluation.row()` fields.
    """
    df = pd.DataFrame(list(rows))
    if df.empty:
        return df
    if "side" not in df:
        df["side"] = "vlm"
    first = ["regime", "side", "layer"]
    return df[first + [c for c in df.columns if c not in first]].sort_values(
        first, ignore_index=True
    )


def decoder_cosine_tables(
    cosines: Mapping[str, Mapping[int, Any]],
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per-latent table (regime, layer, latent, cosine), per-layer table (regime, layer, mean, median, n)).

    cosines: per regime, per layer, the [d_sae] decoder cosines to the warm start
    (`mmdiff.sae.metrics.decoder_cosine`).
    """
    per_latent = []
    for regime, by_layer in cosines.items():
        for layer, cos in by_layer.items():
            values = [float(v) for v in (cos.tolist() if hasattr(cos, "tolist") else cos)]
            per_latent.append(
                pd.DataFrame(
                    {
                        "regime": regime,
                        "layer": int(layer),
                        "latent": range(len(values)),
                        "cosine": values,
                    }
                )
            )
    if not per_latent:
        return DECODER_COSINE.empty(), DECODER_COSINE_BY_LAYER.empty()
    latents = pd.concat(per_latent, ignore_index=True)
    per_layer = (
        latents.groupby(["regime", "layer"], sort=True)["cosine"]
        .agg(mean_cosine="mean", median_cosine="median", n_latents="size")
        .reset_index()
    )
    return latents, per_layer


# --------------------------------------------------------------------------------------------- plots


def plot_fvu_curves(curves: pd.DataFrame):
    """Figure 1 analogue: training FVU vs tokens, one panel per layer, one line per regime."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    layers = sorted(curves["layer"].unique()) if not curves.empty else []
    fig = Figure(figsize=(4 * max(1, len(layers)), 3.2), layout="constrained")
    axes = fig.subplots(1, max(1, len(layers)), squeeze=False)[0]
    for ax, layer in zip(axes, layers):
        sub = curves[curves["layer"] == layer]
        for regime in _order(sub["regime"]):
            r = sub[sub["regime"] == regime]
            ax.plot(r["tokens"], r["fvu"], label=regime, color=REGIME_COLOURS.get(regime))
        ax.set_title(f"layer {layer}")
        ax.set_xlabel("training tokens")
        ax.set_ylabel("FVU (training batches)")
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(4))
        ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4))
        ax.legend(fontsize=8)
    return fig


def plot_fvu_by_token_type(heldout: pd.DataFrame, side: str = "vlm"):
    """Figure 6 analogue: held-out FVU per layer, image vs text tokens, one panel per regime."""
    from matplotlib.figure import Figure

    df = heldout[heldout["side"] == side] if "side" in heldout else heldout
    regimes = _order(df["regime"]) if not df.empty else []
    fig = Figure(figsize=(3.6 * max(1, len(regimes)), 3.2), layout="constrained")
    axes = fig.subplots(1, max(1, len(regimes)), squeeze=False, sharey=True)[0]
    for ax, regime in zip(axes, regimes):
        r = df[df["regime"] == regime].sort_values("layer")
        x = range(len(r))
        ax.bar(
            [i - 0.2 for i in x], r["fvu_image"], width=0.4, label="image tokens", color="#ff7f0e"
        )
        ax.bar([i + 0.2 for i in x], r["fvu_text"], width=0.4, label="text tokens", color="#2ca02c")
        ax.set_xticks(list(x), [str(v) for v in r["layer"]])
        ax.set_title(regime)
        ax.set_xlabel("layer")
    axes[0].set_ylabel(f"held-out FVU ({side} run)")
    if regimes:
        fig.legend(
            *axes[0].get_legend_handles_labels(), loc="outside upper center", ncols=2, fontsize=8
        )
    return fig


def plot_decoder_cosine(per_layer: pd.DataFrame):
    """Figure 7 analogue: mean decoder cosine to the warm start by layer, one line per regime."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(4.5, 3.2), layout="constrained")
    ax = fig.subplots()
    for regime in _order(per_layer["regime"]) if not per_layer.empty else []:
        r = per_layer[per_layer["regime"] == regime].sort_values("layer")
        ax.plot(
            r["layer"], r["mean_cosine"], marker="o", label=regime, color=REGIME_COLOURS.get(regime)
        )
    ax.set_xlabel("layer")
    ax.set_ylabel("mean decoder cosine to warm start")
    low = float(per_layer["mean_cosine"].min()) if not per_layer.empty else 0.0
    ax.set_ylim(min(-0.05, low - 0.05), 1.05)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=8)
    return fig


def save_figure(fig: Any, path: str | Path, dpi: int = 120) -> Path:
    """Write a matplotlib Figure as PNG atomically."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return Path(path)


def write_training_report(
    tables_dir: str | Path,
    plots_dir: str | Path,
    curves: pd.DataFrame,
    heldout: pd.DataFrame | None = None,
    cosines: Mapping[str, Mapping[int, Any]] | None = None,
    spliced: pd.DataFrame | None = None,
    *,
    plots: bool = True,
) -> dict[str, Path]:
    """Write the Parquet tables and (with `plots`) PNG plots of SAE training; returns {name: path}."""
    tables_dir, plots_dir = Path(tables_dir), Path(plots_dir)
    written: dict[str, Path] = {}

    def write(name: str, artifact: Artifact, df: pd.DataFrame) -> None:
        written[name] = tables_dir / Path(artifact.path).name
        write_parquet(written[name], artifact.validate(df))

    write("fvu_curves", FVU_CURVES, curves)
    if plots:
        written["fvu_curves_png"] = save_figure(
            plot_fvu_curves(curves), plots_dir / "sae_fvu_curves.png"
        )
    if heldout is not None and not heldout.empty:
        write("heldout", HELDOUT, heldout)
        if plots:
            written["fvu_by_token_type_png"] = save_figure(
                plot_fvu_by_token_type(heldout), plots_dir / "sae_fvu_by_token_type.png"
            )
    if cosines:
        latents, per_layer = decoder_cosine_tables(cosines)
        write("decoder_cosine", DECODER_COSINE, latents)
        write("decoder_cosine_by_layer", DECODER_COSINE_BY_LAYER, per_layer)
        if plots:
            written["decoder_cosine_png"] = save_figure(
                plot_decoder_cosine(per_layer), plots_dir / "sae_decoder_cosine.png"
            )
    if spliced is not None and not spliced.empty:
        write("spliced_loss", SPLICED_LOSS, spliced)
    return written
