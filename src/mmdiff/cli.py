"""The `mmdiff` command line: `mmdiff run` for the whole study, and one command per stage."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from mmdiff.checks import check_study
from mmdiff.config import dump_config, load_config
from mmdiff.distributed import init_distributed, is_main, on_main
from mmdiff.errors import MMDiffError
from mmdiff.pipeline import CONFIG_FILE, RunDir, StageEvent, StageResult, run_stages
from mmdiff.study import STAGE_FUNCTIONS, study_stages

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
    cfg = load_config(config)
    if name:
        cfg.name = name
    stages = study_stages(cfg)
    # the dry run reads a sample of every dataset; before a real run, names and file headers suffice
    problems = check_study(cfg, read_records=dry_run)
    if dry_run:
        for p in problems:
            console.print(f"[red]x[/red] {p}")
        if problems:
            raise typer.Exit(1)
        console.print(f"[green]config OK[/green]: {config or 'organism default'}; stages: "
                      + ", ".join(s.name for s in stages))
        try:
            _print_plan(cfg, None)
        except MMDiffError as exc:  # the config is fine; only its cost cannot be sized here
            console.print(f"[yellow]no plan[/yellow]: {exc}")
        return
    if problems:
        raise MMDiffError("the config names things that are not there:\n  " + "\n  ".join(problems))
    if config is None:
        console.print("[bold]mmdiff[/bold]: no --config given, running the organism study "
                      "(the bundled tiny LLaVA and its shapes world).")
    run_dir = RunDir(runs_dir / cfg.name)
    on_main(run_dir.write_config, dump_config(cfg))
    results = run_stages(stages, cfg, run_dir, only=only, start=start, force=force, progress=progress,
                         on_event=_print_event)
    _print_summary(results, run_dir.path)


def _print_event(event: StageEvent) -> None:
    stage = event.stage
    if event.kind == "start":
        console.rule(f"[bold]{event.step}/{event.total} {stage.name}[/bold] {stage.describe}")
    elif event.kind == "skipped":
        console.print(f"[dim]- {stage.name}: done earlier with the same inputs, skipped (--force redoes it)[/dim]")
    elif event.kind == "done" and event.result is not None:
        console.print(f"[green]v[/green] {stage.name} in {event.result.seconds:.1f}s")


def _print_summary(results: list[StageResult], run_dir: Path) -> None:
    console.rule("[bold]summary[/bold]")
    for r in results:
        console.print(f"  {r.name:<12} {r.status:<8} {r.seconds:8.1f}s")
    total = sum(r.seconds for r in results)
    console.print(f"run directory: {run_dir.resolve()}  ({total:.1f}s this time)")
    for r in results:
        if r.name == "report" and r.summary:
            console.print(f"report: {(run_dir / r.summary['path']).resolve()}")


def _stage_command(stage: str, doc: str) -> None:
    def command(
        config: Optional[Path] = ConfigOpt,
        runs_dir: Path = RunsOpt,
        force: bool = typer.Option(False, "--force", help="Redo the stage even when its inputs are unchanged."),
        progress: bool = typer.Option(True, "--progress/--no-progress"),
    ) -> None:
        run(config=config, runs_dir=runs_dir, name=None, force=force, only=[stage], start=None,
            dry_run=False, progress=progress)

    command.__doc__ = doc + (
        f"\n\nRuns the `{stage}` stage of the study config into runs/<name>/ (the stages it reads must "
        f"have finished there). Same as `mmdiff run --only {stage}`."
    )
    app.command(stage)(command)


def _help_text(fn: object) -> str:
    """A docstring with one line per paragraph, which the help reflows to the terminal's width."""
    return "\n\n".join(" ".join(p.split()) for p in inspect.cleandoc(fn.__doc__ or "").split("\n\n"))


for _name, _fn in STAGE_FUNCTIONS.items():
    if _name != "report":  # `mmdiff report RUN_DIR` rebuilds it from any run directory
        _stage_command(_name, _help_text(_fn))


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
    from mmdiff.report.build import build_report

    cfg_path = run_dir / CONFIG_FILE
    cfg = load_config(cfg_path) if cfg_path.exists() else None
    typer.echo(str(build_report(run_dir, cfg).resolve()))


@app.command()
def plan(
    config: Optional[Path] = ConfigOpt,
    device: Optional[str] = typer.Option(None, "--device", help="cpu, h100, h200, a100, a100-40gb, "
                                         "l40s or l4 (default: the config's device; cuda = h100)."),
) -> None:
    """Predict each stage's tokens, FLOPs, peak memory, disk and wall time, loading no weights."""
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
    for s in study_stages(load_config(config)):
        typer.echo(f"{s.name:<12} {s.describe}  -> {', '.join(s.outputs)}")


@app.command("config")
def show_config(config: Optional[Path] = ConfigOpt) -> None:
    """Print the resolved study config as YAML (the organism study when no file is given)."""
    typer.echo(dump_config(load_config(config)))


def main() -> None:
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
