"""Activation store: round trip, token-type filter, deterministic shuffling, kill-and-resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmdiff.activations import ActivationBatch
from mmdiff.errors import StoreError
from mmdiff.store import MANIFEST, ActivationStore, ActivationStoreWriter

LAYERS = [1, 3]
D = 8


def make_batches(
    n_batches: int = 6, batch: int = 3, seq: int = 7, seed: int = 0
) -> list[ActivationBatch]:
    """Padded batches (alternately left- and right-padded) with per-record lengths 1..seq."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n_batches):
        lengths = torch.randint(1, seq + 1, (batch,), generator=g)
        mask = torch.zeros(batch, seq, dtype=torch.long)
        for b, n in enumerate(lengths.tolist()):
            if i % 2:
                mask[b, seq - n :] = 1  # left padding
            else:
                mask[b, :n] = 1
        types = torch.randint(0, 3, (batch, seq), generator=g).to(torch.int8)
        types[mask == 0] = 2
        acts = {L: torch.randn(batch, seq, D, generator=g) for L in LAYERS}
        ids = [f"r{i * batch + b}" for b in range(batch)]
        input_ids = torch.randint(0, 1000, (batch, seq), generator=g)
        out.append(
            ActivationBatch(
                acts=acts,
                token_types=types,
                attention_mask=mask,
                record_ids=ids,
                input_ids=input_ids,
            )
        )
    return out


def expected_tokens(batches: list[ActivationBatch]) -> dict[str, dict[str, torch.Tensor]]:
    exp = {}
    for bt in batches:
        for b, rid in enumerate(bt.record_ids):
            keep = bt.attention_mask[b].bool()
            exp[rid] = {"types": bt.token_types[b][keep], "ids": bt.input_ids[b][keep]}
            exp[rid] |= {L: bt.acts[L][b][keep] for L in LAYERS}
    return exp


def write_store(root: Path, batches, **kw) -> None:
    with ActivationStoreWriter(root, LAYERS, D, **kw) as w:
        for bt in batches:
            w.add(bt)


def store_files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


def test_round_trip_exact_float32(tmp_path):
    batches = make_batches()
    write_store(tmp_path, batches, dtype="float32", shard_tokens=10, input_ids=True)
    store = ActivationStore(tmp_path, verify="hash")
    exp = expected_tokens(batches)
    assert store.complete and store.layers == LAYERS and store.d_model == D
    assert store.num_tokens == sum(len(v["types"]) for v in exp.values())
    assert len(store.shards) > 3  # several shards, each of whole records
    got = {rid: {"types": [], 1: [], 3: [], "pos": [], "ids": []} for rid in exp}
    for bt in store.iter_batches(LAYERS, batch_size=4, shuffle=False):
        for j, ri in enumerate(bt.record_index.tolist()):
            rec = got[store.record_ids[ri]]
            rec["types"].append(bt.token_types[j])
            rec["ids"].append(bt.input_ids[j])
            rec["pos"].append(int(bt.position[j]))
            for L in LAYERS:
                rec[L].append(bt.acts[L][j])
    for rid, e in exp.items():
        g = got[rid]
        assert g["pos"] == list(range(len(e["types"])))  # in order, positions among real tokens
        assert torch.equal(torch.stack(g["types"]), e["types"])
        assert torch.equal(torch.stack(g["ids"]).long(), e["ids"])
        for L in LAYERS:
            assert torch.equal(torch.stack(g[L]), e[L])
    # load_all returns store order = record order here
    assert torch.equal(store.load_all(3), torch.cat([exp[f"r{i}"][3] for i in range(len(exp))]))


def test_float16_default_and_overflow_error(tmp_path):
    batches = make_batches(n_batches=2)
    write_store(tmp_path / "a", batches)
    store = ActivationStore(tmp_path / "a")
    assert store.dtype == torch.float16
    exp = expected_tokens(batches)
    want = torch.cat([exp[f"r{i}"][1] for i in range(6)]).half()
    assert torch.equal(store.load_all(1), want)
    assert next(store.iter_batches(1, 4, dtype=torch.float32)).acts.dtype == torch.float32
    assert next(store.iter_batches(1, 4)).input_ids is None
    big = make_batches(n_batches=1)[0]
    big.acts[1][0, 0, 0] = 1e6
    w = ActivationStoreWriter(tmp_path / "b", LAYERS, D)
    with pytest.raises(StoreError, match="overflow float16.*bfloat16"):
        w.add(big)


