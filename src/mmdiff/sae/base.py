"""The SAE contract shared by every architecture: config, parameters, encode / decode / forward.

Conventions (SAELens's, so our folders load there): W_enc [d_in, d_sae], b_enc [d_sae],
W_dec [d_sae, d_in], b_dec [d_in]. Inputs are multiplied by `norm_scale` before encoding and
reconstructions divided by it after decoding (Llama Scope's s = sqrt(D) / mean ||x||).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from mmdiff.errors import SAEError

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float": torch.float32,
    "float64": torch.float64,
    "double": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
}


def str_to_dtype(name: str | torch.dtype) -> torch.dtype:
    """"bfloat16" / "torch.bfloat16" / torch.bfloat16 -> torch.bfloat16; SAEError otherwise."""
    if isinstance(name, torch.dtype):
        return name
    key = str(name).removeprefix("torch.")
    if key not in _DTYPES:
        raise SAEError(f"unknown SAE dtype {name!r}; expected one of {sorted(_DTYPES)}.")
    return _DTYPES[key]


def dtype_to_str(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16"."""
    return str(dtype).removeprefix("torch.")


@dataclass
class SAEConfig:
    """Everything needed to rebuild an SAE besides its tensors."""

    architecture: str
    """Registered architecture name: "topk", "batchtopk", "jumprelu" or "relu"."""
    d_in: int
    """Width of the activations the SAE reads (the model's hidden size at the hook point)."""
    d_sae: int
    """Number of latents F."""
    k: int | None = None
    """Active latents per token (TopK) or on average per token (BatchTopK); None otherwise."""
    l1_coefficient: float = 0.0
    """Sparsity penalty weight: L1 for ReLU SAEs, L0 for JumpReLU SAEs; unused by TopK."""
    dtype: str = "float32"
    """Parameter dtype."""
    device: str = "cpu"
    """Parameter device."""
    hook_layer: int | None = None
    """Decoder layer whose residual output the SAE reads (HF hidden_states[L+1])."""
    hook_name: str | None = None
    """Hook point name, e.g. "blocks.12.hook_resid_post"."""
    model_name: str | None = None
    """The model the SAE was trained on."""
    norm_scale: float = 1.0
    """Inputs are multiplied by it before encoding, outputs divided by it after decoding."""
    apply_b_dec_to_input: bool = True
    """Subtract b_dec from the (scaled) input before the encoder."""
    decoder_norm_gating: bool = False
    """Gate / rank latents by pre_i * ||d_i|| instead of pre_i (Llama Scope)."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Free-form provenance (source format, release, training notes)."""

    def __post_init__(self) -> None:
        for name in ("d_in", "d_sae"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise SAEError(f"SAEConfig.{name} must be a positive int, got {value!r}.")
        if self.k is not None:
            if not isinstance(self.k, int) or isinstance(self.k, bool) or not 0 < self.k <= self.d_sae:
                raise SAEError(
                    f"SAEConfig.k must be an int in [1, d_sae={self.d_sae}], got {self.k!r}."
                )
        if not (isinstance(self.norm_scale, (int, float)) and math.isfinite(self.norm_scale)
                and self.norm_scale > 0):
            raise SAEError(
                f"SAEConfig.norm_scale must be a finite positive number, got {self.norm_scale!r}."
            )
        self.norm_scale = float(self.norm_scale)
        str_to_dtype(self.dtype)  # validates
        self.dtype = dtype_to_str(str_to_dtype(self.dtype))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SAEConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise SAEError(f"unknown SAEConfig keys {unknown}; known: {sorted(names)}.")
        return cls(**d)


class SAEOutput:
    """What `SAE.forward` returns. `feature_acts` is dense [..., d_sae], built on first access when
    the forward pass only produced the sparse (top_values, top_indices) pair."""

    __slots__ = ("_feature_acts", "d_sae", "hidden_pre", "top_indices", "top_values", "x_hat")

    def __init__(
        self,
        x_hat: Tensor,  # [..., d_in]
        feature_acts: Tensor | None = None,  # [..., d_sae]
        *,
        hidden_pre: Tensor | None = None,  # [..., d_sae] pre-activations, when computed
        top_values: Tensor | None = None,  # [..., k]
        top_indices: Tensor | None = None,  # [..., k]
        d_sae: int | None = None,
    ) -> None:
        if feature_acts is None and (top_values is None or top_indices is None or d_sae is None):
            raise SAEError("SAEOutput needs feature_acts or (top_values, top_indices, d_sae).")
        self.x_hat = x_hat
        self._feature_acts = feature_acts
        self.hidden_pre = hidden_pre
        self.top_values = top_values
        self.top_indices = top_indices
        self.d_sae = d_sae

    @property
    def feature_acts(self) -> Tensor:  # [..., d_sae]
        if self._feature_acts is None:
            assert self.top_values is not None and self.top_indices is not None
            dense = self.top_values.new_zeros(*self.top_values.shape[:-1], self.d_sae)
            self._feature_acts = dense.scatter(-1, self.top_indices, self.top_values)
        return self._feature_acts

    def __iter__(self):  # allows `x_hat, f = sae(x)`
        return iter((self.x_hat, self.feature_acts))


class SAE(nn.Module):
    """A sparse autoencoder; subclasses (one file each) define `activation` and register a name."""

    architecture: ClassVar[str] = ""

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        if self.architecture and cfg.architecture != self.architecture:
            raise SAEError(
                f"{type(self).__name__} implements architecture {self.architecture!r} but the "
                f"config says {cfg.architecture!r}: build it with build_sae(cfg)."
            )
        self.cfg = cfg
        dtype, device = str_to_dtype(cfg.dtype), torch.device(cfg.device)
        kw = {"dtype": dtype, "device": device}
        self.W_enc = nn.Parameter(torch.empty(cfg.d_in, cfg.d_sae, **kw))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, **kw))
        self.W_dec = nn.Parameter(torch.empty(cfg.d_sae, cfg.d_in, **kw))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, **kw))
        self.init_weights()

    # ----------------------------------------------------------------------------------- weights
    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Unit-norm random decoder rows, encoder = decoder transpose, zero biases."""
        if self.W_dec.is_meta:  # loaders build on "meta" and assign the real tensors
            return
        g = torch.Generator(device="cpu")
        if seed is not None:
            g.manual_seed(seed)
        else:
            g.seed()
        w = torch.randn(self.cfg.d_sae, self.cfg.d_in, generator=g, dtype=torch.float32)
        w /= w.norm(dim=1, keepdim=True).clamp_min(1e-12)
        self.W_dec.copy_(w)
        self.W_enc.copy_(w.T)
        self.b_enc.zero_()
        self.b_dec.zero_()

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    def decoder_norms(self) -> Tensor:  # [d_sae]
        return self.W_dec.norm(dim=1)

    def decoder_directions(self) -> Tensor:  # [d_sae, d_in], unit rows
        """Each latent's decoder direction d_i / ||d_i|| (zero rows stay zero)."""
        return self.W_dec / self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        """Rescale decoder rows to unit norm in place (the TopK training constraint)."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    def check_finite(self, where: str = "") -> None:
        """SAEError naming the first tensor that holds NaN or inf."""
        for name, t in self.state_dict().items():
            if t.is_floating_point() and not torch.isfinite(t).all():
                bad = int((~torch.isfinite(t)).sum())
                raise SAEError(
                    f"SAE {where or 'weights'}: tensor {name!r} holds {bad} NaN/inf values; "
                    "the checkpoint is corrupt or training diverged: use another checkpoint."
                )

    # ------------------------------------------------------------------------------ computation
    def sae_in(self, x: Tensor) -> Tensor:
        """[..., d_in] -> the encoder's input s*x - b_dec (or s*x), in the SAE's dtype."""
        if x.shape[-1] != self.cfg.d_in:
            where = f" at layer {self.cfg.hook_layer}" if self.cfg.hook_layer is not None else ""
            raise SAEError(
                f"SAE{where} expects inputs of width d_in={self.cfg.d_in}, got shape "
                f"{tuple(x.shape)}: is this SAE for another model or hook point?"
            )
        x = x.to(self.W_enc.dtype)
        if self.cfg.norm_scale != 1.0:
            x = x * self.cfg.norm_scale
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        return x

    def hidden_pre(self, x: Tensor) -> Tensor:  # [..., d_in] -> [..., d_sae]
        """Encoder pre-activations pre = (s*x - b_dec) @ W_enc + b_enc."""
        return self.sae_in(x) @ self.W_enc + self.b_enc

    def gating_pre(self, pre: Tensor) -> Tensor:
        """What thresholds / top-k compare: pre, or pre * ||d_i|| under decoder_norm_gating."""
        return pre * self.decoder_norms() if self.cfg.decoder_norm_gating else pre

    def activation(self, pre: Tensor) -> Tensor:  # [..., d_sae] -> [..., d_sae]
        raise NotImplementedError(f"{type(self).__name__} must implement activation(pre)")

    def encode(self, x: Tensor) -> Tensor:  # [..., d_in] -> [..., d_sae]
        """Dense feature activations f."""
        return self.activation(self.hidden_pre(x))

    def encode_sparse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        raise SAEError(
            f"encode_sparse needs a fixed number of active latents per token; "
            f"architecture {self.cfg.architecture!r} has none: use encode(x)."
        )

    def decode(self, f: Tensor) -> Tensor:  # [..., d_sae] -> [..., d_in]
        """x_hat = (f @ W_dec + b_dec) / s."""
        x_hat = f.to(self.W_dec.dtype) @ self.W_dec + self.b_dec
        return x_hat / self.cfg.norm_scale if self.cfg.norm_scale != 1.0 else x_hat

    def decode_sparse(self, values: Tensor, indices: Tensor) -> Tensor:
        """[..., k] values at [..., k] latent indices -> x_hat [..., d_in]."""
        from mmdiff.sae.kernels import sparse_decode

        lead = values.shape[:-1]
        out = sparse_decode(
            indices.reshape(-1, indices.shape[-1]),
            values.reshape(-1, values.shape[-1]).to(self.W_dec.dtype),
            self.W_dec,
        ) + self.b_dec
        out = out.reshape(*lead, self.cfg.d_in)
        return out / self.cfg.norm_scale if self.cfg.norm_scale != 1.0 else out

    def forward(self, x: Tensor) -> SAEOutput:
        pre = self.hidden_pre(x)
        f = self.activation(pre)
        return SAEOutput(self.decode(f), f, hidden_pre=pre)

    def sparsity_penalty(self, out: SAEOutput) -> Tensor:
        """The architecture's sparsity loss term (0 for TopK-style SAEs)."""
        return out.x_hat.new_zeros(())

    # ------------------------------------------------------------------------------------- disk
    def save(self, folder: str | Path) -> Path:
        """Write `folder/cfg.json` + `folder/sae_weights.safetensors` (SAELens layout, atomic)."""
        from mmdiff.sae.formats.saelens import save_saelens

        return save_saelens(self, folder)

    @classmethod
    def load(cls, path: str | Path, **kwargs: Any) -> SAE:
        """Same as `mmdiff.sae.load_sae(path, d_in=, d_sae=, layer=, device=, dtype=)`."""
        from mmdiff.sae.formats import load_sae

        sae = load_sae(path, **kwargs)
        if cls is not SAE and not isinstance(sae, cls):
            raise SAEError(f"{path} holds a {sae.cfg.architecture} SAE, not a {cls.__name__}.")
        return sae

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"architecture={c.architecture}, d_in={c.d_in}, d_sae={c.d_sae}, k={c.k}, "
                f"layer={c.hook_layer}")


def build_sae(cfg: SAEConfig) -> SAE:
    """A freshly initialised SAE of the architecture `cfg` names."""
    from mmdiff.sae.registry import get_sae_class

    return get_sae_class(cfg.architecture)(cfg)
