"""The SAEs a training run starts from: TopK copies of warm-start SAEs (any architecture), or a
seeded random init, following the masking regime."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from mmdiff.errors import ConfigError, SAEError
from mmdiff.sae.stream import derived_seed

if TYPE_CHECKING:
    from mmdiff.sae.train_config import TrainConfig


def warm_start_sae(init: Any, layer: int, k: int, device: str | None = None) -> Any:
    """A trainable TopK copy of a warm-start SAE (an SAE object or a `load_sae`-readable path).

    Other architectures (JumpReLU checkpoints of Llama / Gemma Scope, ReLU, BatchTopK) go through
    `to_topk`. The copy is float32 with unit-norm decoder rows, each row's norm folded into its
    encoder column and bias so that every latent still writes the same vector
    (f_i d_i = (n_i f_i)(d_i / n_i)).
    """
    from mmdiff.sae.base import SAE, SAEConfig
    from mmdiff.sae.topk import TopKSAE

    if isinstance(init, SAE):
        sae = init
        if sae.cfg.hook_layer is not None and sae.cfg.hook_layer != layer:
            raise SAEError(
                f"the warm start given for layer {layer} was trained at layer {sae.cfg.hook_layer}: "
                "pass each layer its own SAE"
            )
    else:
        from mmdiff.sae import load_sae

        sae = load_sae(init, layer=layer)
    if sae.cfg.architecture != "topk":  # JumpReLU (Llama / Gemma Scope), ReLU, BatchTopK
        from mmdiff.sae import to_topk

        sae = to_topk(sae, k=k)
    cfg = SAEConfig.from_dict(
        {
            **sae.cfg.to_dict(),
            "architecture": "topk",
            "k": k,
            "dtype": "float32",
            "decoder_norm_gating": False,
            "hook_layer": layer,
            "device": device or str(sae.W_enc.device),
        }
    )
    out = TopKSAE(cfg)
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(out, name).copy_(getattr(sae, name).float())
        fold_decoder_norms_(out)
    return out


@torch.no_grad()
def fold_decoder_norms_(sae: Any) -> None:
    """Make decoder rows unit-norm without changing what each active latent writes."""
    norms = sae.W_dec.norm(dim=1).clamp_min(1e-12)  # [d_sae]
    sae.W_enc.mul_(norms[None, :])
    sae.b_enc.mul_(norms)
    sae.W_dec.div_(norms[:, None])


def random_sae(
    d_in: int,
    d_sae: int,
    k: int,
    layer: int,
    seed: int,
    device: str = "cpu",
    like: Any = None,
    purpose: str = "init",
) -> Any:
    """A randomly initialised TopK SAE (the `random` control, or a first SAE with no warm start).

    Unit-norm random decoder rows, encoder = decoder transpose, zero biases; b_dec is set to the
    mean of the first training batch by the trainer. `like` copies hook names / model name. The
    init is seeded by (seed, purpose, layer): the `random` control and a base SAE trained from
    scratch with the same seed must not start from the same weights.
    """
    from mmdiff.sae.base import SAEConfig
    from mmdiff.sae.topk import TopKSAE

    base = like.cfg.to_dict() if like is not None else {}
    keep = {k_: base[k_] for k_ in ("hook_name", "model_name") if k_ in base}
    cfg = SAEConfig(
        architecture="topk",
        d_in=d_in,
        d_sae=d_sae,
        k=k,
        hook_layer=layer,
        device=device,
        norm_scale=float(base.get("norm_scale", 1.0)),
        apply_b_dec_to_input=True,
        metadata={"init": "random", "seed": seed, "init_purpose": purpose},
        **keep,
    )
    sae = TopKSAE(cfg)
    sae.init_weights(seed=derived_seed(seed, purpose, layer))
    return sae


def build_saes(
    init: Mapping[int, Any] | None,
    dims: Mapping[int, int] | None,
    layers: Sequence[int],
    cfg: TrainConfig,
) -> tuple[dict[int, Any], dict[int, Any]]:
    """(trainable TopK SAEs, frozen warm-start SAEs) per layer, following the regime.

    dims: d_in per layer, needed only for a random init without warm start.
    """
    warm: dict[int, Any] = {}
    if init is not None:
        missing = [L for L in layers if L not in init]
        if missing:
            raise SAEError(
                f"no warm-start SAE for layers {missing} (have {sorted(init)}); pass one per trained layer"
            )
        warm = {L: warm_start_sae(init[L], L, cfg.k, cfg.device) for L in layers}
    if warm and cfg.regime != "random":
        return warm, warm_copies(warm)
    if warm:
        dims = {L: warm[L].cfg.d_in for L in layers}
    if dims is None:
        raise SAEError("a random init needs the activation width: pass dims or a warm start")
    device = cfg.device or (str(next(iter(warm.values())).W_dec.device) if warm else "cpu")
    saes = {}
    for L in layers:
        d_sae = warm[L].cfg.d_sae if warm else (cfg.d_sae or cfg.expansion_factor * dims[L])
        if cfg.k > d_sae:
            raise ConfigError(f"k={cfg.k} is larger than d_sae={d_sae} at layer {L}")
        saes[L] = random_sae(
            dims[L],
            d_sae,
            cfg.k,
            L,
            cfg.seed,
            device,
            like=warm.get(L),
            purpose="random control" if cfg.regime == "random" else "init",
        )
    return saes, warm_copies(warm)


def warm_copies(warm: Mapping[int, Any]) -> dict[int, Any]:
    """Frozen copies of the warm-start SAEs, to measure the decoder cosine after training."""
    import copy

    return {L: copy.deepcopy(s).requires_grad_(False) for L, s in warm.items()}
