import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from mmdiff.errors import ConfigError, MMDiffError
from mmdiff.pipeline import RunDir, Stage, StageEvent, run_stages


class Cfg:
    """A minimal stand-in for StudyConfig: sections are plain dicts."""

    def __init__(self, a=1, b=1):
        self.a = {"value": a}
        self.b = {"value": b}


def make_stages(calls):
    def stage_a(ctx):
        calls.append("a")
        (ctx.run_dir / "a.txt").write_text(str(ctx.config.a["value"]))
        return {"wrote": "a"}

    def stage_b(ctx):
        calls.append("b")
        a = (ctx.run_dir / "a.txt").read_text()
        (ctx.run_dir / "b.txt").write_text(a + "+" + str(ctx.config.b["value"]))

    return [
        Stage("a", stage_a, outputs=["a.txt"], config_key="a"),
        Stage("b", stage_b, outputs=["b.txt"], needs=["a"], config_key="b"),
    ]


def test_skip_when_done_and_inputs_unchanged(tmp_path):
    calls = []
    rd = RunDir(tmp_path)
    res = run_stages(make_stages(calls), Cfg(), rd)
    assert [r.status for r in res] == ["done", "done"] and calls == ["a", "b"]
    res = run_stages(make_stages(calls), Cfg(), RunDir(tmp_path))
    assert [r.status for r in res] == ["skipped", "skipped"] and calls == ["a", "b"]
    m = json.loads((tmp_path / "manifest.json").read_text())["stages"]["a"]
    assert m["status"] == "done" and m["summary"] == {"wrote": "a"}
    assert {"seconds", "peak_rss_mib", "versions", "inputs_hash", "outputs"} <= set(m)
    assert m["versions"]["mmdiff"] and m["versions"]["torch"]


def test_changed_section_reruns_stage_and_its_dependents(tmp_path):
    calls = []
    run_stages(make_stages(calls), Cfg(a=1), RunDir(tmp_path))
    calls.clear()
    run_stages(make_stages(calls), Cfg(a=2), RunDir(tmp_path))
    assert calls == ["a", "b"]  # b reruns because a's output changed
    assert (tmp_path / "b.txt").read_text() == "2+1"
    calls.clear()
    run_stages(make_stages(calls), Cfg(a=2, b=5), RunDir(tmp_path))
    assert calls == ["b"]


def test_force_only_and_from(tmp_path):
    calls = []
    run_stages(make_stages(calls), Cfg(), RunDir(tmp_path))
    calls.clear()
    run_stages(make_stages(calls), Cfg(), RunDir(tmp_path), force=True, only=["b"])
    assert calls == ["b"]
    calls.clear()
    run_stages(make_stages(calls), Cfg(), RunDir(tmp_path), force=True, start="a")
    assert calls == ["a", "b"]
    with pytest.raises(ConfigError, match="unknown stage 'c'"):
        run_stages(make_stages(calls), Cfg(), RunDir(tmp_path), only=["c"])


def test_only_without_finished_upstream_is_a_clear_error(tmp_path):
    with pytest.raises(MMDiffError, match="needs the outputs of 'a'"):
        run_stages(make_stages([]), Cfg(), RunDir(tmp_path), only=["b"])


def test_deleted_output_reruns_stage(tmp_path):
    calls = []
    run_stages(make_stages(calls), Cfg(), RunDir(tmp_path))
    (tmp_path / "b.txt").unlink()
    calls.clear()
    run_stages(make_stages(calls), Cfg(), RunDir(tmp_path))
    assert calls == ["b"]


def test_failure_is_recorded_and_redone(tmp_path):
    state = {"fail": True}

    def flaky(ctx):
        if state["fail"]:
            raise RuntimeError("boom")
        (ctx.run_dir / "x").write_text("ok")

    stages = [Stage("x", flaky, outputs=["x"])]
    with pytest.raises(RuntimeError):
        run_stages(stages, Cfg(), RunDir(tmp_path))
    assert RunDir(tmp_path).status("x")["status"] == "failed"
    assert "boom" in RunDir(tmp_path).status("x")["error"]
    state["fail"] = False
    assert run_stages(stages, Cfg(), RunDir(tmp_path))[0].status == "done"


def test_stage_that_forgets_an_output_fails_loudly(tmp_path):
    stages = [Stage("x", lambda ctx: None, outputs=["missing.txt"])]
    with pytest.raises(MMDiffError, match="without writing"):
        run_stages(stages, Cfg(), RunDir(tmp_path))


def test_kill_mid_stage_keeps_finished_work_and_resumes(tmp_path):
    """SIGKILL during stage b: a stays done, b is redone on the next run."""
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_pipeline import Cfg
        from mmdiff.pipeline import RunDir, Stage, StageEvent, run_stages
        def a(ctx): (ctx.run_dir / "a.txt").write_text("1")
        def b(ctx):
            (ctx.run_dir / "b.partial").write_text("half")
            os.kill(os.getpid(), signal.SIGKILL)
        run_stages([Stage("a", a, ["a.txt"], config_key="a"),
                    Stage("b", b, ["b.txt"], needs=["a"], config_key="b")], Cfg(), RunDir({str(tmp_path)!r}))
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    rd = RunDir(tmp_path)
    assert rd.status("a")["status"] == "done" and rd.status("b")["status"] == "running"
    calls = []
    res = run_stages(make_stages(calls), Cfg(), rd)
    assert [r.status for r in res] == ["skipped", "done"] and calls == ["b"]


