from pathlib import Path

import pytest
import yaml

from mmdiff.config import default_config, dump_config, load_config
from mmdiff.errors import ConfigError


def test_default_is_the_organism_study():
    cfg = load_config(None)
    assert cfg.model.vlm == "organism" and cfg.datasets


def test_round_trip_through_yaml(tmp_path):
    cfg = default_config()
    p = tmp_path / "c.yaml"
    p.write_text(dump_config(cfg))
    assert load_config(p) == cfg


def test_unknown_key_is_named(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"model": {"vlm": "x/y", "dtpye": "bf16"}}))
    with pytest.raises(ConfigError, match=r"model\.dtpye: unknown key"):
        load_config(p)


def test_bad_values_and_files(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("layers: [-1]\n")
    with pytest.raises(ConfigError, match="layers"):
        load_config(p)
    p.write_text("layers: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_layers_are_sorted_and_unique(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("layers: [3, 1, 3]\n")
    assert load_config(p).layers == [1, 3]


def test_environment_variables_expand(tmp_path, monkeypatch):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  vlm: ${DATA_ROOT}/llava\n")
    with pytest.raises(ConfigError, match="not set: DATA_ROOT"):
        load_config(p)
    monkeypatch.setenv("DATA_ROOT", "/d")
    assert load_config(p).model.vlm == "/d/llava"


# ------------------------------------------------------------------ one declaration per setting
def test_train_section_is_the_trainers_settings():
    """Every TrainConfig field the study does not set itself is a `train` key with the same default
    and the field's docstring as description; the section builds the trainer's config."""
    import dataclasses

    from mmdiff.config import TRAIN_KEYS, TrainSpec, attribute_docstrings
    from mmdiff.sae.train_config import TrainConfig

    docs = attribute_docstrings(TrainConfig)
    defaults = TrainConfig()
    assert set(TRAIN_KEYS) == {f.name for f in dataclasses.fields(TrainConfig)} - {"regime", "seed", "device"}
    for name in TRAIN_KEYS:
        field = TrainSpec.model_fields[name]
        assert field.description == docs[name] and field.description
        default = field.get_default(call_default_factory=True)
        assert default == getattr(defaults, name) or (name == "buffer_tokens" and default is None)
    assert TrainSpec().train_config(seed=3) == TrainConfig(seed=3)


def test_organism_training_settings_are_unchanged():
    """What the organism's SAEs train with (the values stage_train passed before the section and the
    dataclass became one declaration): the study's results depend on every one of them."""
    from mmdiff.sae.train_config import TrainConfig

    cfg = default_config()
    got = cfg.train.train_config(seed=cfg.seed)
    assert got == TrainConfig(k=16, lr=None, batch_size=512, total_tokens=120_000, expansion_factor=8,
                              checkpoint_every=50, dead_tokens_threshold=20_000, auxk_alpha=1 / 32,
                              seed=0, buffer_tokens=1 << 16)  # fmt: skip
    assert load_config(Path(__file__).parents[1] / "configs" / "organism.yaml") == cfg


def test_llm_section_is_the_clients_settings():
    from mmdiff.config import LLMSpec
    from mmdiff.interp.client import LLMConfig

    spec = LLMSpec(base_url="http://localhost:8000/v1", model="m", temperature=0.5)
    assert spec.llm_config(cache_dir=Path("c")) == LLMConfig(
        base_url="http://localhost:8000/v1", model="m", temperature=0.5, cache_dir=Path("c")
    )
    assert LLMSpec.model_fields["max_retries"].default == 5


def test_trainer_checks_run_when_the_config_is_read(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"train": {"k": 0}}))
    with pytest.raises(ConfigError, match="k must be >= 1"):
        load_config(p)
    p.write_text(yaml.safe_dump({"train": {"batch_size": 512, "buffer_tokens": 256}}))
    with pytest.raises(ConfigError, match="buffer_tokens"):
        load_config(p)
    p.write_text(yaml.safe_dump({"interp": {"llm": {"base_url": "localhost", "model": "m"}}}))
    with pytest.raises(ConfigError, match="http"):
        load_config(p)


def test_unknown_key_error_lists_the_sections_keys(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"train": {"kk": 4}, "datasets": {"a": {"kind": "jsonl", "lmit": 3}}}))
    with pytest.raises(ConfigError) as err:
        load_config(p)
    msg = str(err.value)
    assert "train.kk: unknown key (did you mean 'k'?)" in msg
    assert "datasets.a.lmit: unknown key (did you mean 'limit'?)" in msg
    assert "train.k: int = 50\n" in msg and "Active latents per token" in msg
    assert "datasets.a.limit: int | None = None" in msg
    assert "model.vlm" not in msg  # only the sections with an unknown key


def test_every_key_is_described_by_the_cli():
    from typer.testing import CliRunner

    from mmdiff.cli import app
    from mmdiff.config import config_keys

    out = CliRunner().invoke(app, ["config", "--keys"])
    assert out.exit_code == 0, out.output
    keys = [row[0] for row in config_keys()]
    for key in ("train.k", "train.lr_warmup_steps", "interp.llm.base_url", "datasets.<name>.kind",
                "control.n_boot", "concepts.method"):  # fmt: skip
        assert key in keys and f"{key}: " in out.output
    assert "train.total_tokens: int = 10000000\n    Training stops after" in out.output
