"""Section 2: SAE adaptation: FVU curves by regime, held-out FVU by token type, decoder cosine to the
warm start, spliced-in loss (tables and plots of `mmdiff.sae.training_report`)."""

from __future__ import annotations

from pathlib import Path

from mmdiff.report.sections._common import (
    NOT_RUN,
    Block,
    Section,
    ensure_plot,
    frame_table,
    read,
)

REGIME_NOTE = (
    "Regimes: base = the base-LM SAE on the base LM (the warm start); full / image / text = warm-started "
    "from it and fine-tuned on VLM activations with the loss on all / image / text tokens; random = "
    "same shape, random init (the control)."
)


def sae_section(run_dir: Path) -> Section:
    """Training curves, held-out metrics and decoder cosines of the study's SAEs."""
    from mmdiff.sae import training_report as tr

    section = Section("sae", "SAE adaptation", intro=REGIME_NOTE)
    plots = run_dir / "report"
    curves = read(tr.FVU_CURVES, run_dir, section)
    heldout = read(tr.HELDOUT, run_dir, section)
    cos_layer = read(tr.DECODER_COSINE_BY_LAYER, run_dir, section)
    spliced = read(tr.SPLICED_LOSS, run_dir, section)
    if all(t is None for t in (curves, heldout, cos_layer, spliced)):
        if not section.warnings:
            section.status = NOT_RUN
            section.notes.append("The SAE training stage has not run (no stats/sae_*.parquet).")
        return section

    if curves is not None:
        block = Block("Training FVU vs tokens")
        fig = ensure_plot(
            plots / "sae_fvu_curves.png",
            lambda p: tr.save_figure(tr.plot_fvu_curves(curves), p),
            "FVU during training",
            "Training-batch FVU against tokens seen, one panel per layer, one line per regime (log scale).",
            section,
            run_dir,
            [tr.FVU_CURVES.path_in(run_dir)],
        )
        block.figures += [fig] if fig else []
        last = (
            curves.sort_values("step" if "step" in curves else "tokens")
            .groupby(["regime", "layer"])
            .tail(1)
        )
        block.tables.append(
            frame_table(
                last.sort_values(["layer", "regime"]),
                "Final training step",
                ["regime", "layer", "step", "tokens", "fvu", "l0", "dead_fraction"],
            )
        )
        section.blocks.append(block)
    if heldout is not None:
        block = Block("Held-out FVU by token type")
        vlm = heldout[heldout["side"] == "vlm"] if "side" in heldout else heldout
        fig = ensure_plot(
            plots / "sae_fvu_by_token_type.png",
            lambda p: tr.save_figure(tr.plot_fvu_by_token_type(heldout), p),
            "Held-out FVU, image vs text tokens",
            "FVU = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 on held-out VLM activations, per layer and regime.",
            section,
            run_dir,
            [tr.HELDOUT.path_in(run_dir)],
        )
        block.figures += [fig] if fig else []
        block.tables.append(
            frame_table(
                heldout.sort_values(["side", "layer", "regime"]) if "side" in heldout else heldout,
                "Held-out metrics",
                [
                    "side",
                    "regime",
                    "layer",
                    "n_tokens",
                    "fvu",
                    "fvu_image",
                    "fvu_text",
                    "l0",
                    "dead_fraction",
                ],
                caption="side = which model the SAE is evaluated on (base LM on caption + question, VLM on image + question).",
                max_rows=200,
            )
        )
        if vlm.empty:
            block.notes.append("No held-out rows on the VLM side.")
        section.blocks.append(block)
    if cos_layer is not None:
        block = Block("Decoder cosine to the warm start")
        fig = ensure_plot(
            plots / "sae_decoder_cosine.png",
            lambda p: tr.save_figure(tr.plot_decoder_cosine(cos_layer), p),
            "Mean decoder cosine to the warm start by layer",
            "cos(W_dec_f base, W_dec_f regime), averaged over latents; 1 = the dictionary did not move.",
            section,
            run_dir,
            [tr.DECODER_COSINE_BY_LAYER.path_in(run_dir)],
        )
        block.figures += [fig] if fig else []
        block.tables.append(
            frame_table(
                cos_layer.sort_values(["layer", "regime"]),
                "Decoder cosine by layer",
                ["regime", "layer", "mean_cosine", "median_cosine", "n_latents"],
                max_rows=200,
            )
        )
        section.blocks.append(block)
    if spliced is not None:
        block = Block("Spliced-in next-token loss")
        block.tables.append(
            frame_table(
                spliced.sort_values([c for c in ("side", "layer", "regime") if c in spliced]),
                "Cross-entropy with the SAE reconstruction spliced in",
                [
                    "side",
                    "regime",
                    "layer",
                    "ce_clean",
                    "ce_sae",
                    "ce_zero",
                    "fraction_recovered",
                    "n_targets",
                    "targets",
                ],
                caption="fraction recovered = (CE_zero - CE_sae) / (CE_zero - CE_clean): 1 = as good as clean. "
                "Each side is scored on the next tokens its training made meaningful (targets): the VLM, "
                "instruction-tuned on answers, on the answer tokens (answer + EOS); the base LM, pretrained "
                "on all text, on every text token of caption, question and answer. Scored on the question "
                "words, a VLM's clean CE can be worse than uniform and the fraction leaves [0, 1].",
                max_rows=200,
            )
        )
        section.blocks.append(block)
    return section