def test_corrupt_manifest_is_a_clear_error(tmp_path):
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(MMDiffError, match="delete it"):
        RunDir(tmp_path)


def test_always_stage_runs_every_time_and_events_count_steps(tmp_path):
    calls, events = [], []

    def report(ctx):
        """Rebuilt from whatever the run holds."""
        calls.append("report")
        (ctx.run_dir / "r.html").write_text("r")

    stages = [*make_stages(calls), Stage("report", report, outputs=["r.html"], always=True)]
    run_stages(stages, Cfg(), RunDir(tmp_path))
    res = run_stages(stages, Cfg(), RunDir(tmp_path), on_event=events.append)
    assert [r.status for r in res] == ["skipped", "skipped", "done"] and calls == ["a", "b", "report", "report"]
    assert [(e.kind, e.stage.name, e.step, e.total) for e in events] == [
        ("skipped", "a", 1, 3), ("skipped", "b", 2, 3), ("start", "report", 3, 3), ("done", "report", 3, 3)]
    assert all(isinstance(e, StageEvent) for e in events) and events[-1].result.status == "done"
    assert stages[-1].describe == "Rebuilt from whatever the run holds."
    res = run_stages(stages, Cfg(), RunDir(tmp_path), only=["a"])
    assert [r.name for r in res] == ["a"]  # not selected: not run


# ------------------------------------------------------------------- damaged outputs, config.yaml
def _events(store):
    return lambda event: store.append((event.kind, event.stage.name, event.note))


def test_damaged_finished_output_is_redone_and_said(tmp_path):
    """A finished output truncated afterwards used to be trusted (every stage skipped, rc 0)."""
    calls, events = [], []
    run_stages(make_stages(calls), Cfg(), RunDir(tmp_path))
    (tmp_path / "a.txt").write_text("")  # damaged: size and content differ from what was recorded
    calls.clear()
    run_stages(make_stages(calls), Cfg(), RunDir(tmp_path), on_event=_events(events))
    assert calls == ["a"] and (tmp_path / "a.txt").read_text() == "1"  # as before: b stays done
    (note,) = [n for kind, name, n in events if kind == "start" and name == "a"]
    assert note.startswith("its outputs changed since it finished (a.txt)")
    # touched but unchanged: the size and time stamp moved, the content hash did not
    os.utime(tmp_path / "b.txt", (1, 1))
    calls.clear()
    run_stages(make_stages(calls), Cfg(), RunDir(tmp_path))
    assert calls == []


def test_config_yaml_changes_only_when_a_stage_runs(tmp_path):
    """A command that fails before any stage runs used to overwrite a finished run's config.yaml."""
    run_stages(make_stages([]), Cfg(), RunDir(tmp_path), config_text="first\n")
    assert (tmp_path / "config.yaml").read_text() == "first\n"
    with pytest.raises(ConfigError):
        run_stages(make_stages([]), Cfg(a=2), RunDir(tmp_path), only=["nosuchstage"], config_text="second\n")
    run_stages(make_stages([]), Cfg(), RunDir(tmp_path), config_text="same inputs\n")  # all skipped
    assert (tmp_path / "config.yaml").read_text() == "first\n"
    report = Stage("report", lambda ctx: (ctx.run_dir / "r").write_text("r"), outputs=["r"], always=True)
    run_stages([*make_stages([]), report], Cfg(), RunDir(tmp_path), config_text="report only\n")
    assert (tmp_path / "config.yaml").read_text() == "first\n"
    run_stages(make_stages([]), Cfg(b=3), RunDir(tmp_path), config_text="b changed\n")
    assert (tmp_path / "config.yaml").read_text() == "b changed\n"


def test_config_that_does_not_match_the_manifest_is_found(tmp_path):
    from mmdiff.pipeline import config_mismatch

    run_stages(make_stages([]), Cfg(), RunDir(tmp_path))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert config_mismatch(manifest, Cfg()) == []
    assert config_mismatch(manifest, Cfg(b=2)) == ["b"]


def test_resume_from_a_checkpoint_is_announced(tmp_path):
    def killed(ctx):
        step = ctx.run_dir / "out" / "checkpoint" / "rank_0" / "step_000000120"
        step.mkdir(parents=True)
        raise KeyboardInterrupt

    events = []
    with pytest.raises(KeyboardInterrupt):
        run_stages([Stage("train", killed, outputs=["out"])], Cfg(), RunDir(tmp_path))
    RunDir(tmp_path).record("train", status="running")  # as a SIGKILL leaves it
    run_stages([Stage("train", lambda ctx: None, outputs=["out"])], Cfg(), RunDir(tmp_path),
               on_event=_events(events))
    (note,) = [n for kind, _, n in events if kind == "start"]
    assert note == "it was interrupted: resuming from its checkpoints (out at step 120); --force starts over"
