"""The SAE trainer: regimes and special tokens, the deterministic token stream, AuxK, recovery of a
known sparse dictionary, warm start, SIGKILL + resume == uninterrupted, the study recipe."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from mmdiff.activations import ActivationBatch
from mmdiff.errors import ConfigError, DataError, SAEError
from mmdiff.models.base import TokenType
from mmdiff.sae import load_sae
from mmdiff.sae.base import SAEConfig
from mmdiff.sae.metrics import decoder_cosine, evaluate_sae
from mmdiff.sae.topk import TopKSAE
from mmdiff.sae.checkpoint import CHECKPOINT_DIR
from mmdiff.sae.loss import constrain_decoder_grad, topk_loss
from mmdiff.sae.stream import StreamPosition, as_token_batch, shuffled_batches
from mmdiff.sae.study_saes import train_study_saes
from mmdiff.sae.trainer import METRICS_FILE, TrainConfig, regime_token_types, train_saes

IMG, TXT, SPC = int(TokenType.IMAGE), int(TokenType.TEXT), int(TokenType.SPECIAL)
D, N_ATOMS = 32, 64


# ----------------------------------------------------------------------------- synthetic data


def sparse_dictionary(d: int = D, n_atoms: int = N_ATOMS, seed: int = 0) -> torch.Tensor:
    """[n_atoms, d] random unit atoms: the true dictionary the SAE should find."""
    w = torch.randn(n_atoms, d, generator=torch.Generator().manual_seed(seed))
    return w / w.norm(dim=1, keepdim=True)


def synthetic_batches(
    atoms: torch.Tensor,
    n_batches: int,
    seed: int = 1,
    batch: int = 8,
    seq: int = 32,
    k_true: int = 3,
    nan_types: tuple[int, ...] = (),
) -> list[ActivationBatch]:
    """ActivationBatches of layers 0 and 1 whose tokens are sparse sums of k_true atoms (+ noise).

    Position 0 is BOS (special, norm ~100), positions 1-12 image, the rest text; odd rows end with
    3 padding positions. Padding holds NaN, and so do the token types in `nan_types`: any such
    token that reached the loss would make the weights NaN.
    """
    g = torch.Generator().manual_seed(seed)
    n_atoms, d = atoms.shape
    out = []
    for b in range(n_batches):
        n = batch * seq
        idx = torch.argsort(torch.rand(n, n_atoms, generator=g), dim=1)[:, :k_true]
        val = torch.rand(n, k_true, generator=g) + 1.0
        x = torch.zeros(n, n_atoms).scatter(1, idx, val) @ atoms + 0.01 * torch.randn(
            n, d, generator=g
        )
        x = x.view(batch, seq, d)
        types = torch.full((batch, seq), TXT, dtype=torch.int8)
        types[:, 1:13] = IMG
        types[:, 0] = SPC
        x[:, 0] = 100.0
        mask = torch.ones(batch, seq, dtype=torch.bool)
        mask[1::2, -3:] = False
        types[~mask] = SPC
        bad = ~mask | torch.isin(types, torch.tensor(nan_types, dtype=torch.int8))
        x[bad] = float("nan")
        out.append(
            ActivationBatch({0: x, 1: -2.0 * x}, types, mask, [f"b{b}r{i}" for i in range(batch)])
        )
    return out


def recovery_score(atoms: torch.Tensor, sae) -> float:
    """Mean over true atoms of the max cosine with any decoder row."""
    dec = sae.decoder_directions().detach()
    return float((atoms @ dec.T).max(dim=1).values.mean())


@contextlib.contextmanager
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# ----------------------------------------------------------------------------- token selection


def test_regime_token_types():
    assert regime_token_types("full") == (TXT, IMG)
    assert regime_token_types("full", exclude_special=False) == (TXT, IMG, SPC)
    assert regime_token_types("image") == (IMG,)
    assert regime_token_types("text") == (TXT,)
    assert regime_token_types("text", exclude_special=False) == (TXT, SPC)
    assert regime_token_types("random") == (TXT, IMG)
    assert regime_token_types("random", random_tokens="image") == (IMG,)
    with pytest.raises(ConfigError, match="regime"):
        TrainConfig(regime="vision")


def _hand_batch() -> ActivationBatch:
    # acts hold each position's id, so the selected ids can be read back
    acts = torch.arange(10, dtype=torch.float32).view(2, 5, 1)
    types = torch.tensor([[SPC, IMG, IMG, TXT, TXT], [SPC, IMG, TXT, SPC, SPC]], dtype=torch.int8)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]], dtype=torch.bool)  # 9 is padding
    return ActivationBatch({3: acts}, types, mask, ["a", "b"])


@pytest.mark.parametrize(
    "regime,exclude,ids",
    [
        ("full", True, [1, 2, 3, 4, 6, 7]),
        ("full", False, [0, 1, 2, 3, 4, 5, 6, 7, 8]),
        ("image", True, [1, 2, 6]),
        ("text", True, [3, 4, 7]),
        ("text", False, [0, 3, 4, 5, 7, 8]),
    ],
)
def test_as_token_batch_selects_exactly_the_regimes_tokens(regime, exclude, ids):
    tb = as_token_batch(_hand_batch(), [3], regime_token_types(regime, exclude))
    assert tb.acts[3][:, 0].tolist() == ids


def test_as_token_batch_reads_flat_store_batches_and_names_missing_layers():
    flat = {
        "acts": torch.arange(4.0).view(4, 1),
        "token_types": torch.tensor([IMG, TXT, SPC, TXT], dtype=torch.int8),
    }
    assert as_token_batch(flat, [5], (TXT,)).acts[5][:, 0].tolist() == [1.0, 3.0]
    with pytest.raises(DataError, match="capture layers \\[4\\]"):
        as_token_batch(_hand_batch(), [3, 4], (TXT,))
    with pytest.raises(DataError, match="expected ActivationBatch"):
        as_token_batch(torch.zeros(3), [3], (TXT,))


# ----------------------------------------------------------------------------- token stream


def _id_batches(n_items: int, per_item: int = 7) -> list[dict]:
    return [
        {
            "acts": torch.arange(i * per_item, (i + 1) * per_item, dtype=torch.float32).view(-1, 1),
            "token_types": torch.full((per_item,), TXT, dtype=torch.int8),
        }
        for i in range(n_items)
    ]


def _ids(stream, n):
    return [b.acts[0][:, 0].long().tolist() for b, _ in (next(stream) for _ in range(n))]


def test_stream_emits_every_token_once_and_is_a_function_of_the_seed():
    items = _id_batches(10)  # 70 tokens
    one_shot = [
        tok
        for b, _ in shuffled_batches(iter(items), [0], (TXT,), 5, 12, seed=3)
        for tok in b.acts[0][:, 0].long().tolist()
    ]
    assert len(one_shot) == 70 and sorted(one_shot) == list(range(70))  # 70 = 14 full batches
    assert one_shot != list(range(70))  # shuffled
    again = [
        tok
        for b, _ in shuffled_batches(iter(items), [0], (TXT,), 5, 12, seed=3)
        for tok in b.acts[0][:, 0].long().tolist()
    ]
    other = [
        tok
        for b, _ in shuffled_batches(iter(items), [0], (TXT,), 5, 12, seed=4)
        for tok in b.acts[0][:, 0].long().tolist()
    ]
    assert again == one_shot and other != one_shot


def test_stream_resumes_exactly_from_any_position_across_epochs():
    items = _id_batches(6)  # 42 tokens per epoch: batches straddle blocks and epochs
    full = shuffled_batches(items, [0], (TXT,), 5, 12, seed=0)
    reference = _ids(full, 40)
    for cut in (1, 7, 8, 13, 22):
        stream = shuffled_batches(items, [0], (TXT,), 5, 12, seed=0)
        for _ in range(cut):
            _, pos = next(stream)
        state = pos.to_state()  # what a checkpoint stores
        resumed = shuffled_batches(
            items, [0], (TXT,), 5, 12, seed=0, start=StreamPosition.from_state(state)
        )
        assert _ids(resumed, 40 - cut) == reference[cut:], f"resume after batch {cut}"


def test_stream_rejects_data_without_regime_tokens():
    items = _id_batches(3)
    with pytest.raises(DataError, match="no training tokens of types"):
        next(shuffled_batches(items, [0], (IMG,), 5, 12, seed=0))
    # an empty dataset (n_per_family: 0) gets the same error, pointing at config keys that exist
    with pytest.raises(DataError, match="training dataset empty") as err:
        next(shuffled_batches([], [0], (TXT,), 5, 12, seed=0))
    assert "exclude_special" not in str(err.value)


# ----------------------------------------------------------------------------- loss pieces


def test_topk_loss_and_auxk_hand_case():
    sae = TopKSAE(SAEConfig(architecture="topk", d_in=2, d_sae=2, k=1, apply_b_dec_to_input=True))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(2))
        sae.W_dec.copy_(torch.eye(2))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    x = torch.tensor([[2.0, 1.0], [0.0, 3.0]])  # mean [1, 2], total variance 4
    # top-1: [2,0] (error [0,1]) and [0,3] (exact): FVU 1/4. Latent 1 dead: k_aux = 1, scale 1;
    # its activations 1 and 3 predict residuals [0,1] and [0,0]: AuxK = (0 + 9) / 4
    out = topk_loss(sae, x, torch.tensor([False, True]), auxk_alpha=0.5)
    assert out.fvu.item() == pytest.approx(0.25)
    assert out.auxk.item() == pytest.approx(9 / 4)
    assert out.loss.item() == pytest.approx(0.25 + 0.5 * 9 / 4)
    assert out.l0.item() == 1.0
    assert float(topk_loss(sae, x, torch.tensor([False, False]), 0.5).auxk) == 0.0
    out.loss.backward()
    assert sae.W_enc.grad[:, 1].abs().sum() > 0  # the dead latent's encoder learns from AuxK


def test_decoder_gradient_loses_its_parallel_component():
    sae = TopKSAE(SAEConfig(architecture="topk", d_in=2, d_sae=2, k=1))
    with torch.no_grad():
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.6, 0.8]]))
    sae.W_dec.grad = torch.tensor([[2.0, 3.0], [1.0, 0.0]])
    constrain_decoder_grad(sae)
    # row 2: g - (g.d) d = [1, 0] - 0.6 [0.6, 0.8]
    assert torch.allclose(sae.W_dec.grad, torch.tensor([[0.0, 3.0], [1 - 0.36, -0.48]]))


# ----------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def atoms() -> torch.Tensor:
    return sparse_dictionary()


@pytest.fixture(scope="module")
def trained(atoms, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    cfg = TrainConfig(
        k=4,
        d_sae=128,
        batch_size=256,
        total_tokens=40_000,
        lr=5e-3,
        buffer_tokens=2048,
        dead_tokens_threshold=2000,
        checkpoint_every=0,
        log_every=10,
        seed=0,
    )
    data = synthetic_batches(atoms, 40, seed=1)
    return train_saes(None, data, [0, 1], cfg, out, progress=False), out


def test_training_reduces_fvu_and_writes_loadable_saes(trained, atoms):
    result, out = trained
    m = pd.read_parquet(out / METRICS_FILE)
    assert set(m["layer"]) == {0, 1} and m["step"].max() == 40_000 // 256
    for L in (0, 1):
        fvu = m[m["layer"] == L].sort_values("step")["fvu"].tolist()
        assert fvu[-1] < 0.3 * fvu[0]
        assert fvu[-1] < 0.2
        sae = load_sae(out / f"layer_{L}", layer=L)
        assert torch.equal(sae.W_dec, result.saes[L].W_dec)
        assert sae.decoder_norms().tolist() == pytest.approx([1.0] * 128, abs=1e-5)
    held = synthetic_batches(atoms, 3, seed=99)
    ev = evaluate_sae(result.saes[0], held, layer=0)
    print(
        f"training FVU {fvu[0]:.3f} -> {fvu[-1]:.3f}; held-out FVU {ev.fvu:.4f} "
        f"(image {ev.fvu_image:.4f}, text {ev.fvu_text:.4f}), L0 {ev.l0:.2f}"
    )
    assert ev.fvu < 0.2 and ev.l0 <= 4
    assert not (out / CHECKPOINT_DIR).exists()


def test_recovers_the_true_sparse_dictionary(trained, atoms):
    result, _ = trained
    score = recovery_score(atoms, result.saes[0])
    print(f"recovery score (mean max cosine over {N_ATOMS} true atoms): {score:.4f}")
    assert score >= 0.9
    assert recovery_score(-atoms, result.saes[1]) >= 0.9  # layer 1 holds -2 x: the atoms negated


@pytest.mark.parametrize("regime,nan_types", [("full", ()), ("image", (TXT,)), ("text", (IMG,))])
def test_regimes_and_special_tokens_keep_other_tokens_out_of_training(
    atoms, tmp_path, regime, nan_types
):
    # BOS and padding are always NaN here, and so are the tokens the regime must leave out
    data = synthetic_batches(atoms, 4, nan_types=(SPC, *nan_types))
    cfg = TrainConfig(
        k=4,
        d_sae=64,
        batch_size=128,
        total_tokens=128 * 12,
        buffer_tokens=512,
        checkpoint_every=0,
        regime=regime,
    )
    result = train_saes(None, data, [0], cfg, tmp_path, progress=False)
    assert all(torch.isfinite(p).all() for p in result.saes[0].parameters())
    assert all(math.isfinite(r["fvu"]) for r in result.metrics)


def test_including_special_tokens_is_configurable(atoms, tmp_path):
    data = synthetic_batches(atoms, 4)
    only_special = TrainConfig(
        k=2,
        d_sae=16,
        batch_size=8,
        total_tokens=16,
        buffer_tokens=64,
        checkpoint_every=0,
        regime="text",
        exclude_special=False,
        log_every=1,
    )
    result = train_saes(None, data, [0], only_special, tmp_path, progress=False)
    assert result.steps == 2  # BOS (norm 100) now enters training: no exception, by request


def test_warm_start_stays_close_and_random_control_does_not(trained, atoms, tmp_path):
    base, _ = trained
    data = synthetic_batches(atoms, 6, seed=5)
    cfg = TrainConfig(
        k=4, batch_size=256, total_tokens=256 * 15, buffer_tokens=1024, checkpoint_every=0
    )
    warm = train_saes(
        base.saes,
        data,
        [0],
        TrainConfig(**{**cfg.__dict__, "regime": "image"}),
        tmp_path / "w",
        progress=False,
    )
    rand = train_saes(
        base.saes,
        data,
        [0],
        TrainConfig(**{**cfg.__dict__, "regime": "random"}),
        tmp_path / "r",
        progress=False,
    )
    cos_warm = float(decoder_cosine(warm.saes[0], base.saes[0]).mean())
    cos_rand = float(decoder_cosine(rand.saes[0], base.saes[0]).mean())
    assert cos_warm > 0.95 and cos_rand < 0.3, (cos_warm, cos_rand)
    assert warm.metrics[0]["fvu"] < 0.1 < rand.metrics[0]["fvu"]  # warm start begins trained
    assert rand.saes[0].cfg.d_sae == base.saes[0].cfg.d_sae


def test_warm_start_from_jumprelu_goes_through_to_topk(tmp_path, atoms):
    from mmdiff.sae.jumprelu import JumpReLUSAE

    jr = JumpReLUSAE(SAEConfig(architecture="jumprelu", d_in=D, d_sae=64, hook_layer=0))
    with torch.no_grad():
        jr.W_dec.mul_(torch.linspace(0.5, 2.0, 64)[:, None])  # non-unit decoder rows
    cfg = TrainConfig(
        k=4, batch_size=128, total_tokens=128 * 2, buffer_tokens=512, checkpoint_every=0
    )
    result = train_saes({0: jr}, synthetic_batches(atoms, 2), [0], cfg, tmp_path, progress=False)
    sae = result.saes[0]
    assert sae.cfg.architecture == "topk" and sae.cfg.k == 4
    assert sae.decoder_norms().tolist() == pytest.approx([1.0] * 64, abs=1e-5)
    jr.save(tmp_path / "jr")  # any load_sae-readable folder works as a warm start too
    from_path = train_saes(
        {0: tmp_path / "jr"}, synthetic_batches(atoms, 2), [0], cfg, tmp_path / "p", progress=False
    )
    assert torch.equal(from_path.saes[0].W_dec, sae.W_dec)
    with pytest.raises(SAEError, match="trained at layer 0"):
        train_saes({1: jr}, synthetic_batches(atoms, 2), [1], cfg, tmp_path / "x", progress=False)


def test_checkpoint_refuses_other_settings(atoms, tmp_path):
    data = synthetic_batches(atoms, 2)
    cfg = TrainConfig(
        k=2,
        d_sae=16,
        batch_size=64,
        total_tokens=64 * 3,
        buffer_tokens=256,
        checkpoint_every=1,
        keep_checkpoint=True,
    )
    first = train_saes(None, data, [0], cfg, tmp_path, progress=False)
    assert (tmp_path / CHECKPOINT_DIR / "state.pt").is_file()
    # a kill between atomic_dir's two renames leaves only .checkpoint.old: still resumable
    (tmp_path / CHECKPOINT_DIR).rename(tmp_path / f".{CHECKPOINT_DIR}.old")
    again = train_saes(None, data, [0], cfg, tmp_path, progress=False)
    assert again.resumed_from_step == 3 and torch.equal(again.saes[0].W_dec, first.saes[0].W_dec)
    longer = TrainConfig(**{**cfg.__dict__, "total_tokens": 64 * 5})  # extending a finished run
    assert train_saes(None, data, [0], longer, tmp_path, progress=False).steps == 5
    with pytest.raises(ConfigError, match="another data"):
        train_saes(None, synthetic_batches(atoms, 2, seed=9), [0], cfg, tmp_path, progress=False)
    with pytest.raises(ConfigError, match="lr"):
        train_saes(
            None, data, [0], TrainConfig(**{**cfg.__dict__, "lr": 1e-3}), tmp_path, progress=False
        )


def test_trains_from_an_activation_store_and_resumes_exactly(atoms, tmp_path):
    from mmdiff.store import ActivationStore, ActivationStoreWriter

    # special tokens hold NaN: the store keeps them, the trainer must not read them
    batches = synthetic_batches(atoms, 6, nan_types=(SPC,))
    with ActivationStoreWriter(
        tmp_path / "store", [0, 1], D, dtype="float32", shard_tokens=512
    ) as w:
        for b in batches:
            w.add(b)
    store = ActivationStore(tmp_path / "store")
    cfg = TrainConfig(
        k=4, d_sae=64, batch_size=128, total_tokens=128 * 14, buffer_tokens=512,
        checkpoint_every=0, keep_checkpoint=True, log_every=1,
    )  # fmt: skip
    straight = train_saes(None, store, [0, 1], cfg, tmp_path / "a", progress=False)
    short = TrainConfig(**{**cfg.__dict__, "total_tokens": 128 * 5})
    train_saes(None, store, [0, 1], short, tmp_path / "b", progress=False)
    rest = train_saes(None, store, [0, 1], cfg, tmp_path / "b", progress=False)
    assert rest.resumed_from_step == 5 and rest.steps == straight.steps == 14  # two epochs
    for L in (0, 1):
        assert torch.equal(rest.saes[L].W_enc, straight.saes[L].W_enc)
        fvu = [r["fvu"] for r in straight.metrics if r["layer"] == L]
        assert all(math.isfinite(v) for v in fvu) and fvu[-1] < fvu[0]
    assert rest.metrics == straight.metrics


# ----------------------------------------------------------------------------- SIGKILL + resume

KILL_CFG = {
    "k": 4,
    "d_sae": 64,
    "batch_size": 64,
    "total_tokens": 64 * 40,
    "buffer_tokens": 256,
    "checkpoint_every": 7,
    "dead_tokens_threshold": 100,
    "log_every": 5,
    "seed": 11,
}
KILL_ITEMS, KILL_AFTER = 6, 8  # 6 source batches per epoch; the child hangs when asked for the 9th

CHILD = """
import sys, time, torch
from pathlib import Path
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from test_sae_trainer import KILL_AFTER, KILL_CFG, KILL_ITEMS, sparse_dictionary, synthetic_batches
from mmdiff.sae.trainer import TrainConfig, train_saes

