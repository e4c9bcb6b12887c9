"""torch.distributed on CPU with gloo, 2 ranks on 127.0.0.1: data-parallel capture into rank stores,
all-reduced statistics, SAE training with layers sharded across ranks and plain data parallel
(equal to one process on the same effective batch), and a SIGKILL of one rank then a resume.

Ranks are forked processes that get torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT) and join through `init_distributed`, as under torchrun; forking skips the
seconds of re-importing torch per process. Like torchrun's agent, the launcher kills the surviving
ranks once one rank has died.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import signal
import socket
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

from mmdiff.activations import ActivationBatch
from mmdiff.distributed import (
    DistContext,
    context,
    destroy_distributed,
    init_distributed,
    on_main,
    shard_records,
)
from mmdiff.errors import ConfigError, DataError
from mmdiff.models.base import TokenType
from mmdiff.parallel.prefetch import Prefetcher, PrefetchingStore
from mmdiff.parallel.train import layer_owners, shard_source
from mmdiff.sae.trainer import TrainConfig, token_stream, train_saes
from mmdiff.store import ActivationStore, ActivationStoreWriter

WORLD = 2
LAYERS = [2, 5, 9]
D = 16
TEXT, IMAGE, SPECIAL = int(TokenType.TEXT), int(TokenType.IMAGE), int(TokenType.SPECIAL)


# ---------------------------------------------------------------------------------- launcher
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, fn: Callable[..., Any], args: tuple, errors: Path) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo",
    )  # fmt: skip
    torch.set_num_threads(1)
    try:
        ctx = init_distributed(backend="gloo", timeout_s=60)
        assert ctx == DistContext(rank, WORLD, rank, torch.device("cpu"), "gloo")
        fn(rank, *args)
        destroy_distributed()
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails the test
        (errors / f"rank_{rank}.txt").write_text(traceback.format_exc())
        os._exit(1)
    os._exit(0)


def run_ranks(fn: Callable[..., Any], *args: Any, tmp: Path, timeout: float = 90) -> list[int]:
    """Run fn(rank, *args) on WORLD forked ranks; their exit codes (a rank's traceback on failure)."""
    errors = tmp / "errors"
    errors.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    fork = mp.get_context("fork")
    procs = [
        fork.Process(target=_rank_main, args=(r, port, fn, args, errors)) for r in range(WORLD)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
        if any(p.exitcode not in (None, 0) for p in procs):  # torchrun's agent: one down, all down
            for p in procs:
                if p.is_alive():
                    os.kill(p.pid, signal.SIGKILL)
        time.sleep(0.05)
    for p in procs:
        if p.is_alive():
            os.kill(p.pid, signal.SIGKILL)
        p.join()
    return [p.exitcode for p in procs]


def assert_ranks_ok(codes: list[int], tmp: Path) -> None:
    if codes != [0] * WORLD:
        logs = "\n".join(p.read_text() for p in sorted((tmp / "errors").glob("*.txt")))
        pytest.fail(f"ranks exited with {codes}:\n{logs}")


# ---------------------------------------------------------------------------------- data
def make_batches(
    n_batches: int = 8, batch: int = 3, seq: int = 9, seed: int = 0
) -> list[ActivationBatch]:
    """Padded batches: BOS (special), an image span, then text; distinct record ids."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n_batches):
        types = torch.full((batch, seq), SPECIAL, dtype=torch.int8)
        mask = torch.zeros(batch, seq, dtype=torch.bool)
        for r in range(batch):
            n = int(torch.randint(5, seq + 1, (1,), generator=g))
            mask[r, :n] = True
            n_img = int(torch.randint(1, n - 2, (1,), generator=g))
            types[r, 1 : 1 + n_img] = IMAGE
            types[r, 1 + n_img : n] = TEXT
        acts = {L: torch.randn(batch, seq, D, generator=g) * (1 + L / 4) + L for L in LAYERS}
        ids = [f"rec{i}_{r}" for r in range(batch)]
        out.append(
            ActivationBatch(acts=acts, token_types=types, attention_mask=mask, record_ids=ids)
        )
    return out


def write_store(root: Path, batches: list[ActivationBatch]) -> ActivationStore:
    with ActivationStoreWriter(root, LAYERS, D, dtype="float32", shard_tokens=24) as w:
        for b in batches:
            w.add(b)
    return ActivationStore(root)


def small_saes(seed: int = 0) -> dict[int, Any]:
    from mmdiff.sae.warm_start import random_sae

    return {L: random_sae(D, 48, 4, L, seed) for L in LAYERS}


CFG = TrainConfig(
    k=4, lr=3e-3, batch_size=32, total_tokens=32 * 8, d_sae=48, buffer_tokens=64,
    dead_tokens_threshold=96, checkpoint_every=2, log_every=1, seed=3, regime="full",
)  # fmt: skip


def state_of(out_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {
        f"{L}.{k}": v
        for L in LAYERS
        for k, v in load_file(str(out_dir / f"layer_{L}" / "sae_weights.safetensors")).items()
    }


# ---------------------------------------------------------------------------------- single process
def test_single_process_is_a_world_of_one(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    ctx = init_distributed()
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.distributed) == (0, 1, True, False)
    assert context() == ctx
    assert on_main(lambda: 7) == 7
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match="WORLD_SIZE"):
        init_distributed()


def test_shard_records_partitions_and_balances():
    records = list(range(11))
    shards = [shard_records(records, r, 3) for r in range(3)]
    assert shards == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8]]
    assert layer_owners([9, 2, 5], 2) == {2: 0, 5: 1, 9: 0}
    with pytest.raises(ConfigError, match="rank"):
        shard_records(records, 3, 3)


def test_shard_source_splits_store_shards_and_lists(tmp_path):
    store = write_store(tmp_path / "s", make_batches())
    assert len(store.shards) >= 4
    seen = []
    for r in range(WORLD):
        for b in shard_source(store, r, WORLD).iter_batches(LAYERS, 7, shuffle=True, seed=5):
            seen += list(zip(b.record_index.tolist(), b.position.tolist()))
    # the ranks' shards partition the store: every token exactly once
    assert len(seen) == len(set(seen)) == store.num_tokens
    with pytest.raises(DataError, match="presharded"):
        shard_source(iter([1, 2]), 0, 2)
    from mmdiff.sae.stream import CapturedActivations

    live = CapturedActivations(None, list("abcde"), LAYERS, "vlm", 2)  # a live capture's records
    mine = shard_source(live, 1, WORLD)
    assert isinstance(mine, CapturedActivations) and mine.records == ["b", "d"]
    assert (mine.layers, mine.side, mine.batch_size) == (LAYERS, "vlm", 2)
    assert shard_source([1, 2, 3], 1, 2) == [2]


def test_prefetcher_yields_in_order_and_reraises(tmp_path):
    assert list(Prefetcher(range(10), depth=3)) == list(range(10))

    def broken():
        yield 1
        raise ValueError("boom")

    it = Prefetcher(broken())
    assert next(it) == 1
    with pytest.raises(ValueError, match="boom"):
        next(it)
    store = write_store(tmp_path / "s", make_batches(n_batches=3))
    a = [b.acts[2] for b in store.iter_batches(LAYERS, 5, seed=1)]
    b = [b.acts[2] for b in PrefetchingStore(store).iter_batches(LAYERS, 5, seed=1)]
    assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
    assert PrefetchingStore(store).count_tokens() == store.count_tokens()
    # a drop-in for the trainer: the same SAEs from the prefetched store
    cfg = dataclasses.replace(CFG, total_tokens=CFG.batch_size * 3, checkpoint_every=0)
    train_saes(None, store, LAYERS, cfg, tmp_path / "plain", progress=False)
    train_saes(None, PrefetchingStore(store), LAYERS, cfg, tmp_path / "prefetched", progress=False)
    plain, prefetched = state_of(tmp_path / "plain"), state_of(tmp_path / "prefetched")
    assert all(torch.equal(plain[k], prefetched[k]) for k in plain)


# ---------------------------------------------------------------------------------- capture + stats
class _FakeBackbone:
    d_model = D


class _FakeAdapter:
    """Stands in for a VLM: the capture function is replaced by `_fake_iter_activations`."""

    def backbone(self, side: str) -> _FakeBackbone:
        return _FakeBackbone()


def _fake_iter_activations(
    adapter, records, layers, side="vlm", *, batch_size=8, progress=True, **kw
):
    """Deterministic activations per record (a function of its id), as a model would give."""
    by_id = {rid: (b, i) for b in ALL_BATCHES for i, rid in enumerate(b.record_ids)}
    records = list(records)
    for s in range(0, len(records), batch_size):
        rows = [by_id[r.id] for r in records[s : s + batch_size]]
        yield ActivationBatch(
            acts={L: torch.stack([b.acts[L][i] for b, i in rows]) for L in layers},
            token_types=torch.stack([b.token_types[i] for b, i in rows]),
            attention_mask=torch.stack([b.attention_mask[i] for b, i in rows]),
            record_ids=[r.id for r in records[s : s + batch_size]],
        )


ALL_BATCHES = make_batches(n_batches=6, seed=11)


def _capture_and_stats(rank: int, root: Path, stats_dir: Path, saes: dict) -> None:
    import mmdiff.capture
    from mmdiff.data.records import Record
    from mmdiff.parallel import capture_store_distributed, write_feature_stats_distributed

    mmdiff.capture.iter_activations = _fake_iter_activations
    records = [Record(id=rid, question="q") for b in ALL_BATCHES for rid in b.record_ids]
    capture_store_distributed(
        _FakeAdapter(), records, LAYERS, root, "vlm", dtype="float32", shard_tokens=20,
        batch_size=2, progress=False,
    )  # fmt: skip
    mine = _fake_iter_activations(None, shard_records(records), LAYERS, batch_size=2)
    splits = {"all": None, "task": [r.id for r in records[::3]]}
    write_feature_stats_distributed(
        mine, saes, splits, stats_dir, top_k=3, n_chunks=4, progress=False
    )


def test_capture_into_rank_stores_and_all_reduced_stats_equal_one_process(tmp_path):
    from mmdiff.stats import collect_feature_stats_by_split, feature_summary, load_feature_stats, top_examples

    saes = small_saes()
    root, stats_dir = tmp_path / "store", tmp_path / "stats"
    assert_ranks_ok(run_ranks(_capture_and_stats, root, stats_dir, saes, tmp=tmp_path), tmp_path)

    # every record captured exactly once, across the rank stores, read back by the plain reader
    store = ActivationStore(root, verify="hash")
    assert store.complete and sorted(store.record_ids) == sorted(
        r for b in ALL_BATCHES for r in b.record_ids
    )
    assert {s["file"].split("/")[0] for s in store.shards} == {"rank_0", "rank_1"}
    expected = sum(int(b.attention_mask.sum()) for b in ALL_BATCHES)
    assert store.num_tokens == expected
    by_record = {}
    for batch in store.iter_batches(2, 1000, shuffle=False):
        for j, ri in enumerate(batch.record_index.tolist()):
            by_record.setdefault(store.record_ids[ri], []).append(batch.acts[j])
    for b in ALL_BATCHES:
        for i, rid in enumerate(b.record_ids):
            torch.testing.assert_close(
                torch.stack(by_record[rid]), b.acts[2][i][b.attention_mask[i]]
            )

    # statistics reduced over ranks == one process over every record
    ids = [rid for b in ALL_BATCHES for rid in b.record_ids]
    single = collect_feature_stats_by_split(
        ALL_BATCHES, saes, {"all": None, "task": ids[::3]}, top_k=3, n_chunks=4, progress=False
    )
    for split in ("all", "task"):
        got = load_feature_stats(stats_dir, split)
        pd.testing.assert_frame_equal(feature_summary(got), feature_summary(single[split]), rtol=1e-12, atol=0)
        pd.testing.assert_frame_equal(
            top_examples(got).reset_index(drop=True),
            top_examples(single[split]).reset_index(drop=True),
        )
        assert feature_summary(got)["fires_text"].sum() > 0  # the comparison is not between empty tables


# ---------------------------------------------------------------------------------- training
WARM_SEED = 21


def _train(
    rank: int,
    store_root: Path,
    out: Path,
    mode: str,
    kill_at: int | None,
    gather: bool = False,
    warm: bool = False,
) -> None:
    from mmdiff.parallel import train_saes_distributed

    def on_step(step: int) -> None:
        if rank == 1 and step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    result = train_saes_distributed(
        small_saes(WARM_SEED) if warm else None,
        ActivationStore(store_root),
        LAYERS,
        CFG,
        out,
        mode=mode,
        progress=False,
        on_step=on_step,
        gather_saes=gather,
    )
    torch.save(
        {"resumed_from": result.resumed_from_step, "layers": sorted(result.saes),
         "W_dec": {L: sae.W_dec.detach() for L, sae in result.saes.items()},
         "init_layers": sorted(result.init)},
        out / f"result_{rank}.pt",
    )  # fmt: skip


def reference_run(store: ActivationStore, out: Path, warm: bool) -> dict[str, torch.Tensor]:
    """One process, one SAE per layer, on the same effective batches: the ranks' local batches
    concatenated step by step (what every distributed step trains on)."""
    streams = [token_stream(shard_source(store, r, WORLD), LAYERS, CFG, WORLD) for r in range(WORLD)]
    batches = []
    for _ in range(CFG.total_steps):
        parts = [next(s)[0] for s in streams]
        batches.append(
            {"acts": {L: torch.cat([p.acts[L] for p in parts]) for L in LAYERS},
             "token_types": torch.cat([p.token_types for p in parts])}
        )  # fmt: skip
    cfg = dataclasses.replace(CFG, buffer_tokens=CFG.batch_size, checkpoint_every=0)
    train_saes(small_saes(WARM_SEED) if warm else None, batches, LAYERS, cfg, out, progress=False)
    return state_of(out)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist_train")
    store = write_store(tmp / "store", make_batches(n_batches=10, seed=4))
    refs = {warm: reference_run(store, tmp / f"reference_{warm}", warm) for warm in (False, True)}
    return tmp, store, refs


@pytest.mark.parametrize(("mode", "warm"), [("layers", False), ("ddp", False), ("layers", True)])
def test_distributed_training_equals_one_process_on_the_effective_batch(trained, mode, warm):
    tmp, store, refs = trained
    ref = refs[warm]
    out = tmp / (mode if not warm else f"{mode}_warm")
    logs = tmp / f"{out.name}_run"
    # the warm run gathers every layer's SAE (and warm start) on every rank
    assert_ranks_ok(run_ranks(_train, store.root, out, mode, None, warm, warm, tmp=logs), logs)
    got = state_of(out)
    assert got.keys() == ref.keys()
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=1e-4, atol=1e-5, msg=key)
    # training moved the weights (a no-op would not be compared against anything)
    init = small_saes(WARM_SEED if warm else CFG.seed)  # the weights training started from
    assert not torch.allclose(got["2.W_dec"], init[2].W_dec, atol=1e-3)
    results = [torch.load(out / f"result_{r}.pt") for r in range(WORLD)]
    owned = [r["layers"] for r in results]
    assert owned == ([[2, 9], [5]] if mode == "layers" and not warm else [LAYERS, LAYERS])
    if warm:
        assert [r["init_layers"] for r in results] == [LAYERS, LAYERS]
    metrics = pd.read_parquet(out / "train_metrics.parquet")
    assert sorted(metrics["layer"].unique()) == LAYERS and metrics["step"].max() == CFG.total_steps
    ref_metrics = pd.read_parquet(tmp / f"reference_{warm}" / "train_metrics.parquet")
    torch.testing.assert_close(
        torch.tensor(metrics["fvu"].to_numpy()),
        torch.tensor(ref_metrics["fvu"].to_numpy()),
        rtol=1e-4,
        atol=1e-5,
    )
    assert not (out / "checkpoint").exists()


def test_sigkill_of_one_rank_then_resume_gives_the_same_weights(trained):
    tmp, store, _ = trained
    uninterrupted = tmp / "layers"
    if not (uninterrupted / "train_metrics.parquet").is_file():  # run alone: train it here
        logs = tmp / "layers_run"
        assert_ranks_ok(
            run_ranks(_train, store.root, uninterrupted, "layers", None, tmp=logs), logs
        )
    out = tmp / "killed"
    # rank 1 dies at step 4 before writing its step-4 checkpoint: rank 0 may hold step 4, both hold 2
    codes = run_ranks(_train, store.root, out, "layers", 4, tmp=tmp / "kill_run")
    assert codes[1] == -signal.SIGKILL and codes[0] != 0
    rank_dirs = sorted((out / "checkpoint" / "layers_world2").iterdir())
    assert [p.name for p in rank_dirs] == ["rank_0", "rank_1"]
    assert "step_000000002" in {p.name for p in rank_dirs[1].iterdir()}
    assert not (out / "train_metrics.parquet").exists()

    assert_ranks_ok(
        run_ranks(_train, store.root, out, "layers", None, True, tmp=tmp / "resume_run"),
        tmp / "resume_run",
    )
    results = [torch.load(out / f"result_{r}.pt") for r in range(WORLD)]
    assert [r["resumed_from"] for r in results] == [2, 2]
    got, want = state_of(out), state_of(uninterrupted)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    # gather_saes: every rank ends with every layer's SAE, its own trained and the others loaded
    for r in results:
        assert r["layers"] == LAYERS
        for L in LAYERS:
            assert torch.equal(r["W_dec"][L], want[f"{L}.W_dec"])


# ---------------------------------------------------------------------------------- real torchrun
TORCHRUN_SCRIPT = """
import sys, torch
from mmdiff.distributed import all_reduce_sum, check_same_everywhere, init_distributed, on_main, shard_records
from mmdiff.atomic import write_json
ctx = init_distributed()
records = [f"r{i}" for i in range(7)]
check_same_everywhere(records, "record ids")
mine = shard_records(records)
total = all_reduce_sum(torch.tensor([float(len(mine))]))
on_main(write_json, sys.argv[1], {"world": ctx.world_size, "backend": ctx.backend, "total": total.item()})
"""


def test_under_torchrun_on_loopback(tmp_path):
    import subprocess
    import sys

    script, out = tmp_path / "job.py", tmp_path / "out.json"
    script.write_text(TORCHRUN_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(WORLD),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(script), str(out)]  # fmt: skip
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    assert json.loads(out.read_text()) == {"world": WORLD, "backend": "gloo", "total": 7.0}


# ---------------------------------------------------------------------------------- the CLI
def _pipeline_is_wired() -> bool:
    from mmdiff.pipeline import Stage

    return "distributed" in getattr(Stage, "__dataclass_fields__", {})


@pytest.mark.skipif(
    not _pipeline_is_wired(), reason="the pipeline has no distributed stages yet (lead's wiring)"
)
def test_mmdiff_run_under_torchrun_matches_one_process(tmp_path):
    """`torchrun -m mmdiff run` on 2 ranks: the capture reads back as one store holding every
    record, and the statistics equal one process's over the same SAEs."""
    import json
    import subprocess
    import sys

    import yaml
    from PIL import Image

    from mmdiff.capture import iter_activations
    from mmdiff.config import load_config
    from mmdiff.models.tiny import build_tiny, load_tiny
    from mmdiff.stats import collect_feature_stats_by_split, feature_summary
    from mmdiff.control.inputs import load_role_saes
    from mmdiff.data.selection import load_records

    models = build_tiny("llava", tmp_path / "tiny")
    rows = []
    for i in range(12):
        Image.new("RGB", (32, 32), ((37 * i) % 255, 90, 200)).save(tmp_path / f"im{i}.png")
        spatial = i % 2 == 0
        rows.append(
            {"id": f"r{i}", "image": f"im{i}.png", "caption": f"a red square {i}",
             "question": "Is the square left of the circle?" if spatial else "What colour?",
             "answers": ["yes" if spatial else "red"], "tasks": ["spatial"] if spatial else ["vqa"]}
        )  # fmt: skip
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    data = {"kind": "jsonl", "args": {"path": str(tmp_path / "data.jsonl")}}
    cfg = {
        "name": "tiny", "layers": [0, 1],
        "model": {"vlm": str(models / "vlm"), "base_lm": str(models / "base")},
        "datasets": {"train": data, "test": data},
        "capture": {"datasets": ["train"], "batch_size": 4, "shard_tokens": 1024},
        "train": {"k": 4, "batch_size": 64, "total_tokens": 512, "checkpoint_every": 4,
                  "expansion_factor": 4, "regimes": ["text"], "spliced_loss": False},
        "stats": {"tasks": ["spatial"], "neutral_tasks": [], "n_chunks": 4, "top_k": 4},
    }  # fmt: skip
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "mmdiff", "run",
           "--config", str(tmp_path / "study.yaml"), "--runs-dir", str(tmp_path / "runs"),
           "--no-progress", "--only", "capture", "--only", "train", "--only", "stats"]  # fmt: skip
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]

    run = tmp_path / "runs" / "tiny"
    manifest = json.loads((run / "manifest.json").read_text())
    assert {k: v["status"] for k, v in manifest["stages"].items()} == {
        "capture": "done", "train": "done", "stats": "done"
    }  # fmt: skip
    store = ActivationStore(run / "activations" / "train" / "vlm", verify="hash")
    assert sorted(store.record_ids) == sorted(r["id"] for r in rows)
    assert {s["file"].split("/")[0] for s in store.shards} == {"rank_0", "rank_1"}

    study = load_config(tmp_path / "study.yaml")
    adapter = load_tiny("llava", tmp_path / "tiny")
    records = load_records(study.datasets["test"])
    vlm = adapter.backbone("vlm")
    saes = load_role_saes(run, study.stats.role, study.layers, d_in=vlm.d_model, device=vlm.device)
    batches = iter_activations(adapter, records, study.layers, "vlm", batch_size=4, progress=False)
    single = collect_feature_stats_by_split(
        batches, saes, {"vision": None}, top_k=4, n_chunks=4, progress=False
    )["vision"]
    got = pd.read_parquet(run / "stats" / "vision.parquet")
    pd.testing.assert_frame_equal(got, feature_summary(single), rtol=1e-5, atol=1e-7)
    assert got["fires_text"].sum() > 0
