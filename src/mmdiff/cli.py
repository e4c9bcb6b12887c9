"""The `mmdiff` command line: `mmdiff run` for the whole study, and one command per stage."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from mmdiff.errors import MMDiffError

app = typer.Typer(
    name="mmdiff",
    help=(
        "Multimodal model diffing with sparse autoencoders: find what multimodal fine-tuning changed "
        "in a VLM's language backbone, and audit, ablate and steer it.\n\n"
        "`mmdiff run` runs the whole study (on the bundled model organism when no --config is given); "
        "the other commands run one stage alone."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)

ConfigOpt = typer.Option(None, "--config", "-c", help="Study config (YAML). Default: the organism study.")
RunsOpt = typer.Option(Path("runs"), "--runs-dir", help="Parent folder of run directories.")


@app.command()
def run(
    config: Optional[Path] = ConfigOpt,
    runs_dir: Path = RunsOpt,
    name: Optional[str] = typer.Option(None, "--name", help="Run name (default: the config's name)."),
    force: bool = typer.Option(False, "--force", help="Redo stages even when their inputs are unchanged."),
    only: Optional[List[str]] = typer.Option(None, "--only", help="Run only this stage (repeatable)."),
    start: Optional[str] = typer.Option(None, "--from", help="Run this stage and every later one."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate the config and the files it names; load no weights."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """Run the whole study (or some stages) into runs/<name>/, skipping stages already done."""
    from mmdiff.config import dump_config, load_config
    from mmdiff.pipeline import RunDir, run_stages
    from mmdiff.study import check_config, study_stages

    cfg = load_config(config)
    if name:
        cfg.name = name
    # the dry run reads a sample of every dataset; before a real run, names and file headers suffice
    problems = check_config(cfg, full=dry_run)
    if dry_run:
        if problems:
            for p in problems:
                console.print(f"[red]x[/red] {p}")
            raise typer.Exit(1)
        console.print(f"[green]config OK[/green]: {config or 'organism default'}; stages: "
                      + ", ".join(s.name for s in study_stages(cfg)))
        try:
            _print_plan(cfg, None)
        except MMDiffError as exc:  # the config is fine; only its cost cannot be sized here
            console.print(f"[yellow]no plan[/yellow]: {exc}")
        return
    if problems:
        raise MMDiffError("the config names things that are not there:\n  " + "\n  ".join(problems))
    run_dir = RunDir(runs_dir / cfg.name)
    from mmdiff.atomic import write_text

    from mmdiff.distributed import on_main

    on_main(write_text, run_dir.path / "config.yaml", dump_config(cfg))
    if config is None:
        console.print("[bold]mmdiff[/bold]: no --config given, running the organism study "
                      "(the bundled tiny LLaVA and its shapes world).")

    from mmdiff.pipeline import select_stages

    planned = [s.name for s in select_stages(study_stages(cfg), only, start)]

    def on_event(kind, stage, res):  # type: ignore[no-untyped-def]
        if kind == "start":
            step = planned.index(stage.name) + 1
            console.rule(f"[bold]{step}/{len(planned)} {stage.name}[/bold] {stage.describe}")
        elif kind == "skipped":
            console.print(f"[dim]- {stage.name}: done earlier with the same inputs, skipped (--force redoes it)[/dim]")
        elif kind == "done":
            console.print(f"[green]v[/green] {stage.name} in {res.seconds:.1f}s")

    results = run_stages(study_stages(cfg), cfg, run_dir, only=only, start=start, force=force,
                         progress=progress, on_event=on_event)
    report_seconds = None
    if not only:
        # always rebuilt from what the run directory holds, so it is never stale (it takes seconds)
        import time

        from mmdiff.report.build import build_report

        t0 = time.perf_counter()
        on_main(build_report, run_dir.path, cfg)
        report_seconds = time.perf_counter() - t0
    total = sum(r.seconds for r in results) + (report_seconds or 0.0)
    console.rule("[bold]summary[/bold]")
    for r in results:
        console.print(f"  {r.name:<12} {r.status:<8} {r.seconds:8.1f}s")
    if report_seconds is not None:
        console.print(f"  {'report':<12} {'done':<8} {report_seconds:8.1f}s")
    console.print(f"run directory: {run_dir.path.resolve()}  ({total:.1f}s this time)")
    report = run_dir.path / "report" / "index.html"
    if report.exists():
        console.print(f"report: {report.resolve()}")


def _run_one(stage: str, config: Optional[Path], runs_dir: Path, force: bool, progress: bool) -> None:
    run(config=config, runs_dir=runs_dir, name=None, force=force, only=[stage], start=None,
        dry_run=False, progress=progress)


def _stage_command(stage: str, help_text: str) -> None:
    def command(
        config: Optional[Path] = ConfigOpt,
        runs_dir: Path = RunsOpt,
        force: bool = typer.Option(False, "--force", help="Redo the stage even when its inputs are unchanged."),
        progress: bool = typer.Option(True, "--progress/--no-progress"),
    ) -> None:
        _run_one(stage, config, runs_dir, force, progress)

    command.__doc__ = help_text + (
        f"\n\nRuns the `{stage}` stage of the study config into runs/<name>/ (the stages it reads must "
        "have finished there). Same as `mmdiff run --only " + stage + "`."
    )
    app.command(stage)(command)


_stage_command("capture", "Capture residual-stream activations (VLM on image+question, base LM on "
               "caption+question) into resumable activation stores.")
_stage_command("train", "Train the SAEs: base-LM SAEs (unless pretrained ones are given), then warm-started "
               "SAEs on the VLM under each masking regime (full / image / text / random).")
_stage_command("stats", "One statistics pass per side: mean squared activation, firing counts by token type and split, "
               "quantiles and top activating examples of every feature.")
_stage_command("diff", "Adapted features: variance gap, decoder cosine, the two-stage global selection, "
               "relative decoder norm and bootstrap stability.")
_stage_command("detect", "Task features (spatial, OCR, safety) by contrastive firing against generic VQA, "
               "with Fisher/BH significance, the adapted-set intersection and the lexical filter.")
_stage_command("attribute", "Attribution patching of task features to attention heads: methods A and B in two "
               "forwards and one backward each, optional exact patching to validate, attention overlays.")
_stage_command("interp", "Top activating examples with image-patch heatmaps, explanations (offline, or an "
               "OpenAI-compatible LLM) with detection scores, and one HTML dashboard per feature.")
_stage_command("concepts", "Concept shift vectors (docs/method.md#concept-shift-vectors): concepts of the base LM (captions) and the VLM "
               "(images) on the same records, Hungarian-matched, grounded, shifted, and steered.")
_stage_command("ablate", "Remove each task set (project out its decoder directions) and measure every "
               "task, beside frequency-matched random features and mismatched sets, with bootstrap CIs.")
_stage_command("steer", "Steer each task set over a sweep of strengths, against the single-layer "
               "(difference-of-means) baseline at its best layer and strength, with bootstrap CIs.")


organism_app = typer.Typer(help="The bundled model organism: a tiny Llama base LM and its LLaVA VLM, "
                           "fine-tuned on the procedural shapes world.", no_args_is_help=True)
app.add_typer(organism_app, name="organism")


@organism_app.command("build")
def organism_build(
    out_dir: Path = typer.Argument(..., help="Where to write base_lm/, vlm/ and organism.json."),
    recipe: Optional[Path] = typer.Option(
        None, "--recipe", help="A JSON recipe (OrganismConfig fields) or a built organism's organism.json "
        "to rebuild; default: the shipped recipe."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Rebuild the organism from scratch, deterministically (base LM on text, then LLaVA's two stages)."""
    from mmdiff.organism import OrganismConfig, build_organism

    config = OrganismConfig.from_file(recipe) if recipe is not None else None
    manifest = build_organism(out_dir, config, progress=progress)
    seconds = manifest.get("seconds") if isinstance(manifest, dict) else None
    typer.echo(f"organism written to {out_dir.resolve()}" + (f" in {seconds}" if seconds else ""))