def test_token_type_filter(tmp_path):
    batches = make_batches()
    write_store(tmp_path, batches, dtype="float32", shard_tokens=9)
    store = ActivationStore(tmp_path)
    exp = expected_tokens(batches)
    want = torch.cat([exp[f"r{i}"][1][exp[f"r{i}"]["types"] == 1] for i in range(len(exp))])
    assert store.count_tokens([1]) == len(want)
    got = torch.cat([b.acts for b in store.iter_batches(1, 5, token_types=[1], shuffle=False)])
    assert torch.equal(got, want)
    types = torch.cat([b.token_types for b in store.iter_batches(1, 5, token_types=[0, 2], seed=3)])
    assert set(types.tolist()) <= {0, 2} and len(types) == store.count_tokens([0, 2])


def test_shuffle_is_permutation_and_deterministic(tmp_path):
    batches = make_batches(n_batches=10)
    write_store(tmp_path, batches, dtype="float32", shard_tokens=8)
    store = ActivationStore(tmp_path)
    ordered = store.load_all(3)

    def run(seed):
        bs = list(store.iter_batches(3, 6, seed=seed, buffer_tokens=20))
        assert all(len(b.acts) == 6 for b in bs[:-1])
        return torch.cat([b.acts for b in bs])

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, ordered)
    key = lambda x: sorted(map(tuple, x.tolist()))  # noqa: E731
    assert key(a) == key(ordered) == key(c)
    assert len(list(store.iter_batches(3, 6, drop_last=True))) == store.num_batches(
        6, drop_last=True
    )
    # ranks partition the shards
    parts = [
        torch.cat([b.acts for b in store.iter_batches(3, 4, seed=5, rank=r, world_size=2)])
        for r in (0, 1)
    ]
    assert key(torch.cat(parts)) == key(ordered)


def test_resume_skips_stored_records_and_checks_shape(tmp_path):
    batches = make_batches()
    w = ActivationStoreWriter(tmp_path, LAYERS, D, dtype="float32", shard_tokens=10)
    for bt in batches[:3]:
        w.add(bt)
    w.close()
    n_shards = len(ActivationStore(tmp_path).shards)
    w2 = ActivationStoreWriter(tmp_path, LAYERS, D, dtype="float32", shard_tokens=10)
    assert w2.add(batches[0]) == 0  # already stored
    assert w2.has_record("r8") and not w2.has_record("r9")
    assert w2.num_tokens == ActivationStore(tmp_path).num_tokens
    before = w2.num_tokens
    added = w2.append(batches[3])
    assert added > 0 and w2.num_tokens == before + added
    n_shards = len(ActivationStore(tmp_path).shards)
    assert w2.has_record("r9")  # buffered counts as stored for this writer
    with pytest.raises(StoreError, match="layers \\[1, 3\\] with d_model=8.*d_model=16"):
        ActivationStoreWriter(tmp_path, LAYERS, 16, dtype="float32")
    with pytest.raises(StoreError, match="layers \\[1, 3\\].*layers \\[1, 2\\]"):
        ActivationStoreWriter(tmp_path, [1, 2], D, dtype="float32")
    with pytest.raises(StoreError, match="is float32, this capture writes float16"):
        ActivationStoreWriter(tmp_path, LAYERS, D)
    with pytest.raises(StoreError, match="input_ids=False, this capture asks for input_ids=True"):
        ActivationStoreWriter(tmp_path, LAYERS, D, dtype="float32", input_ids=True)
    with pytest.raises(StoreError, match="expected \\[batch=3, seq=7, d_model=8\\]"):
        bad = make_batches(n_batches=7)[6]
        bad.acts[1] = bad.acts[1][..., :4]
        w2.add(bad)
    assert len(ActivationStore(tmp_path).shards) == n_shards


