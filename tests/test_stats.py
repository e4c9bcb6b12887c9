"""Streaming feature statistics equal a direct computation on the materialised activations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mmdiff.activations import ActivationBatch
from mmdiff.errors import ConfigError, DataError, SAEError
from mmdiff.models.base import TokenType
from mmdiff.parallel.stats import all_reduce_stats
from mmdiff.stats import (
    FeatureStats,
    LogHistogram,
    accumulate_batch,
    accumulate_codes,
    chunk_of,
    collect_feature_stats,
    feature_summary,
    load_feature_stats,
    merge_stats,
    save_feature_stats,
    top_examples,
    top_records,
)

TEXT, IMAGE, SPECIAL = int(TokenType.TEXT), int(TokenType.IMAGE), int(TokenType.SPECIAL)


class ReluSAE:
    """A tiny ReLU SAE stand-in with the duck type the statistics use."""

    def __init__(self, d_in: int, d_sae: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.W_enc = torch.randn(d_in, d_sae, generator=g)
        self.b_enc = torch.randn(d_sae, generator=g) * 0.5 - 0.3
        self.W_dec = torch.randn(d_sae, d_in, generator=g)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        # in float64, so a token's code does not depend on how many tokens share the matmul
        return torch.relu(x.double() @ self.W_enc.double() + self.b_enc.double()).float()


LAYERS = (3, 7)
D_IN, D_SAE = 8, 12


def make_batches(seed: int = 0, n_batches: int = 4, batch: int = 3):
    """Padded batches (left and right padding), BOS as special, an image span, then text."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in range(n_batches):
        seq = 9
        tt = torch.full((batch, seq), SPECIAL, dtype=torch.int8)
        mask = torch.zeros(batch, seq, dtype=torch.bool)
        for r in range(batch):
            length = int(torch.randint(4, seq + 1, (1,), generator=g))
            start = seq - length if b % 2 else 0  # odd batches are left-padded
            mask[r, start : start + length] = True
            n_img = int(torch.randint(0, length - 1, (1,), generator=g))
            tt[r, start] = SPECIAL  # BOS
            tt[r, start + 1 : start + 1 + n_img] = IMAGE
            tt[r, start + 1 + n_img : start + length] = TEXT
        acts = {layer: torch.randn(batch, seq, D_IN, generator=g) * 2 for layer in LAYERS}
        # Padding and BOS get huge values: they must never leak into any statistic.
        for layer in LAYERS:
            acts[layer][tt == SPECIAL] = 1e4
        ids = [f"rec{b}_{r}" for r in range(batch)]
        out.append(ActivationBatch(acts=acts, token_types=tt, attention_mask=mask, record_ids=ids))
    return out


def materialise(batches, saes, layer):
    """Every counted token's codes with (record_id, position, token_type), the slow obvious way."""
    rows, meta = [], []
    for batch in batches:
        for r, rid in enumerate(batch.record_ids):
            pos = -1
            for t in range(batch.token_types.shape[1]):
                if not batch.attention_mask[r, t]:
                    continue
                pos += 1
                tt = int(batch.token_types[r, t])
                if tt == SPECIAL:
                    continue
                rows.append(saes[layer].encode(batch.acts[layer][r, t]))
                meta.append((rid, pos, tt))
    return torch.stack(rows).double(), meta


@pytest.fixture(scope="module")
def setup():
    saes = {layer: ReluSAE(D_IN, D_SAE, seed=layer) for layer in LAYERS}
    batches = make_batches()
    stats = collect_feature_stats(batches, saes, "vqa", top_k=4, n_chunks=3, progress=False, token_block=5)
    return saes, batches, stats


