"""Stages, the run directory and its manifest: skip what is done, redo what changed, resume.

A study is a list of stages. Each stage reads files in the run directory (or the model and data
named by the config), writes its own files there atomically, and is recorded in `manifest.json` with
its status, the hash of its inputs (its config section, the hashes of its upstream stages' outputs,
the mmdiff version), package versions, wall seconds and peak memory. A stage whose recorded inputs
hash equals the current one and whose outputs are all present and unchanged is skipped; `force`
redoes it. "Unchanged" is checked cheaply: each output's file count, bytes and newest mtime are
recorded beside its content hash, and only when those moved is the content hashed again, so a
truncated or edited output makes its stage run again (and the run says so). A stage
killed mid-way stays "running" in the manifest and is redone on the next run (stages that run long
keep their own checkpoints inside their output folder and resume from them). A stage marked
`always` (the report, which reads whatever the run holds) runs whenever it is selected.
"""

from __future__ import annotations

import contextlib
import json
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from mmdiff import __version__
from mmdiff.atomic import sha256_json, sha256_tree, tree_stat, write_json, write_text
from mmdiff.distributed import broadcast_object, is_main, on_main
from mmdiff.errors import ConfigError, MMDiffError

MANIFEST = "manifest.json"
CONFIG_FILE = "config.yaml"


@dataclass
class Stage:
    """One step of the study.

    `run(ctx)` does the work and returns a small JSON-able summary. `outputs` are paths relative to
    the run directory that the stage must leave behind; their content hashes feed the inputs hash of
    every stage listed after it in `needs`.
    """

    name: str
    run: Callable[["StageContext"], dict[str, Any] | None]
    outputs: Sequence[str]
    needs: Sequence[str] = ()
    config_key: str | None = None  # the config section whose content is part of the inputs hash
    datasets: Sequence[str] = ()  # the configured datasets the stage reads (part of its inputs hash)
    distributed: bool = False  # under torchrun: every rank runs it (else rank 0 runs it, others wait)
    always: bool = False  # never skipped: it reads whatever the run holds, so no hash says it is current

    @property
    def describe(self) -> str:
        """What the stage does: the first line of its function's docstring."""
        return (self.run.__doc__ or "").strip().split("\n", 1)[0]


@dataclass
class StageContext:
    run_dir: Path
    config: Any  # mmdiff.config.StudyConfig
    stage: Stage
    progress: bool = True
    cache: dict[str, Any] = field(default_factory=dict)  # objects shared between stages of one run
    force: bool = False  # --force: stages with their own checkpoints start over instead of resuming

    def path(self, *parts: str) -> Path:
        p = self.run_dir.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p


def package_versions() -> dict[str, str]:
    versions = {"mmdiff": __version__, "python": platform.python_version()}
    for name in ("torch", "transformers", "safetensors", "numpy", "pyarrow"):
        mod = sys.modules.get(name)
        if mod is None:
            with contextlib.suppress(ImportError):
                mod = __import__(name)
        if mod is not None:
            versions[name] = getattr(mod, "__version__", "?")
    return versions


class PeakMemory:
    """Peak resident memory of this process during a block, in MiB (and CUDA peak when present).

    On Linux the high-water mark is reset on entry via /proc/self/clear_refs, so the figure belongs
    to the block; elsewhere it is the process's peak so far (ru_maxrss).
    """

    def __enter__(self) -> "PeakMemory":
        self._reset = False
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")
            self._reset = True
        with contextlib.suppress(Exception):  # a broken CUDA setup must not fail the stage
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc: object) -> None:
        self.rss_mib = _peak_rss_mib()
        self.cuda_mib = None
        with contextlib.suppress(Exception):
            if torch.cuda.is_available():
                self.cuda_mib = torch.cuda.max_memory_allocated() / 2**20


