import json

import pytest

from mmdiff import atomic


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
