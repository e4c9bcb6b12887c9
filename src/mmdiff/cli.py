"""The `mmdiff` command line: `mmdiff run` for the whole study, and one command per stage.

Every command exits 0 when it did its work, 2 on bad input or config (the message says what was
expected, what was found and what to do; nothing is left half-written), 130 when interrupted
(finished stages are kept) and 1 on an error mmdiff did not expect (a bug: the traceback is shown).
docs/bad_inputs.md lists each class of bad input with its exit code and message.
"""

from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape

from mmdiff.checks import check_study
from mmdiff.config import describe_keys, dump_config, load_config
from mmdiff.distributed import init_distributed, is_main, on_main
from mmdiff import __version__
from mmdiff.errors import (
    EXIT_BAD_INPUT,
    EXIT_BUG,
    EXIT_INTERRUPTED,
    EXIT_OK,
    ConfigError,
    MMDiffError,
    os_error_message,
)
from mmdiff.pipeline import (
    CONFIG_FILE,
    MANIFEST,
    RunDir,
    StageEvent,
    StageResult,
    config_mismatch,
    run_stages,
    select_stages,
)
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
NameOpt = typer.Option(None, "--name", help="Run name: the run directory is RUNS_DIR/NAME (default: the config's name).")
ProgressOpt = typer.Option(True, "--progress/--no-progress",
                           help="Show progress bars (model loading and downloads included); --no-progress for logs.")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mmdiff {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """Multimodal model diffing with sparse autoencoders."""


_RUN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")


def check_run_name(name: str, runs_dir: Path) -> str:
    """A run name is one folder inside --runs-dir: letters, digits, '_', '-', '.', '+', not
    starting with '.' (no '..', no '/'), so a run never writes outside the runs folder."""
    if not _RUN_NAME.fullmatch(name):
        safe = re.sub(r"[^A-Za-z0-9_.+-]+", "_", name).strip("._") or "run"
        raise ConfigError(
            f"run name {name!r} is not a plain folder name: the run directory must sit inside "
            f"--runs-dir ({runs_dir}); use letters, digits, '_', '-', '.' and '+', not starting with "
            f"'.' (e.g. --name {safe}), and --runs-dir to choose where runs go"
        )
    return name


def _quiet_model_loading() -> None:
    """--no-progress: no bars from transformers (loading weights) or the hub (downloads) either."""
    import huggingface_hub.utils
    import transformers

    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()


@app.command()
def run(
    config: Optional[Path] = ConfigOpt,
    runs_dir: Path = RunsOpt,
    name: Optional[str] = NameOpt,
    force: bool = typer.Option(False, "--force", help="Redo stages even when their inputs are unchanged."),
    only: Optional[List[str]] = typer.Option(None, "--only", help="Run only this stage (repeatable)."),
    start: Optional[str] = typer.Option(None, "--from", help="Run this stage and every later one."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate the config and the files it names; load no weights."),
    progress: bool = ProgressOpt,
) -> None:
    """Run the whole study (or some stages) into runs/<name>/, skipping stages already done."""
    cfg = load_config(config)
    if name:
        cfg.name = name
    check_run_name(cfg.name, runs_dir)
    stages = study_stages(cfg)
    select_stages(stages, only, start)  # a misspelt --only / --from is bad input, dry run or not
    # the dry run reads a sample of every dataset; before a real run, names and file headers suffice
    problems = check_study(cfg, read_records=dry_run)
    if dry_run:
        for p in problems:
            console.print(f"[red]x[/red] {escape(p)}")
        if problems:
            raise typer.Exit(EXIT_BAD_INPUT)
        console.print(f"[green]config OK[/green]: {escape(str(config or 'organism default'))}; stages: "
                      + ", ".join(s.name for s in stages))
        try:
            _print_plan(cfg, None)
        except MMDiffError as exc:  # the config is fine; only its cost cannot be sized here
            console.print(f"[yellow]no plan[/yellow]: {exc}")
        return
    if problems:
        raise MMDiffError("the config names things that are not there:\n  " + "\n  ".join(problems))
    if not progress:
        _quiet_model_loading()
    if config is None:
        console.print("[bold]mmdiff[/bold]: no --config given, running the organism study "
                      "(the bundled tiny LLaVA and its shapes world).")
    run_dir = RunDir(runs_dir / cfg.name)
    results = run_stages(stages, cfg, run_dir, only=only, start=start, force=force, progress=progress,
                         on_event=_print_event, config_text=dump_config(cfg))
    _print_summary(results, run_dir.path)


def _print_event(event: StageEvent) -> None:
    stage = event.stage
    if event.kind == "start":
        console.rule(f"[bold]{event.step}/{event.total} {stage.name}[/bold] {escape(stage.describe)}")
        if event.note:
            console.print(f"[yellow]![/yellow] {stage.name}: {escape(event.note)}")
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


def _stage_command(stage: str, doc: str, writes: list[str]) -> None:
    def command(
        config: Optional[Path] = ConfigOpt,
        runs_dir: Path = RunsOpt,
        name: Optional[str] = NameOpt,
        force: bool = typer.Option(False, "--force", help="Redo the stage even when its inputs are unchanged."),
        progress: bool = ProgressOpt,
    ) -> None:
        run(config=config, runs_dir=runs_dir, name=name, force=force, only=[stage], start=None,
            dry_run=False, progress=progress)

    command.__doc__ = doc + (
        f"\n\nRuns the `{stage}` stage of the study config into runs/<name>/ (the stages it reads must "
        f"have finished there). Same as `mmdiff run --only {stage}`."
        f"\n\nWrites (for the organism study; `mmdiff stages -c CONFIG` for yours): {', '.join(writes)}."
    )
    app.command(stage)(command)


def _help_text(fn: object) -> str:
    """A docstring with one line per paragraph, which the help reflows to the terminal's width."""
    return "\n\n".join(" ".join(p.split()) for p in inspect.cleandoc(fn.__doc__ or "").split("\n\n"))


_ORGANISM_OUTPUTS = {s.name: list(s.outputs) for s in study_stages(load_config(None))}
for _name, _fn in STAGE_FUNCTIONS.items():
    if _name != "report":  # `mmdiff report RUN_DIR` rebuilds it from any run directory
        _stage_command(_name, _help_text(_fn), _ORGANISM_OUTPUTS.get(_name, []))


organism_app = typer.Typer(help="The bundled model organism: a tiny Llama base LM and its LLaVA VLM, "
                           "fine-tuned on the procedural shapes world.", no_args_is_help=True)
app.add_typer(organism_app, name="organism")


@organism_app.command("build")
def organism_build(
    out_dir: Path = typer.Argument(..., help="Where to write base_lm/, vlm/ and organism.json."),
    recipe: Optional[Path] = typer.Option(
        None, "--recipe", help="A JSON recipe (OrganismConfig fields) or a built organism's organism.json "
        "to rebuild; default: the shipped recipe."),
    base_from: Optional[Path] = typer.Option(
        None, "--base-from", help="A built organism whose base LM is this recipe's first phase (same "
        "first-phase settings, no grounding phase): reused instead of retrained; the result is the same."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Rebuild the organism from scratch, deterministically (base LM on text, then LLaVA's two stages)."""
    import json

    from mmdiff.organism import OrganismConfig, build_organism
    from mmdiff.organism.build import describe_world_differences, world_differences

    config = OrganismConfig.from_file(recipe) if recipe is not None else None
    if recipe is not None:
        differ = world_differences(json.loads(recipe.read_text(encoding="utf-8")))
        if differ:
            raise ConfigError(
                f"{recipe} was built in another shapes world ({describe_world_differences(differ)}), so its recipe would train another "
                "organism here; set mmdiff.data.shapes.world's settings to its organism.json \"world\" to "
                "rebuild it, or pass its \"recipe\" dict alone to build that recipe in today's world")
    manifest = build_organism(out_dir, config, progress=progress, base_from=base_from)
    seconds = manifest.get("seconds") if isinstance(manifest, dict) else None
    typer.echo(f"organism written to {out_dir.resolve()}" + (f" in {seconds}" if seconds else ""))


@organism_app.command("eval")
def organism_eval(
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Default: the shipped checkpoint."),
    split: str = typer.Option("test", help="Shapes split: train, validation or test."),
    n_per_task: int = typer.Option(200, help="Records per question family."),
    record: bool = typer.Option(False, "--record", help="Also keep the figures in the checkpoint's organism.json "
                                "(evaluation, and the 16-record evaluation_sample the tests re-check); test split only."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Per-task accuracy of the VLM and of the base LM (given the caption), and the VLM's attack success rate."""
    from rich.table import Table

    from mmdiff.organism import evaluate_organism

    from mmdiff.organism.targets import check_targets

    if record:
        from mmdiff.organism import checkpoint_path
        from mmdiff.organism.evaluate import record_evaluation

        if split != "test":
            raise ConfigError("--record keeps the test split's figures; drop --split or --record")
        res = record_evaluation(checkpoint or checkpoint_path(), n_per_task=n_per_task, progress=progress)
    else:
        res = evaluate_organism(checkpoint, split=split, n_per_task=n_per_task, progress=progress)
    table = Table(title=f"organism on the {split} split ({n_per_task} per task; 95% bootstrap intervals)")
    table.add_column("task")
    table.add_column("VLM (image)")
    table.add_column("base LM (caption)")
    table.add_column("floor")

    def _iv(r: dict, key: str) -> str:
        iv = r["intervals"][key]
        return f"{iv['value']:.2f} [{iv['lo']:.2f}, {iv['hi']:.2f}]"

    for fam in sorted(set(res.get("vlm", {})) | set(res.get("base", {}))):
        cells = []
        floor = "-"
        for side in ("vlm", "base"):
            r = res.get(side, {}).get(fam)
            if r is None:
                cells.append("-")
            elif "asr" in r:
                cells.append(f"ASR {_iv(r, 'asr')}, refusals {_iv(r, 'refusal_rate')}")
            else:
                cells.append(_iv(r, "accuracy"))
                floor = f"{r['floor']:.2f}"
        table.add_row(fam, *cells, floor)
    console = Console()
    differ = res.get("world_differences") or {}
    if differ:
        from mmdiff.organism.build import describe_world_differences

        console.print(f"[yellow]warning[/yellow]: the records were drawn in another shapes world than this checkpoint "
                      f"was built in ({escape(describe_world_differences(differ))}), so the figures below measure it on data it was not trained "
                      "on; set mmdiff.data.shapes.world's settings to the checkpoint's (organism.json \"world\") "
                      "to measure it in its own world")
    console.print(table)
    targets = Table(title="targets (mmdiff.organism.targets)")
    for col in ("target", "measured", "met"):
        targets.add_column(col)
    for target, measured, met in check_targets(res):
        targets.add_row(target.name, measured, "n/a" if met is None else ("yes" if met else "[red]no[/red]"))
    console.print(targets)


@app.command()
def report(run_dir: Path = typer.Argument(..., help="A run directory, e.g. runs/organism.")) -> None:
    """Rebuild the study's HTML report (report/index.html) from what a run directory holds."""
    import json

    from mmdiff.report.build import build_report

    manifest = _run_manifest(run_dir)
    cfg_path = run_dir / CONFIG_FILE
    cfg = load_config(cfg_path) if cfg_path.exists() else None
    if cfg is not None:
        stale = config_mismatch(json.loads(manifest.read_text()), cfg)
        if stale:
            console.print(f"[yellow]warning[/yellow]: {escape(str(cfg_path))} is not the config that "
                          f"stages {', '.join(stale)} ran with; the report marks it")
    typer.echo(str(build_report(run_dir, cfg).resolve()))


@app.command()
def plan(
    config: Optional[Path] = ConfigOpt,
    device: Optional[str] = typer.Option(None, "--device", help="cpu, h100, h200, a100, a100-40gb, "
                                         "l40s or l4 (default: the config's device; cuda = h100)."),
    against: Optional[Path] = typer.Option(
        None, "--against", help="A finished run directory: print the plan of its config beside the seconds "
        "and peak memory its manifest measured, with the ratios."),
) -> None:
    """Predict each stage's tokens, FLOPs, peak memory, disk and wall time, loading no weights."""
    if against is None:
        _print_plan(load_config(config), device)
        return
    import json

    from mmdiff.plan import check_against_run, check_text, device_for, plan_study

    manifest = _run_manifest(against)
    cfg_path = against / CONFIG_FILE
    cfg = load_config(config if config is not None else (cfg_path if cfg_path.is_file() else None))
    found, _ = device_for(cfg, device)
    result = plan_study(cfg, found)
    typer.echo("\n".join(check_text(result, check_against_run(result, json.loads(manifest.read_text())))))


def _run_manifest(run_dir: Path) -> Path:
    """run_dir's manifest, or a ConfigError saying what a run directory is."""
    if not run_dir.exists():
        raise ConfigError(f"{run_dir} does not exist: expected a run directory, e.g. runs/organism")
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is a file: expected a run directory (a folder `mmdiff run` wrote, "
                          "holding manifest.json), e.g. runs/organism")
    if not (run_dir / MANIFEST).is_file():
        raise ConfigError(f"{run_dir} is not a run directory: it has no {MANIFEST}, which `mmdiff run` "
                          "writes first; give the folder of one run, e.g. runs/organism")
    return run_dir / MANIFEST


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
def show_config(
    config: Optional[Path] = ConfigOpt,
    keys: bool = typer.Option(False, "--keys", help="List every config key: type, default, description."),
) -> None:
    """Print the resolved study config as YAML (the organism study when no file is given)."""
    typer.echo(describe_keys() if keys else dump_config(load_config(config)))


def run_cli(argv: list[str] | None = None) -> int:
    """Run one command (argv after `mmdiff`; default sys.argv) and return its exit code, printing
    bad input as one message and only bugs as tracebacks."""
    try:
        # standalone: usage errors print themselves and exit 2, Ctrl-C exits 130, --help / --version 0
        app(args=argv, prog_name="mmdiff")
        code: object = EXIT_OK
    except SystemExit as exc:
        code = exc.code
    except MMDiffError as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}")
        return EXIT_BAD_INPUT
    except OSError as exc:
        message = os_error_message(exc)
        if message is None:
            raise
        console.print(f"[red]error:[/red] {escape(message)}")
        return EXIT_BAD_INPUT
    if code == EXIT_INTERRUPTED:  # typer turns Ctrl-C into exit code 130
        console.print("[yellow]interrupted[/yellow]: finished stages are kept; run again to resume")
    return code if isinstance(code, int) else EXIT_BUG if code else EXIT_OK


def main() -> None:
    # under torchrun: join the process group; ranks other than 0 print nothing. The long timeout
    # lets ranks wait while rank 0 runs a stage alone (torchrun stops every rank if one dies).
    init_distributed(timeout_s=7 * 24 * 3600)
    console.quiet = not is_main()
    try:
        code = run_cli()
    except Exception:
        console.print_exception()
        console.print(f"[red]internal error[/red]: mmdiff {__version__} did not expect this; please report "
                      "it with the traceback above")
        code = EXIT_BUG
    sys.exit(code)


if __name__ == "__main__":
    main()
