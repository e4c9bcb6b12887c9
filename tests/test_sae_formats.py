"""Checkpoint formats: SAELens interop both ways, Llama Scope's faithful formula, Gemma Scope npz,
MMDiff checkpoints, warm-start conversion, and the errors for misfit or corrupt checkpoints."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from mmdiff.errors import SAEError
from mmdiff.sae import SAEConfig, build_sae, load_sae, to_topk
from mmdiff.sae.formats.gemma_scope import save_gemma_scope
from mmdiff.sae.formats.mmdiff_ckpt import save_mmdiff_checkpoint

D, F = 8, 32


def _random_sae(arch: str, seed: int = 0, **kw):
    cfg = SAEConfig(architecture=arch, d_in=D, d_sae=F, hook_layer=3,
                    hook_name="blocks.3.hook_resid_post", model_name="tiny", **kw)
    sae = build_sae(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(D, F, generator=g))
        sae.b_enc.copy_(torch.randn(F, generator=g) * 0.3)
        # decoder norms deliberately far from 1
        sae.W_dec.copy_(torch.randn(F, D, generator=g) * torch.rand(F, 1, generator=g) * 3)
        sae.b_dec.copy_(torch.randn(D, generator=g))
        if hasattr(sae, "threshold"):
            sae.threshold.copy_(torch.rand(F, generator=g) * 2)
    return sae.eval()


def _x(n: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed)) * 2


# ----------------------------------------------------------------------------- SAELens interop
CASES = [
    ("topk", dict(k=4)),
    ("topk", dict(k=4, norm_scale=2.5, apply_b_dec_to_input=False)),
    ("topk", dict(k=4, decoder_norm_gating=True)),
    ("relu", dict()),
    ("jumprelu", dict()),
    ("jumprelu", dict(norm_scale=0.7, decoder_norm_gating=True, apply_b_dec_to_input=False)),
    ("batchtopk", dict(k=4)),
]


@pytest.mark.parametrize("arch,kw", CASES)
def test_our_folder_loads_in_saelens_with_identical_encodings(tmp_path: Path, arch, kw) -> None:
    sae_lens = pytest.importorskip("sae_lens")
    ours = _random_sae(arch, **kw)
    ours.save(tmp_path / "sae")
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "sae"))
    x = _x()
    with torch.no_grad():
        f_ours, f_theirs = ours.encode(x), theirs.encode(x)
        if kw.get("decoder_norm_gating") and arch == "topk":
            # saved with unit decoders: same latents and x_hat, activations scaled by ||d_i||
            f_ours = f_ours * ours.W_dec.norm(dim=1)
        torch.testing.assert_close(f_theirs, f_ours, rtol=1e-5, atol=1e-5)
        assert (f_ours > 0).sum() > 0 and (f_ours == 0).sum() > 0  # non-degenerate case
        torch.testing.assert_close(theirs.decode(f_theirs), ours(x).x_hat, rtol=1e-4, atol=1e-4)
    back = load_sae(tmp_path / "sae", d_in=D, layer=3)  # and back into ours
    assert back.cfg.architecture == arch and back.cfg.hook_name == "blocks.3.hook_resid_post"
    with torch.no_grad():
        torch.testing.assert_close(back(x).x_hat, ours(x).x_hat, rtol=1e-4, atol=1e-4)


def _saelens_saved(tmp_path: Path, arch: str, **extra):
    sae_lens = pytest.importorskip("sae_lens")
    from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
    from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    cls, cfg_cls = {"topk": (TopKSAE, TopKSAEConfig), "standard": (StandardSAE, StandardSAEConfig),
                    "jumprelu": (JumpReLUSAE, JumpReLUSAEConfig)}[arch]
    cfg = cfg_cls(d_in=D, d_sae=F, **extra)
    cfg.metadata.hook_name = "blocks.5.hook_resid_post"
    sae = cls(cfg)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if name != "threshold" else 1).__abs__())
    sae.save_model(str(tmp_path / "theirs"))
    assert sae_lens is not None
    return sae


@pytest.mark.parametrize("arch,extra", [("topk", dict(k=5)),
                                        ("topk", dict(k=5, rescale_acts_by_decoder_norm=True)),
                                        ("standard", dict()), ("jumprelu", dict())])
def test_saelens_folder_loads_in_ours_with_identical_encodings(tmp_path: Path, arch, extra) -> None:
    theirs = _saelens_saved(tmp_path, arch, **extra)
    ours = load_sae(tmp_path / "theirs", d_in=D, layer=5)
    assert ours.cfg.hook_layer == 5
    x = _x()
    with torch.no_grad():
        f = theirs.encode(x)
        assert (f > 0).sum() > 0 and (f == 0).sum() > 0
        torch.testing.assert_close(ours.encode(x), f, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours(x).x_hat, theirs(x), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------- Llama Scope
def _write_llama_scope(root: Path, layer: int = 7, d: int = 16, f: int = 64, theta: float = 0.4,
                       avg_norm: float = 9.0, seed: int = 0) -> tuple[Path, dict]:
    folder = root / f"Llama3_1-8B-Base-L{layer}R-8x"
    (folder / "checkpoints").mkdir(parents=True)
    hp = {  # key names as the Llama Scope release writes them
        "d_model": d, "expansion_factor": f // d, "d_sae": f,
        "hook_point_in": f"blocks.{layer}.hook_resid_post",
        "hook_point_out": f"blocks.{layer}.hook_resid_post",
        "use_decoder_bias": True, "apply_decoder_bias_to_pre_encoder": False,
        "norm_activation": "dataset-wise", "sparsity_include_decoder_norm": True,
        "act_fn": "jumprelu", "jump_relu_threshold": theta, "top_k": 50,
        "dataset_average_activation_norm": {"in": avg_norm, "out": avg_norm},
        "use_glu_encoder": False, "lp": 1,
    }
    (folder / "hyperparams.json").write_text(json.dumps(hp))
    g = torch.Generator().manual_seed(seed)
    w = {
        "encoder.weight": torch.randn(f, d, generator=g) * 0.3,
        "encoder.bias": torch.randn(f, generator=g) * 0.1,
        # decoder column norms spread over [0.05, 2], never 1
        "decoder.weight": torch.nn.functional.normalize(torch.randn(d, f, generator=g), dim=0)
        * torch.linspace(0.05, 2.0, f),
        "decoder.bias": torch.randn(d, generator=g) * 0.2,
    }
    save_file(w, str(folder / "checkpoints" / "final.safetensors"))
    return folder, {"hp": hp, **w}


def test_llama_scope_reproduces_method_formula(tmp_path: Path) -> None:
    folder, ref = _write_llama_scope(tmp_path)
    sae = load_sae(folder, d_in=16, layer=7)
    assert sae.cfg.architecture == "jumprelu" and sae.cfg.decoder_norm_gating
    hp = ref["hp"]
    D_, theta = hp["d_model"], hp["jump_relu_threshold"]
    s = math.sqrt(D_) / hp["dataset_average_activation_norm"]["in"]
    W_enc, b_enc = ref["encoder.weight"].double(), ref["encoder.bias"].double()
    W_dec, b_dec = ref["decoder.weight"].double(), ref["decoder.bias"].double()
    x = torch.randn(200, D_, generator=torch.Generator().manual_seed(9), dtype=torch.float64) * 9 / 4
    # docs/method.md#file-formats, written out independently of the loader:
    pre = s * x @ W_enc.T + b_enc
    dn = W_dec.norm(dim=0)
    f_method = pre * (pre * dn > s * theta)
    x_hat_method = (f_method @ W_dec.T + b_dec) / s
    with torch.no_grad():
        f = sae.encode(x.float()).double()
        out = sae(x.float())
    torch.testing.assert_close(f, f_method, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.x_hat.double(), x_hat_method, rtol=1e-4, atol=1e-4)
    # SAELens's formula drops ||d_i|| and fires a different set of latents (here: fewer/more).
    f_saelens = pre * (pre > s * theta)
    l0_method, l0_saelens = (f_method > 0).sum().item(), (f_saelens > 0).sum().item()
    assert l0_method > 0 and l0_method != l0_saelens
    assert not torch.equal(f_method > 0, f_saelens > 0)


def test_llama_scope_saved_natively_keeps_encodings_in_saelens(tmp_path: Path) -> None:
    sae_lens = pytest.importorskip("sae_lens")
    folder, _ = _write_llama_scope(tmp_path)
    ours = load_sae(folder)
    ours.save(tmp_path / "native")
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "native"))
    x = torch.randn(100, 16, generator=torch.Generator().manual_seed(2)) * 2
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x), ours.encode(x), rtol=1e-4, atol=1e-5)


def test_to_topk_warm_start_from_llama_scope(tmp_path: Path) -> None:
    folder, _ = _write_llama_scope(tmp_path)
    js = load_sae(folder)
    tk = to_topk(js, k=3)
    assert tk.cfg.architecture == "topk" and tk.cfg.k == 3 and not tk.cfg.decoder_norm_gating
    torch.testing.assert_close(tk.W_dec.norm(dim=1), torch.ones(64))
    x = torch.randn(50, 16, generator=torch.Generator().manual_seed(3)) * 2
    with torch.no_grad():
        pre = js.hidden_pre(x)
        z = pre * js.W_dec.norm(dim=1)  # Llama Scope's ranking quantity
        expect = torch.zeros_like(z).scatter(1, z.topk(3, dim=1).indices, z.topk(3, dim=1).values.relu())
        torch.testing.assert_close(tk.encode(x), expect, rtol=1e-5, atol=1e-5)
        # each active latent reconstructs along the same direction as in the JumpReLU SAE
        f = tk.encode(x)
        x_hat = (f @ tk.W_dec + tk.b_dec) / tk.cfg.norm_scale
        torch.testing.assert_close(tk(x).x_hat, x_hat, rtol=1e-5, atol=1e-5)
    with pytest.raises(SAEError, match="k must be"):
        to_topk(js, k=0)


# ----------------------------------------------------------------------------------- Gemma Scope
def test_gemma_scope_npz_round_trip(tmp_path: Path) -> None:
    g = np.random.default_rng(0)
    arrays = {"W_enc": g.normal(size=(D, F)).astype(np.float32),
              "W_dec": g.normal(size=(F, D)).astype(np.float32),
              "b_enc": g.normal(size=F).astype(np.float32) * 0.2,
              "b_dec": g.normal(size=D).astype(np.float32),
              "threshold": g.uniform(0, 1.5, size=F).astype(np.float32)}
    path = tmp_path / "layer_4" / "width_16k" / "average_l0_10" / "params.npz"
    path.parent.mkdir(parents=True)
    np.savez(path, **arrays)
    sae = load_sae(path.parent, layer=4)
    x = torch.randn(40, D, generator=torch.Generator().manual_seed(0)) * 2
    pre = x.double() @ torch.from_numpy(arrays["W_enc"]).double() + torch.from_numpy(arrays["b_enc"])
    f_ref = pre.relu() * (pre > torch.from_numpy(arrays["threshold"]).double())
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x).double(), f_ref, rtol=1e-5, atol=1e-5)
    # save as npz (with scale and gating folded) and read back: identical encodings
    odd = _random_sae("jumprelu", norm_scale=1.7, decoder_norm_gating=True)
    save_gemma_scope(odd, tmp_path / "out" / "params.npz")
    back = load_sae(tmp_path / "out")
    with torch.no_grad():
        torch.testing.assert_close(back.encode(x), odd.encode(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(back(x).x_hat, odd(x).x_hat, rtol=1e-4, atol=1e-4)


def test_mmdiff_checkpoint_is_lossless(tmp_path: Path) -> None:
    sae = _random_sae("jumprelu", norm_scale=1.3, decoder_norm_gating=True, l1_coefficient=0.2)
    p = save_mmdiff_checkpoint(sae, tmp_path / "ckpt" / "layer3")
    back = load_sae(p, d_in=D, d_sae=F, layer=3)
    assert back.cfg.norm_scale == 1.3 and back.cfg.decoder_norm_gating
    assert back.cfg.l1_coefficient == 0.2
    for k, v in sae.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)


# ------------------------------------------------------------------------------------- errors
def test_misfit_checkpoint_errors(tmp_path: Path) -> None:
    _random_sae("topk", k=4).save(tmp_path / "s")
    with pytest.raises(SAEError, match=r"SAE at layer 3 expects d_in=8, the model's hidden size "
                                       r"is 2048: is this SAE for another model\?"):
        load_sae(tmp_path / "s", d_in=2048)
    with pytest.raises(SAEError, match="trained at layer 3.*serve layer 12"):
        load_sae(tmp_path / "s", layer=12)
    with pytest.raises(SAEError, match="d_sae=32 latents, expected 64"):
        load_sae(tmp_path / "s", d_sae=64)


def test_corrupt_and_nan_checkpoints(tmp_path: Path) -> None:
    _random_sae("topk", k=4).save(tmp_path / "s")
    w = tmp_path / "s" / "sae_weights.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(SAEError, match="sae_weights.safetensors cannot be read"):
        load_sae(tmp_path / "s")
    _random_sae("topk", k=4).save(tmp_path / "t")
    (tmp_path / "t" / "cfg.json").write_text('{"architecture": "topk", "d_in": ')
    with pytest.raises(SAEError, match=r"t/cfg.json is not valid JSON"):
        load_sae(tmp_path / "t")
    nan = _random_sae("relu")
    save_mmdiff_checkpoint(nan, tmp_path / "n" / "x")
    tensors = {k: v.clone() for k, v in nan.state_dict().items()}
    tensors["W_dec"][3, 2] = float("nan")
    save_file(tensors, str(tmp_path / "n" / "x.safetensors"))
    with pytest.raises(SAEError, match="'W_dec' holds 1 NaN/inf"):
        load_sae(tmp_path / "n")
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "params.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(SAEError, match="params.npz cannot be read"):
        load_sae(tmp_path / "g")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SAEError, match="no SAE checkpoint recognised"):
        load_sae(tmp_path / "empty")


def test_hub_id_offline_and_not_cached(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(SAEError, match="not cached and the hub cannot be reached"):
        load_sae("nobody-xyz/no-such-sae/layer_3")


def test_save_records_the_tensors_dtype_after_to(tmp_path: Path) -> None:
    sae = _random_sae("topk", k=4).to(torch.float64)
    sae.save(tmp_path / "s")
    assert json.loads((tmp_path / "s" / "cfg.json").read_text())["dtype"] == "float64"
    assert load_sae(tmp_path / "s").W_enc.dtype == torch.float64
    assert load_sae(tmp_path / "s", dtype="bfloat16").W_dec.dtype == torch.bfloat16


def test_sae_load_classmethod_checks_the_class(tmp_path: Path) -> None:
    from mmdiff.sae import SAE, JumpReLUSAE, TopKSAE

    _random_sae("topk", k=4).save(tmp_path / "s")
    assert isinstance(SAE.load(tmp_path / "s", d_in=D), TopKSAE)
    with pytest.raises(SAEError, match="holds a topk SAE, not a JumpReLUSAE"):
        JumpReLUSAE.load(tmp_path / "s")


# ---------------------------------------------------------------------------- EleutherAI sparsify
def _sparsify_checkpoint(folder: Path, hookpoint: str = "layers.3", **cfg_kw):
    """A checkpoint written by the real sparsify package (SparseCoder.save_to_disk)."""
    sparsify = pytest.importorskip("sparsify")
    torch.manual_seed(0)
    coder = sparsify.SparseCoder(D, sparsify.SparseCoderConfig(num_latents=F, k=4, **cfg_kw))
    with torch.no_grad():
        coder.encoder.bias.copy_(torch.randn(F) * 0.3)
        coder.b_dec.copy_(torch.randn(D))
    coder.save_to_disk(folder / hookpoint)
    return coder, folder / hookpoint


def test_sparsify_checkpoint_loads_with_identical_encodings(tmp_path: Path) -> None:
    coder, folder = _sparsify_checkpoint(tmp_path)
    ours = load_sae(folder, d_in=D, layer=3)
    assert ours.cfg.architecture == "topk" and ours.cfg.k == 4 and ours.cfg.d_sae == F
    assert ours.cfg.hook_name == "blocks.3.hook_resid_post"
    x = _x()
    with torch.no_grad():
        enc = coder.encode(x)
        theirs = torch.zeros(len(x), F).scatter(1, enc.top_indices, enc.top_acts)
        torch.testing.assert_close(ours.encode(x), theirs, rtol=1e-5, atol=1e-5)
        assert (theirs > 0).sum() > 0
        torch.testing.assert_close(ours(x).x_hat, coder(x).sae_out, rtol=1e-4, atol=1e-4)
    with pytest.raises(SAEError, match="trained at layer 3"):
        load_sae(folder, layer=5)
    # the dry run reads the same facts from the headers
    from mmdiff.checks import probe_sae

    facts = probe_sae(folder)
    assert (facts.format, facts.d_in, facts.d_sae, facts.layer) == ("sparsify", D, F, 3)


def test_sparsify_checkpoint_as_warm_start(tmp_path: Path) -> None:
    from mmdiff.sae.warm_start import warm_start_sae

    coder, folder = _sparsify_checkpoint(tmp_path)
    warm = warm_start_sae(folder, layer=3, k=4)
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(warm(x).x_hat, coder(x).sae_out, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kw,hookpoint,match", [
    (dict(transcode=True), "layers.3", "transcoder"),
    (dict(skip_connection=True), "layers.3", "skip_connection"),
    (dict(), "layers.3.mlp", "not the residual stream"),
])
def test_sparsify_checkpoints_we_cannot_express_are_refused(tmp_path: Path, kw, hookpoint, match) -> None:
    _, folder = _sparsify_checkpoint(tmp_path, hookpoint, **kw)
    with pytest.raises(SAEError, match=match):
        load_sae(folder)


def test_saved_folder_names_its_hook_point_for_saelens(tmp_path: Path) -> None:
    """SAELens and Neuronpedia read where an SAE reads from cfg.json's hook_name and model_name."""
    sae_lens = pytest.importorskip("sae_lens")
    from mmdiff.sae.formats.saelens import set_model_name

    sae = _random_sae("topk", k=4)
    sae.cfg.hook_name, sae.cfg.model_name = None, None  # as the trainer builds them
    sae.save(tmp_path / "sae")
    set_model_name(tmp_path / "sae", "llava-hf/llava-1.5-7b-hf")
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "sae"))
    assert theirs.cfg.metadata.hook_name == "blocks.3.hook_resid_post"
    assert theirs.cfg.metadata.model_name == "llava-hf/llava-1.5-7b-hf"
    assert load_sae(tmp_path / "sae").cfg.model_name == "llava-hf/llava-1.5-7b-hf"