def _peak_rss_mib() -> float:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class RunDir:
    """The run directory `runs/<name>/` and its manifest."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.manifest_path = self.path / MANIFEST
        self.manifest = self._read_manifest()

    def _read_manifest(self) -> dict[str, Any]:
        if not self.manifest_path.exists():
            return {"mmdiff_version": __version__, "stages": {}}
        try:
            data = json.loads(self.manifest_path.read_text())
        except json.JSONDecodeError as exc:
            raise MMDiffError(
                f"{self.manifest_path} is not valid JSON ({exc}); it is written atomically, so it was "
                "edited by hand or the disk is damaged: delete it to rerun every stage"
            ) from exc
        data.setdefault("stages", {})
        return data

    def save(self) -> None:
        if is_main():  # one writer under torchrun; the other ranks follow rank 0's decisions
            write_json(self.manifest_path, self.manifest)

    def write_config(self, text: str) -> Path:
        """Save the config the run goes by (YAML) as config.yaml, where `mmdiff report` finds it."""
        path = self.path / CONFIG_FILE
        write_text(path, text)
        return path

    def record(self, name: str, **fields: Any) -> None:
        self.manifest["stages"].setdefault(name, {}).update(fields)
        self.save()

    def status(self, name: str) -> dict[str, Any]:
        return self.manifest["stages"].get(name, {})

    def outputs_hash(self, stage: Stage) -> str:
        return sha256_json({o: self.status(stage.name).get("outputs", {}).get(o) for o in stage.outputs})


def config_scope(config: Any, config_key: str | None, datasets: Sequence[str]) -> dict[str, Any]:
    """The part of the config a stage's inputs hash covers: its section and the shared scope."""
    section = None
    if config_key:
        section = getattr(config, config_key)
        section = section.model_dump(mode="json") if hasattr(section, "model_dump") else section
    shared = config.hash_scope(datasets) if hasattr(config, "hash_scope") else None
    return {"config": section, "shared": shared}


def inputs_hash(stage: Stage, config: Any, run_dir: RunDir, stages: dict[str, Stage]) -> str:
    upstream = {n: run_dir.outputs_hash(stages[n]) for n in stage.needs}
    return sha256_json({"stage": stage.name, **config_scope(config, stage.config_key, stage.datasets),
                        "upstream": upstream, "mmdiff": __version__})


def config_mismatch(manifest: dict[str, Any], config: Any) -> list[str]:
    """Finished stages that ran with another config than `config` (the run's config.yaml): each
    records the hash of the config scope it ran with, which is recomputed here. Stages recorded
    before that hash existed are not judged."""
    stale = []
    for name, rec in (manifest.get("stages") or {}).items():
        if rec.get("status") != "done" or "config_hash" not in rec:
            continue
        try:
            scope = config_scope(config, rec.get("config_key"), rec.get("datasets") or [])
        except AttributeError:  # a section this version's config does not have
            scope = None
        if sha256_json(scope) != rec["config_hash"]:
            stale.append(name)
    return stale


def changed_outputs(stage: Stage, run_dir: RunDir) -> list[str]:
    """Outputs of a finished stage that differ from what it recorded: a size or time stamp moved
    (cheap, checked first) and then the content hash differs. Outputs recorded without sizes (an
    older manifest) are not judged."""
    rec = run_dir.status(stage.name)
    stats, hashes = rec.get("output_stats") or {}, rec.get("outputs") or {}
    changed = []
    for o in stage.outputs:
        if o not in stats:
            continue
        if list(tree_stat(run_dir.path / o)) != stats[o] and sha256_tree(run_dir.path / o) != hashes.get(o):
            changed.append(o)
    return changed


def select_stages(
    stages: Sequence[Stage], only: Iterable[str] | None = None, start: str | None = None
) -> list[Stage]:
    names = [s.name for s in stages]
    for n in list(only or []) + ([start] if start else []):
        if n not in names:
            raise ConfigError(f"unknown stage {n!r}; the stages are: {', '.join(names)}")
    if only:
        wanted = set(only)
        return [s for s in stages if s.name in wanted]
    if start:
        return list(stages[names.index(start) :])
    return list(stages)


def resume_note(stage: Stage, run_dir: RunDir) -> str:
    """What an interrupted stage resumes from: the newest checkpoint under each of its outputs
    (stages that run long keep them in folders named step_<n>, as the SAE trainer does)."""
    found = []
    for o in stage.outputs:
        steps = [p for p in (run_dir.path / o).rglob("step_*") if p.is_dir() and p.name[5:].isdigit()]
        if steps:
            newest = max(steps, key=lambda p: int(p.name[5:]))
            found.append(f"{o} at step {int(newest.name[5:])}")
    was = "interrupted" if run_dir.status(stage.name).get("status") == "running" else "failed"
    if found:
        return f"it was {was}: resuming from its checkpoints ({'; '.join(found)}); --force starts over"
    return f"it was {was}: it runs again, reusing what it finished and checks (--force starts over)"


@dataclass
class StageResult:
    name: str
    status: str  # "done" | "skipped" | "failed"
    seconds: float
    summary: dict[str, Any] | None = None


@dataclass
class StageEvent:
    """What `run_stages` tells its `on_event` callback: a stage starts, was skipped or is done."""

    kind: str  # "start" | "skipped" | "done"
    stage: Stage
    step: int  # 1-based position among the selected stages
    total: int  # number of selected stages
    result: StageResult | None = None  # with "skipped" and "done"
    note: str | None = None  # with "start": why a finished stage runs again, or what it resumes