@organism_app.command("eval")
def organism_eval(
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Default: the shipped checkpoint."),
    split: str = typer.Option("test", help="Shapes split: train, validation or test."),
    n_per_task: int = typer.Option(200, help="Records per question family."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Per-task accuracy of the VLM and of the base LM (given the caption), and the VLM's attack success rate."""
    from rich.table import Table

    from mmdiff.organism import evaluate_organism

    res = evaluate_organism(checkpoint, split=split, n_per_task=n_per_task, progress=progress)
    table = Table(title=f"organism on the {split} split ({n_per_task} per task)")
    table.add_column("task")
    table.add_column("VLM (image)")
    table.add_column("base LM (caption)")
    for fam in sorted(set(res.get("vlm", {})) | set(res.get("base", {}))):
        cells = []
        for side in ("vlm", "base"):
            r = res.get(side, {}).get(fam)
            if r is None:
                cells.append("-")
            elif "asr" in r:
                cells.append(f"ASR {r['asr']:.1%}, refusals {r.get('refusal_rate', float('nan')):.1%}")
            else:
                cells.append(f"{r['accuracy']:.1%}")
        table.add_row(fam, *cells)
    Console().print(table)


@app.command()
def report(run_dir: Path = typer.Argument(..., help="A run directory, e.g. runs/organism.")) -> None:
    """Rebuild the study's HTML report (report/index.html) from what a run directory holds."""
    from mmdiff.config import load_config
    from mmdiff.report.build import build_report

    cfg_path = run_dir / "config.yaml"
    cfg = load_config(cfg_path) if cfg_path.exists() else None
    typer.echo(str(build_report(run_dir, cfg).resolve()))


@app.command()
def plan(
    config: Optional[Path] = ConfigOpt,
    device: Optional[str] = typer.Option(None, "--device", help="cpu, h100, h200, a100, a100-40gb, "
                                         "l40s or l4 (default: the config's device; cuda = h100)."),
) -> None:
    """Predict each stage's tokens, FLOPs, peak memory, disk and wall time, loading no weights."""
    from mmdiff.config import load_config

    _print_plan(load_config(config), device)


def _print_plan(cfg, device: Optional[str]) -> None:  # type: ignore[no-untyped-def]
    from mmdiff.plan import device_for, plan_study, plan_text

    found, note = device_for(cfg, device)
    result = plan_study(cfg, found)
    if note:
        result.assumptions.insert(0, note)
    typer.echo("\n".join(plan_text(result)))


@app.command()
def stages(config: Optional[Path] = ConfigOpt) -> None:
    """List the study's stages in order, with what each one writes."""
    from mmdiff.config import load_config
    from mmdiff.study import study_stages

    for s in study_stages(load_config(config)):
        typer.echo(f"{s.name:<12} {s.describe}  -> {', '.join(s.outputs)}")


@app.command("config")
def show_config(config: Optional[Path] = ConfigOpt) -> None:
    """Print the resolved study config as YAML (the organism study when no file is given)."""
    from mmdiff.config import dump_config, load_config

    typer.echo(dump_config(load_config(config)))


def main() -> None:
    from mmdiff.distributed import init_distributed, is_main

    # under torchrun: join the process group; ranks other than 0 print nothing. The long timeout
    # lets ranks wait while rank 0 runs a stage alone (torchrun stops every rank if one dies).
    init_distributed(timeout_s=7 * 24 * 3600)
    console.quiet = not is_main()
    try:
        app()
    except MMDiffError as exc:
        console.print(f"[red]error:[/red] {exc}")
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]: finished stages are kept; run again to resume")
        sys.exit(130)


if __name__ == "__main__":
    main()