def test_hand_computed_codes():
    stats = FeatureStats({0: 2}, "s", top_k=2, n_chunks=1)
    h = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]])
    accumulate_codes(
        stats, 0, h, record=torch.tensor([0, 0, 1]), position=torch.tensor([1, 2, 1]),
        token_type=torch.tensor([TEXT, TEXT, IMAGE]), record_ids=["a", "b"],
    )
    assert stats.sum_h2(0, (TEXT,)).tolist() == [5.0, 0.0]
    assert stats.sum_h2(0, (IMAGE,)).tolist() == [0.0, 9.0]
    assert stats.firing_counts(0).tolist() == [2, 1]
    assert stats.n_tokens(0) == 3 and stats.n_tokens(0, (IMAGE,)) == 1
    assert stats.mean_sq(0).tolist() == pytest.approx([5 / 3, 3.0])
    assert stats.firing_frequency(0, (TEXT,)).tolist() == [1.0, 0.0]
    assert stats.image_share(0).tolist() == [0.0, 1.0]
    top = top_examples(stats)
    assert top[["feature", "rank", "record_id", "position", "value"]].values.tolist() == [
        [0, 0, "a", 2, 2.0], [0, 1, "a", 1, 1.0], [1, 0, "b", 1, 3.0]
    ]
    # the top records list each record once, at its max
    assert top_records(stats)[["feature", "rank", "record_id", "position", "value"]].values.tolist() == [
        [0, 0, "a", 2, 2.0], [1, 0, "b", 1, 3.0]
    ]
    # a record seen again in a later update keeps one entry, at the larger of its maxima
    accumulate_codes(stats, 0, torch.tensor([[5.0, 0.0], [0.5, 1.0]]), record=torch.tensor([0, 1]),
                     position=torch.tensor([7, 3]), token_type=torch.tensor([IMAGE, TEXT]), record_ids=["b", "a"])
    assert top_records(stats)[["feature", "rank", "record_id", "position", "token_type", "value"]].values.tolist() == [
        [0, 0, "b", 7, IMAGE, 5.0], [0, 1, "a", 2, TEXT, 2.0], [1, 0, "b", 1, IMAGE, 3.0], [1, 1, "a", 3, TEXT, 1.0]
    ]