def run_stages(
    stages: Sequence[Stage],
    config: Any,
    run_dir: RunDir,
    *,
    only: Iterable[str] | None = None,
    start: str | None = None,
    force: bool = False,
    progress: bool = True,
    on_event: Callable[[StageEvent], None] | None = None,
    config_text: str | None = None,
) -> list[StageResult]:
    """Run the selected stages in order; skip those done with unchanged inputs and outputs unless
    `force`.

    `only`/`start` restrict which stages run; a selected stage whose upstream stage has never
    finished gets a clear error instead of silently working on missing files. A finished stage
    whose outputs changed since (a truncated file) runs again, and the start event says why.
    `config_text` is written to config.yaml when the first stage other than an `always` one
    starts (or when there is none yet), so a command that fails before, or that only rebuilds the
    report, leaves a finished run's config.yaml as it was.
    """
    by_name = {s.name: s for s in stages}
    selected = select_stages(stages, only, start)
    selected_names = {s.name for s in selected}
    results: list[StageResult] = []
    ctx_cache: dict[str, Any] = {}
    def tell(kind: str, step: int, stage: Stage, result: StageResult | None = None, note: str | None = None) -> None:
        if on_event:
            on_event(StageEvent(kind, stage, step, len(selected), result, note))

    config_written = config_text is None

    for step, stage in enumerate(selected, start=1):

        def decide(stage: Stage = stage) -> tuple[str, str, str | None]:
            for up in stage.needs:
                if up not in selected_names and run_dir.status(up).get("status") != "done":
                    raise MMDiffError(
                        f"stage {stage.name!r} needs the outputs of {up!r}, which has not finished in "
                        f"{run_dir.path}: run it first (mmdiff run --only {up}) or drop --only/--from"
                    )
            h = inputs_hash(stage, config, run_dir, by_name)
            prev = run_dir.status(stage.name)
            outputs_present = all((run_dir.path / o).exists() for o in stage.outputs)
            done = prev.get("status") == "done" and prev.get("inputs_hash") == h and outputs_present
            if not done or force or stage.always:
                return "run", h, resume_note(stage, run_dir) if prev.get("status") in ("running", "failed") else None
            changed = changed_outputs(stage, run_dir)
            if changed:
                return "run", h, (f"its outputs changed since it finished ({', '.join(changed)}): "
                                  "they are not trusted, so the stage runs again")
            return "skip", h, None

        # rank 0 decides from its manifest; every rank follows (one rank alone: a plain call)
        decision, h, note = broadcast_object(on_main(decide))
        if decision == "skip":
            res = StageResult(stage.name, "skipped", 0.0, run_dir.status(stage.name).get("summary"))
            results.append(res)
            tell("skipped", step, stage, res)
            continue
        if not config_written and (not stage.always or not (run_dir.path / CONFIG_FILE).exists()):
            on_main(run_dir.write_config, config_text)  # the config this stage runs with
            config_written = True
        tell("start", step, stage, note=note)
        run_dir.record(stage.name, status="running", inputs_hash=h, started=time.time())
        ctx = StageContext(run_dir.path, config, stage, progress=progress, cache=ctx_cache, force=force)
        t0 = time.perf_counter()
        try:
            with PeakMemory() as mem:
                summary = (stage.run(ctx) if stage.distributed else on_main(stage.run, ctx)) or {}
        except BaseException as exc:
            run_dir.record(stage.name, status="failed", error=f"{type(exc).__name__}: {exc}",
                           seconds=round(time.perf_counter() - t0, 3))
            raise
        seconds = time.perf_counter() - t0

        def finish(summary: dict[str, Any] = summary, seconds: float = seconds) -> None:
            missing = [o for o in stage.outputs if not (run_dir.path / o).exists()]
            if missing:
                run_dir.record(stage.name, status="failed", error=f"missing outputs {missing}")
                raise MMDiffError(f"stage {stage.name!r} finished without writing {missing}: this is a bug")
            run_dir.record(
                stage.name,
                status="done",
                inputs_hash=h,
                outputs={o: sha256_tree(run_dir.path / o) for o in stage.outputs},
                output_stats={o: list(tree_stat(run_dir.path / o)) for o in stage.outputs},
                config_key=stage.config_key,
                datasets=list(stage.datasets),
                config_hash=sha256_json(config_scope(config, stage.config_key, stage.datasets)),
                versions=package_versions(),
                seconds=round(seconds, 3),
                peak_rss_mib=round(mem.rss_mib, 1),
                peak_cuda_mib=None if mem.cuda_mib is None else round(mem.cuda_mib, 1),
                finished=time.time(),
                summary=summary,
                error=None,
            )

        on_main(finish)
        res = StageResult(stage.name, "done", seconds, summary)
        results.append(res)
        tell("done", step, stage, res)
    return results
