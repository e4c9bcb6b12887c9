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