def test_stream_equals_direct(setup):
    saes, batches, stats = setup
    for layer in LAYERS:
        h, meta = materialise(batches, saes, layer)
        types = np.array([m[2] for m in meta])
        for t in (TEXT, IMAGE):
            sel = torch.from_numpy(types == t)
            assert stats.n_tokens(layer, (t,)) == int(sel.sum())
            torch.testing.assert_close(stats.sum_h2(layer, (t,)), (h[sel] ** 2).sum(0), rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(stats.sum_h(layer, (t,)), h[sel].sum(0), rtol=1e-6, atol=1e-6)
            assert torch.equal(stats.firing_counts(layer, (t,)), (h[sel] > 0).sum(0))
        torch.testing.assert_close(stats.mean_sq(layer), (h**2).mean(0), rtol=1e-6, atol=1e-6)
        # per-chunk sums: the bootstrap's unit
        chunks = torch.tensor([chunk_of(m[0], 3) for m in meta])
        for c in range(3):
            torch.testing.assert_close(
                stats.chunk_sums(layer, "sum_h2")[c], (h[chunks == c] ** 2).sum(0), rtol=1e-6, atol=1e-6
            )
            assert int(stats.chunk_tokens(layer)[c]) == int((chunks == c).sum())
        # top-k: the same values and the same (record, position) of each
        top = top_examples(stats, layer)
        for f in range(D_SAE):
            order = torch.argsort(h[:, f], descending=True)[:4]
            want = [(meta[i][0], meta[i][1], meta[i][2], float(h[i, f])) for i in order if h[i, f] > 0]
            got = top[top.feature == f].sort_values("rank")
            assert list(zip(got.record_id, got.position, got.token_type)) == [w[:3] for w in want]
            np.testing.assert_allclose(got.value, [w[3] for w in want], rtol=1e-6)
        # top records: each record's max activation (token blocks of 5 split records), the k largest
        records = top_records(stats, layer)
        for f in range(D_SAE):
            best: dict[str, tuple[float, int, int]] = {}
            for i, (rid, pos, tt) in enumerate(meta):
                v = float(h[i, f])
                if v > 0 and (rid not in best or v > best[rid][0]):
                    best[rid] = (v, pos, tt)
            want = sorted(best.items(), key=lambda kv: -kv[1][0])[:4]
            got = records[records.feature == f].sort_values("rank")
            assert list(zip(got.record_id, got.position, got.token_type)) == [(r, p, t) for r, (_, p, t) in want]
            np.testing.assert_allclose(got.value, [v for _, (v, _, _) in want], rtol=1e-6)
        # quantiles: in the same histogram bin as numpy's exact order statistic
        ratio = 10 ** (1 / stats.histogram.bins_per_decade)
        qs = (0.0, 0.25, 0.5, 0.9, 1.0)
        est = stats.quantiles(layer, qs)
        for f in range(D_SAE):
            pos = h[:, f][h[:, f] > 0].numpy()
            if len(pos) == 0:
                assert torch.isnan(est[:, f]).all()
                continue
            exact = np.quantile(pos, qs, method="inverted_cdf")
            assert est[0, f] == pytest.approx(pos.min(), rel=1e-5)
            assert est[-1, f] == pytest.approx(pos.max(), rel=1e-5)
            assert np.all(est[:, f].numpy() / exact < ratio * (1 + 1e-6))
            assert np.all(exact / est[:, f].numpy() < ratio * (1 + 1e-6))


def test_quantile_hand_case():
    hist = LogHistogram(low=1.0, high=100.0, bins_per_decade=1)  # bins: (0,1) [1,10) [10,100) [100,inf)
    stats = FeatureStats({0: 1}, "s", top_k=1, n_chunks=1, histogram=hist)
    vals = torch.tensor([2.0, 3.0, 20.0, 50.0])[:, None]
    n = len(vals)
    accumulate_codes(stats, 0, vals, record=torch.zeros(n, dtype=torch.long), position=torch.arange(n),
                       token_type=torch.full((n,), TEXT), record_ids=["r"])
    assert stats.layer_state(0).hist[0].tolist() == [0, 2, 2, 0]
    q = stats.quantiles(0, (0.0, 0.5, 0.75, 1.0))[:, 0]
    # median: rank 2 of 4 = the end of bin [1,10) clamped to [min=2, 10): 2 * 5 ** 1 = 10
    # 0.75: half way through bin [10,100) clamped to [10, max=50]: 10 * 5 ** 0.5
    assert q.tolist() == pytest.approx([2.0, 10.0, 10 * math.sqrt(5), 50.0])


def test_merge_equals_single_pass(setup):
    saes, batches, whole = setup
    a = collect_feature_stats(batches[:1] + batches[3:], saes, "vqa", top_k=4, n_chunks=3, progress=False)
    b = collect_feature_stats(batches[1:3], saes, "vqa", top_k=4, n_chunks=3, progress=False, token_block=4)
    merged = merge_stats(a, b)
    for layer in LAYERS:
        for t in (None, (TEXT,), (IMAGE,)):
            torch.testing.assert_close(merged.chunk_sums(layer, "sum_h2", t), whole.chunk_sums(layer, "sum_h2", t))
            assert torch.equal(merged.chunk_sums(layer, "fires", t), whole.chunk_sums(layer, "fires", t))
            assert torch.equal(merged.chunk_tokens(layer, t), whole.chunk_tokens(layer, t))
        assert torch.equal(merged.layer_state(layer).hist, whole.layer_state(layer).hist)
        torch.testing.assert_close(merged.quantiles(layer, (0.1, 0.5)), whole.quantiles(layer, (0.1, 0.5)), equal_nan=True)
    pd_cols = ["layer", "feature", "rank", "record_id", "position", "value"]
    assert top_examples(merged)[pd_cols].equals(top_examples(whole)[pd_cols])
    assert top_records(merged)[pd_cols].equals(top_records(whole)[pd_cols])


def test_save_load_roundtrip(setup, tmp_path):
    _, _, stats = setup
    paths = save_feature_stats(stats, tmp_path / "stats")
    assert sorted(p.name for p in (tmp_path / "stats").iterdir()) == [
        "vqa.parquet", "vqa.state.safetensors", "vqa.topk.parquet", "vqa.toprecords.parquet"
    ]
    back = load_feature_stats(tmp_path / "stats", "vqa")
    assert feature_summary(back).equals(feature_summary(stats))
    assert top_examples(back).equals(top_examples(stats))
    assert top_records(back).equals(top_records(stats))
    assert pd_read(paths["toprecords"]).equals(top_records(stats))
    import pandas as pd

    assert pd.read_parquet(paths["summary"]).equals(feature_summary(stats))
    # loaded statistics keep merging correctly
    merge_stats(back, load_feature_stats(paths["state"]))
    assert torch.equal(back.firing_counts(3), 2 * stats.firing_counts(3))


def pd_read(path):
    import pandas as pd

    return pd.read_parquet(path)


def test_version_1_statistics_load_without_top_records(setup, tmp_path):
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    _, _, stats = setup
    paths = save_feature_stats(stats, tmp_path)
    with safe_open(str(paths["state"]), framework="pt") as fh:
        meta = json.loads(fh.metadata()["mmdiff"])
        tensors = {k: fh.get_tensor(k) for k in fh.keys() if ".rec_" not in k}
    save_file(tensors, str(paths["state"]), metadata={"mmdiff": json.dumps({**meta, "version": 1})})
    old = load_feature_stats(paths["state"])
    assert feature_summary(old).equals(feature_summary(stats)) and top_examples(old).equals(top_examples(stats))
    assert top_records(old).empty


def test_bad_inputs(setup):
    saes, batches, _ = setup
    stats = FeatureStats({layer: D_SAE for layer in LAYERS}, "vqa")
    with pytest.raises(SAEError, match="need an SAE for layers \\[7\\]"):
        accumulate_batch(stats, batches[0], {3: saes[3]})
    bad = make_batches(n_batches=1)[0]
    bad.token_types[0, 1] = 5
    with pytest.raises(DataError, match="TokenType values"):
        accumulate_batch(stats, bad, saes)
    with pytest.raises(SAEError, match="W_dec"):
        collect_feature_stats([], {0: object()}, "x")
    other = FeatureStats({layer: D_SAE for layer in LAYERS}, "vqa", n_chunks=5)
    with pytest.raises(ConfigError, match="different settings"):
        merge_stats(stats, other)
    with pytest.raises(ConfigError, match="subset of TEXT"):
        stats.mean_sq(3, (SPECIAL,))


def _reduce_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    saes = {layer: ReluSAE(D_IN, D_SAE, seed=layer) for layer in LAYERS}
    mine = make_batches()[rank::world]  # rank 0: batches 0, 2; rank 1: batches 1, 3
    stats = collect_feature_stats(mine, saes, "vqa", top_k=4, n_chunks=3, progress=False, token_block=5)
    all_reduce_stats(stats)
    save_feature_stats(stats, f"{out_dir}/rank{rank}")
    dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_all_reduce_across_two_gloo_ranks_equals_single_pass(setup, tmp_path):
    import torch.multiprocessing as mp

    _, _, whole = setup
    # fork: the children reuse the imported torch instead of paying for a fresh interpreter each
    mp.start_processes(_reduce_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    for rank in range(2):
        got = load_feature_stats(tmp_path / f"rank{rank}", "vqa")
        cols = ["layer", "feature", "tokens_text", "tokens_image", "fires_text", "fires_image"]
        assert feature_summary(got)[cols].equals(feature_summary(whole)[cols])
        np.testing.assert_allclose(feature_summary(got).sum_h2_image, feature_summary(whole).sum_h2_image, rtol=1e-12)
        tcols = ["layer", "feature", "rank", "record_id", "position", "value"]
        assert top_examples(got)[tcols].equals(top_examples(whole)[tcols])
        assert top_records(got)[tcols].equals(top_records(whole)[tcols])
        for layer in LAYERS:
            assert torch.equal(got.layer_state(layer).hist, whole.layer_state(layer).hist)


def test_with_the_project_topk_sae():
    from mmdiff.sae import SAEConfig, build_sae

    saes = {}
    for layer in LAYERS:
        saes[layer] = build_sae(SAEConfig(architecture="topk", d_in=D_IN, d_sae=D_SAE, k=3))
        saes[layer].init_weights(seed=layer)
    batches = make_batches(seed=4, n_batches=2)
    stats = collect_feature_stats(batches, saes, "vqa", top_k=2, n_chunks=2, progress=False)
    for layer in LAYERS:
        with torch.no_grad():
            h, _ = materialise(batches, saes, layer)
        assert int(stats.firing_counts(layer).sum()) == int((h > 0).sum()) <= 3 * len(h)
        torch.testing.assert_close(stats.sum_h2(layer), (h**2).sum(0), rtol=1e-5, atol=1e-6)


def test_by_split_one_pass_equals_direct(setup, tmp_path):
    from mmdiff.stats import write_feature_stats

    saes, batches, whole = setup
    members = {"rec0_1", "rec1_0", "rec1_2", "rec3_1"}
    paths = write_feature_stats(batches, saes, {"vqa": None, "spatial": members}, tmp_path, top_k=4, n_chunks=3,
                                progress=False, token_block=5)
    assert set(paths) == {"vqa", "spatial"}
    full = load_feature_stats(paths["vqa"]["state"])
    part = load_feature_stats(paths["spatial"]["state"])
    assert feature_summary(full).equals(feature_summary(whole))
    for layer in LAYERS:
        h, meta = materialise(batches, saes, layer)
        sel = torch.tensor([m[0] in members for m in meta])
        assert part.n_tokens(layer) == int(sel.sum())
        torch.testing.assert_close(part.sum_h2(layer), (h[sel] ** 2).sum(0), rtol=1e-12, atol=1e-12)
        assert torch.equal(part.firing_counts(layer), (h[sel] > 0).sum(0))
        top = top_examples(part, layer)
        assert set(top.record_id) <= members
        f = int(torch.argmax((h[sel] > 0).sum(0)))
        best = int(torch.argmax(torch.where(sel, h[:, f], -1.0)))
        row = top[(top.feature == f) & (top["rank"] == 0)].iloc[0]
        assert (row.record_id, row.position) == meta[best][:2]


def test_negative_codes_are_refused_before_any_update():
    stats = FeatureStats({0: 2}, "s", n_chunks=1)
    with pytest.raises(SAEError, match="negative values"):
        accumulate_codes(stats, 0, torch.tensor([[1.0, -0.5]]), record=torch.tensor([0]), position=torch.tensor([1]),
                           token_type=torch.tensor([TEXT]), record_ids=["a"])
    assert stats.n_tokens(0) == 0


def test_merge_of_any_partition_equals_single_pass(setup):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    saes, batches, whole = setup

    @settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.lists(st.integers(0, 2), min_size=len(batches), max_size=len(batches)))
    def check(assignment):
        parts = [FeatureStats({layer: D_SAE for layer in LAYERS}, "vqa", top_k=4, n_chunks=3) for _ in range(3)]
        for batch, part in zip(batches, assignment):
            accumulate_batch(parts[part], batch, saes, token_block=5)
        merged = merge_stats(merge_stats(parts[2], parts[0]), parts[1])
        got, want = feature_summary(merged), feature_summary(whole)
        assert list(got.columns) == list(want.columns)
        for col in got.columns:  # counts exactly; float sums up to summation order
            if got[col].dtype.kind in "iub" or col == "split":
                assert got[col].equals(want[col]), col
            else:
                np.testing.assert_allclose(got[col], want[col], rtol=1e-12, err_msg=col)
        cols = ["layer", "feature", "rank", "record_id", "position", "value"]
        assert top_examples(merged)[cols].equals(top_examples(whole)[cols])
        assert top_records(merged)[cols].equals(top_records(whole)[cols])

    check()