class HangsLater:
    def __init__(self, items):
        self.items, self.served = items, 0
    def __iter__(self):
        for item in self.items:
            if self.served == KILL_AFTER:
                Path({marker!r}).touch()
                time.sleep(900)
            self.served += 1
            yield item

data = synthetic_batches(sparse_dictionary(), KILL_ITEMS)
train_saes(None, HangsLater(data), [0, 1], TrainConfig(**KILL_CFG), {out!r}, progress=False)
"""


def test_sigkill_then_resume_is_bit_identical_to_uninterrupted(tmp_path):
    killed, marker = tmp_path / "killed", tmp_path / "hanging"
    script = tmp_path / "child.py"
    script.write_text(
        textwrap.dedent(
            CHILD.format(tests=str(Path(__file__).parent), marker=str(marker), out=str(killed))
        )
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    child = subprocess.Popen(
        [sys.executable, str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 300  # generous: the CI machine may be shared
        while not marker.exists():
            if child.poll() is not None:
                pytest.fail(f"child exited early: {child.stdout.read().decode()}")
            assert time.monotonic() < deadline, "the child never reached the kill point"
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL
    assert (killed / CHECKPOINT_DIR / "state.pt").is_file()
    assert not (killed / METRICS_FILE).exists()

    data = synthetic_batches(sparse_dictionary(), KILL_ITEMS)
    cfg = TrainConfig(**KILL_CFG)
    with one_thread():
        resumed = train_saes(None, data, [0, 1], cfg, killed, progress=False)
        straight = train_saes(None, data, [0, 1], cfg, tmp_path / "straight", progress=False)
    assert resumed.resumed_from_step > 0 and resumed.resumed_from_step % 7 == 0
    assert resumed.steps == straight.steps == 40
    for L in (0, 1):
        for name, t in straight.saes[L].state_dict().items():
            assert torch.equal(resumed.saes[L].state_dict()[name], t), f"layer {L} {name} differs"
    assert resumed.metrics == straight.metrics
    assert any(r["auxk_loss"] > 0 for r in straight.metrics)  # the dead-latent state was exercised


# ----------------------------------------------------------------------------- the study recipe


def test_train_study_saes_writes_every_role_and_the_tables(atoms, tmp_path):
    base_atoms = atoms
    vlm_atoms = sparse_dictionary(seed=0).clone()
    vlm_atoms[:8] = sparse_dictionary(n_atoms=8, seed=7)  # fine-tuning moved 8 of the 64 directions
    data = {
        "base": synthetic_batches(base_atoms, 6, seed=1),
        "vlm": synthetic_batches(vlm_atoms, 6, seed=2),
    }
    held = {
        "base": synthetic_batches(base_atoms, 2, seed=3),
        "vlm": synthetic_batches(vlm_atoms, 2, seed=4),
    }
    cfg = TrainConfig(
        k=4, batch_size=256, total_tokens=256 * 10, buffer_tokens=1024, checkpoint_every=0
    )
    base_cfg = TrainConfig(
        k=4,
        d_sae=64,
        batch_size=256,
        total_tokens=256 * 30,
        lr=5e-3,
        buffer_tokens=1024,
        checkpoint_every=0,
    )
    study = train_study_saes(
        None,
        [],
        [],
        [0],
        cfg,
        tmp_path,
        base_cfg=base_cfg,
        spliced=False,
        progress=False,
        data=data,
        heldout=held,
    )
    for role in ("base", "full", "image", "text", "random"):
        assert (tmp_path / "saes" / role / "layer_0" / "cfg.json").is_file()
        assert study.saes[role][0].cfg.d_sae == 64
    held_df = pd.read_parquet(study.tables["heldout"])
    assert set(zip(held_df["regime"], held_df["side"])) == {
        ("base", "base"),
        *((r, "vlm") for r in study.saes),
    }
    by_layer = pd.read_parquet(study.tables["decoder_cosine_by_layer"]).set_index("regime")[
        "mean_cosine"
    ]
    assert by_layer["full"] > 0.5 > by_layer["random"]
    for name in ("fvu_curves_png", "fvu_by_token_type_png", "decoder_cosine_png"):
        assert study.tables[name].stat().st_size > 1000
    curves = pd.read_parquet(study.tables["fvu_curves"])
    assert set(curves["regime"]) == {"base", "full", "image", "text", "random"}
    # a second call reloads the finished roles instead of training again
    again = train_study_saes(
        None,
        [],
        [],
        [0],
        cfg,
        tmp_path,
        base_cfg=base_cfg,
        spliced=False,
        progress=False,
        data=data,
        heldout=held,
    )
    assert torch.equal(again.saes["text"][0].W_dec, study.saes["text"][0].W_dec)
    assert all(r.reloaded for r in again.results.values())
    # new VLM data: the regimes retrain, the base SAEs (same base data) are reloaded
    data2 = {"base": data["base"], "vlm": synthetic_batches(vlm_atoms, 6, seed=12)}
    third = train_study_saes(
        None, [], [], [0], cfg, tmp_path, base_cfg=base_cfg, spliced=False, plots=False,
        progress=False, data=data2, heldout=held,
    )  # fmt: skip
    assert third.results["base"].reloaded and not third.results["text"].reloaded
    assert not torch.equal(third.saes["text"][0].W_dec, study.saes["text"][0].W_dec)
    forced = train_study_saes(
        None, [], [], [0], cfg, tmp_path, base_cfg=base_cfg, spliced=False, plots=False,
        progress=False, data=data2, heldout=held, resume=False,
    )  # fmt: skip
    assert not any(r.reloaded for r in forced.results.values())
    assert torch.equal(forced.saes["text"][0].W_dec, third.saes["text"][0].W_dec)  # deterministic


def test_train_study_saes_from_pretrained_base_saes(atoms, tmp_path):
    from mmdiff.sae.jumprelu import JumpReLUSAE

    scope = JumpReLUSAE(SAEConfig(architecture="jumprelu", d_in=D, d_sae=64, hook_layer=0))
    scope.save(tmp_path / "scope_L0")  # stands in for a Llama Scope / Gemma Scope folder
    data = {"vlm": synthetic_batches(atoms, 2, seed=2)}
    held = {"base": synthetic_batches(atoms, 1, seed=3), "vlm": synthetic_batches(atoms, 1, seed=4)}
    cfg = TrainConfig(k=4, batch_size=128, total_tokens=128 * 2, buffer_tokens=512)
    study = train_study_saes(
        None, [], [], [0], cfg, tmp_path / "run", regimes=("text",), base_saes={0: tmp_path / "scope_L0"},
        spliced=False, plots=False, progress=False, data=data, heldout=held,
    )  # fmt: skip
    assert load_sae(tmp_path / "run" / "saes" / "base" / "layer_0").cfg.architecture == "jumprelu"
    assert study.saes["text"][0].cfg.architecture == "topk" and study.results["text"].steps == 2
    curves = pd.read_parquet(study.tables["fvu_curves"])
    assert set(curves["regime"]) == {"text"}  # the imported base SAEs have no training curve
    with pytest.raises(SAEError, match="layers \\[1\\]"):
        train_study_saes(
            None, [], [], [0, 1], cfg, tmp_path / "run2", base_saes={0: tmp_path / "scope_L0"},
            data=data, heldout=held, progress=False,
        )  # fmt: skip


def test_train_study_saes_on_a_tiny_llava_with_live_capture(tmp_path):
    """The real data path: capture from a tiny LLaVA and its base LM, spliced-in loss on both."""
    from PIL import Image

    from mmdiff.data.records import Record
    from mmdiff.models.tiny import load_tiny

    adapter = load_tiny("llava", tmp_path / "tiny")
    records = [
        Record(
            id=f"r{i}",
            question="Is the red circle left of the blue square?",
            answers=["yes"],
            image=Image.new("RGB", (16, 16), (40 * i, 0, 200)),
            caption="A red circle to the left of a blue square.",
        )
        for i in range(5)
    ]
    cfg = TrainConfig(k=4, d_sae=64, batch_size=32, total_tokens=32 * 4, buffer_tokens=64)
    study = train_study_saes(
        adapter, records[:3], records[3:], [1], cfg, tmp_path / "run",
        capture_batch_size=2, plots=False, progress=False,
    )  # fmt: skip
    assert all(study.results[r].steps == 4 for r in ("base", "full", "image", "text", "random"))
    held = pd.read_parquet(study.tables["heldout"]).set_index(["regime", "side"])
    assert held.loc[("base", "base"), "n_image_tokens"] == 0  # captions stand in for images
    assert held.loc[("full", "vlm"), "n_image_tokens"] > 0
    spliced = pd.read_parquet(study.tables["spliced_loss"])
    assert len(spliced) == 1 + 5  # base SAE on the base LM, every role on the VLM
    assert spliced[["ce_clean", "ce_sae", "ce_zero"]].notna().all().all()
    assert (spliced["n_targets"] > 0).all()
    # each side scored where it was trained to predict: the VLM on the answer (+ EOS)
    assert spliced.groupby("side")["targets"].unique().map(list).to_dict() == {
        "base": ["text"], "vlm": ["answer"],
    }  # fmt: skip