def test_raise_mid_shard_then_resume_equals_uninterrupted(tmp_path, monkeypatch):
    batches = make_batches(n_batches=8)
    write_store(tmp_path / "ref", batches, dtype="float32", shard_tokens=10)

    import mmdiff.store as store_mod

    real = store_mod.write_json
    calls = {"n": 0}

    def failing_write_json(path, obj, **kw):
        calls["n"] += 1
        if calls["n"] == 4:  # 1 = creation, 2-3 = shards 0-1; die after shard 2's rename
            raise RuntimeError("simulated crash")
        return real(path, obj, **kw)

    monkeypatch.setattr(store_mod, "write_json", failing_write_json)
    with pytest.raises(RuntimeError, match="simulated crash"):
        write_store(tmp_path / "cut", batches, dtype="float32", shard_tokens=10)
    monkeypatch.setattr(store_mod, "write_json", real)
    assert (tmp_path / "cut" / "shard_000002.safetensors").exists()  # renamed, not listed
    partial = ActivationStore(tmp_path / "cut")
    assert len(partial.shards) == 2 and not partial.complete
    write_store(tmp_path / "cut", batches, dtype="float32", shard_tokens=10)
    assert store_files(tmp_path / "cut") == store_files(tmp_path / "ref")


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import safetensors.torch as st
    sys.path.insert(0, sys.argv[2])
    from test_store import make_batches, write_store
    real = st.save_file
    n = {"calls": 0}
    def dying_save_file(tensors, filename, metadata=None):
        n["calls"] += 1
        if n["calls"] == 3:  # die halfway through writing the third shard's temp file
            with open(filename, "wb") as fh:
                fh.write(b"half a shard")
            os.kill(os.getpid(), signal.SIGKILL)
        return real(tensors, filename, metadata=metadata)
    st.save_file = dying_save_file
    write_store(sys.argv[1], make_batches(n_batches=8), dtype="float32", shard_tokens=10)
    """
)


def test_sigkill_mid_write_then_resume_equals_uninterrupted(tmp_path):
    batches = make_batches(n_batches=8)
    write_store(tmp_path / "ref", batches, dtype="float32", shard_tokens=10)
    cut = tmp_path / "cut"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, str(cut), str(Path(__file__).parent)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert any(p.name.endswith(".tmp") for p in cut.iterdir())  # the half-written temp file
    assert len(ActivationStore(cut).shards) == 2
    write_store(cut, batches, dtype="float32", shard_tokens=10)
    assert store_files(cut) == store_files(tmp_path / "ref")


def test_corrupt_shard_error_names_it_and_delete_then_resume_repairs(tmp_path):
    batches = make_batches()
    write_store(tmp_path / "ref", batches, dtype="float32", shard_tokens=10)
    write_store(tmp_path / "s", batches, dtype="float32", shard_tokens=10)
    shard = tmp_path / "s" / "shard_000001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-5])
    with pytest.raises(
        StoreError, match="shard_000001.safetensors.*truncated.*delete it and resume"
    ):
        ActivationStore(tmp_path / "s")
    with pytest.raises(StoreError, match="shard_000001"):
        ActivationStoreWriter(tmp_path / "s", LAYERS, D, dtype="float32", shard_tokens=10)
    shard.unlink()
    write_store(tmp_path / "s", batches, dtype="float32", shard_tokens=10)
    store, ref = ActivationStore(tmp_path / "s", verify="hash"), ActivationStore(tmp_path / "ref")
    assert sorted(store.record_ids) == sorted(ref.record_ids) and store.num_tokens == ref.num_tokens

    # same tokens per record, whatever shard they landed in
    def per_record(s):
        out = {}
        for b in s.iter_batches(1, 1000, shuffle=False):
            for j, ri in enumerate(b.record_index.tolist()):
                out.setdefault(s.record_ids[ri], []).append(b.acts[j])
        return {k: torch.stack(v) for k, v in out.items()}

    a, r = per_record(store), per_record(ref)
    assert all(torch.equal(a[k], r[k]) for k in r)
    # a flipped byte inside a tensor passes the size/header check but not the hash check
    shard0 = tmp_path / "s" / "shard_000000.safetensors"
    data = bytearray(shard0.read_bytes())
    data[-1] ^= 0xFF
    shard0.write_bytes(bytes(data))
    ActivationStore(tmp_path / "s")
    with pytest.raises(StoreError, match="shard_000000.*sha256"):
        ActivationStore(tmp_path / "s", verify="hash")


def test_missing_store_and_bad_manifest(tmp_path):
    with pytest.raises(StoreError, match="manifest.json is missing"):
        ActivationStore(tmp_path)
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(StoreError, match="not valid JSON"):
        ActivationStore(tmp_path)
    (tmp_path / MANIFEST).write_text(json.dumps({"format": "other"}))
    with pytest.raises(StoreError, match="not an mmdiff-activation-store"):
        ActivationStore(tmp_path)


def test_empty_records_duplicates_and_empty_store(tmp_path):
    bt = make_batches(n_batches=1)[0]
    bt.attention_mask[1] = 0  # a record with no real tokens
    bt.record_ids = ["x", "y", "x"]  # the repeated id is stored once
    with ActivationStoreWriter(tmp_path / "s", LAYERS, D, dtype="float32") as w:
        assert w.add(bt) == int(bt.attention_mask[0].sum())
    store = ActivationStore(tmp_path / "s")
    assert store.record_ids == ["x", "y"] and store.num_tokens == int(bt.attention_mask[0].sum())
    with ActivationStoreWriter(tmp_path / "e", LAYERS, D):
        pass
    empty = ActivationStore(tmp_path / "e")
    assert empty.complete and empty.num_tokens == 0 and list(empty.iter_batches(1, 4)) == []
    assert empty.load_all(1).shape == (0, D)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    shard_tokens=st.integers(1, 40),
    batch_size=st.integers(1, 17),
    buffer_tokens=st.integers(0, 60),
    types=st.sampled_from([None, (0,), (1, 2)]),
    seed=st.integers(0, 3),
)
def test_every_token_exactly_once_for_any_sizes(tmp_path_factory, shard_tokens, batch_size,
                                                 buffer_tokens, types, seed):
    root = tmp_path_factory.mktemp("s")
    write_store(root, make_batches(n_batches=4, seed=seed), dtype="float32", shard_tokens=shard_tokens)
    store = ActivationStore(root)
    got = list(store.iter_batches(LAYERS, batch_size, token_types=types, buffer_tokens=buffer_tokens,
                                  seed=seed))
    assert all(len(b.token_types) == batch_size for b in got[:-1])
    assert len(got) == store.num_batches(batch_size, token_types=types)
    pairs = sorted((int(r), int(p)) for b in got for r, p in zip(b.record_index, b.position))
    ordered = list(store.iter_batches(LAYERS, 1000, token_types=types, shuffle=False))
    want = sorted((int(r), int(p)) for b in ordered for r, p in zip(b.record_index, b.position))
    assert pairs == want and len(want) == store.count_tokens(types)


def test_store_feeds_the_sae_trainer(tmp_path):
    """The store is a data source of `train_saes` (many layers, float16 on disk, text+image tokens)."""
    from mmdiff.sae.trainer import TrainConfig, train_saes

    with ActivationStoreWriter(tmp_path / "store", LAYERS, D, shard_tokens=20) as w:
        for bt in make_batches(n_batches=40):
            w.add(bt)
    store = ActivationStore(tmp_path / "store")
    cfg = TrainConfig(k=2, batch_size=16, total_tokens=320, buffer_tokens=32, d_sae=16,
                      checkpoint_every=0, regime="full")
    result = train_saes(None, store, LAYERS, cfg, tmp_path / "out", progress=False)
    assert result.steps == 20 and result.tokens == 320 and not result.data_ran_out
    assert sorted(result.sae_dirs) == LAYERS and all(p.is_dir() for p in result.sae_dirs.values())
