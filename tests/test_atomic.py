import json
import os
import stat

import pandas as pd
import pytest
import torch

from mmdiff import atomic
from mmdiff.atomic import write_text


def test_write_json_replaces_and_leaves_no_temp(tmp_path):
    p = tmp_path / "a" / "x.json"
    atomic.write_json(p, {"a": 1})
    atomic.write_json(p, {"a": 2})
    assert json.loads(p.read_text()) == {"a": 2}
    assert [f.name for f in p.parent.iterdir()] == ["x.json"]


def test_failed_write_keeps_the_old_file(tmp_path):
    p = tmp_path / "x.txt"
    atomic.write_text(p, "old")
    with pytest.raises(RuntimeError):
        with atomic.atomic_path(p) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert p.read_text() == "old"
    assert [f.name for f in tmp_path.iterdir()] == ["x.txt"]


def test_atomic_dir_swaps_whole_directory(tmp_path):
    d = tmp_path / "sae"
    with atomic.atomic_dir(d) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(ValueError):
        with atomic.atomic_dir(d) as tmp:
            (tmp / "b").write_text("2")
            raise ValueError
    assert sorted(f.name for f in d.iterdir()) == ["a"]
    with atomic.atomic_dir(d) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(f.name for f in d.iterdir()) == ["b"]
    assert sorted(f.name for f in tmp_path.iterdir()) == ["sae"]


def test_tree_hash_sees_content_and_names(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_text("x")
    h1 = atomic.sha256_tree(tmp_path / "d")
    (tmp_path / "d" / "f").write_text("y")
    h2 = atomic.sha256_tree(tmp_path / "d")
    (tmp_path / "d" / "f").rename(tmp_path / "d" / "g")
    h3 = atomic.sha256_tree(tmp_path / "d")
    assert len({h1, h2, h3}) == 3


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_files_and_folders_follow_the_umask(tmp_path, umask):
    """A lab sharing a run directory reads it: modes are 0666 / 0777 less the umask, as open() gives."""
    from mmdiff.atomic import atomic_dir, save_safetensors, write_parquet

    old = os.umask(umask)
    try:
        write_text(tmp_path / "a.txt", "x")
        save_safetensors(tmp_path / "w.safetensors", {"t": torch.zeros(2)})
        write_parquet(tmp_path / "t.parquet", pd.DataFrame({"a": [1]}))
        with atomic_dir(tmp_path / "d") as d:
            (d / "f").write_text("y")
    finally:
        os.umask(old)
    for name in ("a.txt", "w.safetensors", "t.parquet"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o777 & ~umask
