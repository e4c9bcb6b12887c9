"""The command line's contract: one exit-code scheme, help that says what each command writes,
--version, and --no-progress that silences the model-loading bars too."""

import pytest
from typer.testing import CliRunner

from mmdiff import __version__, cli
from mmdiff.errors import EXIT_BAD_INPUT, EXIT_BUG, EXIT_INTERRUPTED


def test_version():
    res = CliRunner().invoke(cli.app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"mmdiff {__version__}"


def _help(*command):
    res = CliRunner().invoke(cli.app, [*command, "--help"])
    assert res.exit_code == 0
    return " ".join(res.output.replace("│", " ").split())  # as one line, whatever the width


def test_stage_commands_say_what_they_write_and_take_a_name():
    train = _help("train")
    assert "--name" in train and "Writes" in train and "saes/base" in train
    run = _help("run")
    assert "--no-progress" in run and "(model loading and downloads included)" in run


def test_interrupt_and_internal_error_codes(monkeypatch, capsys):
    def interrupted(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "load_config", interrupted)
    assert cli.run_cli(["config"]) == EXIT_INTERRUPTED
    assert "interrupted" in capsys.readouterr().err

    def bug(path):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "load_config", bug)
    monkeypatch.setattr("sys.argv", ["mmdiff", "config"])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == EXIT_BUG
    err = capsys.readouterr().err
    assert "RuntimeError" in err and "internal error" in err


def test_failed_dry_run_is_bad_input(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: {vlm: /nonexistent}\n")
    assert cli.run_cli(["run", "--config", str(bad), "--dry-run"]) == EXIT_BAD_INPUT


def test_no_progress_silences_model_loading_bars(monkeypatch, tmp_path):
    import huggingface_hub.utils
    import transformers

    seen = {}

    def fake_run_stages(*args, **kwargs):
        seen["transformers"] = transformers.utils.logging.is_progress_bar_enabled()
        seen["hub"] = not huggingface_hub.utils.are_progress_bars_disabled()
        return []

    monkeypatch.setattr(cli, "check_study", lambda cfg, read_records: [])
    monkeypatch.setattr(cli, "run_stages", fake_run_stages)
    try:
        assert cli.run_cli(["run", "--runs-dir", str(tmp_path), "--no-progress"]) == 0
    finally:
        transformers.utils.logging.enable_progress_bar()
        huggingface_hub.utils.enable_progress_bars()
    assert seen == {"transformers": False, "hub": False}


def test_report_flags_a_config_that_does_not_match_the_manifest(tmp_path, capsys):
    """`mmdiff run --config other.yaml --name existing --only nosuchstage` used to replace config.yaml
    and the report showed it without a warning; a config.yaml edited by hand still can differ."""
    from mmdiff.config import default_config, dump_config
    from mmdiff.pipeline import RunDir, Stage, run_stages

    cfg = default_config()
    stage = Stage("train", lambda ctx: (ctx.run_dir / "t").write_text("t"), outputs=["t"], config_key="train")
    run_stages([stage], cfg, RunDir(tmp_path), config_text=dump_config(cfg))
    assert cli.run_cli(["report", str(tmp_path)]) == 0
    assert "warning" not in capsys.readouterr().err
    other = default_config()
    other.train.k = cfg.train.k + 1
    (tmp_path / "config.yaml").write_text(dump_config(other))
    assert cli.run_cli(["report", str(tmp_path)]) == 0
    assert "is not the config that stages train ran with" in " ".join(capsys.readouterr().err.split())
    html = (tmp_path / "report" / "index.html").read_text()
    assert "config.yaml is not the config that stages train ran with" in html
