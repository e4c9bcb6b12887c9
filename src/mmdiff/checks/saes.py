"""The dry run's SAE checks: an SAE checkpoint's format, d_in, d_sae and layer from its config and
weight headers (`probe_sae`), and every layer's pretrained base-LM SAE against the model."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mmdiff.checks.headers import TensorHeader, read_npz_header, read_safetensors_header
from mmdiff.checks.hub_cache import cached_file, not_cached
from mmdiff.errors import MMDiffError, SAEError


@dataclass(frozen=True)
class SAEFacts:
    """An SAE checkpoint as its config and weight headers describe it."""

    format: str
    d_in: int
    d_sae: int
    layer: int | None


def _expect_shapes(
    tensors: dict[str, TensorHeader], wanted: dict[str, tuple[int, ...]], path: Path
) -> None:
    missing = [n for n in wanted if n not in tensors]
    if missing:
        raise SAEError(
            f"{path} lacks tensors {missing} (it holds {sorted(tensors)[:12]}): is this "
            "the right format, or an incomplete download?"
        )
    for name, shape in wanted.items():
        if tensors[name].shape != shape:
            raise SAEError(
                f"{path}: tensor {name!r} has shape {list(tensors[name].shape)}, its config "
                f"implies {list(shape)}: the weights and the config do not belong together"
            )


def _header(read: Callable[[Path], dict[str, TensorHeader]], path: Path) -> dict[str, TensorHeader]:
    if not path.is_file():
        raise SAEError(f"SAE weights file {path} does not exist")
    try:
        return read(path)
    except MMDiffError as exc:
        raise SAEError(str(exc)) from None


def probe_sae(path: str | Path) -> SAEFacts:
    """Format, d_in, d_sae and recorded layer of an SAE checkpoint, from its config and weight
    headers only (SAEError when the folder is not a recognised, whole checkpoint)."""
    from mmdiff.sae.formats import detect_format, gemma_scope, llama_scope, mmdiff_ckpt, saelens, sparsify
    from mmdiff.sae.formats.common import layer_from_name, read_json

    path = Path(path)
    fmt = detect_format(path)
    try:
        if fmt == "saelens":
            cfg_path = path / saelens.CFG_FILENAME
            raw = read_json(cfg_path)
            d_in, d_sae = int(raw["d_in"]), int(raw["d_sae"])
            meta = raw.get("metadata") or {}
            layer = (meta.get("mmdiff") or {}).get("hook_layer", raw.get("hook_layer"))
            if layer is None:
                layer = layer_from_name(meta.get("hook_name", raw.get("hook_name")))
            tensors = _header(read_safetensors_header, path / saelens.WEIGHTS_FILENAME)
            _expect_shapes(
                tensors,
                {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in)},
                path / saelens.WEIGHTS_FILENAME,
            )
        elif fmt == "sparsify":
            _, d_in, d_sae, layer = sparsify.sparsify_facts(path)
            w_path = path / sparsify.WEIGHTS_FILENAME
            tensors = _header(read_safetensors_header, w_path)
            _expect_shapes(tensors, {"encoder.weight": (d_sae, d_in), "W_dec": (d_sae, d_in)}, w_path)
        elif fmt == "llama_scope":
            hp_path = path / llama_scope.HYPERPARAMS
            hp = read_json(hp_path)
            d_in = int(hp["d_model"])
            d_sae = int(hp["d_sae"]) if "d_sae" in hp else d_in * int(hp["expansion_factor"])
            hook_in, hook_out = (
                hp.get("hook_point_in"),
                hp.get("hook_point_out", hp.get("hook_point_in")),
            )
            if hook_in is not None and hook_out is not None and hook_in != hook_out:
                raise SAEError(
                    f"{hp_path}: hook_point_in={hook_in!r} != hook_point_out={hook_out!r} is a "
                    "transcoder; mmdiff reads autoencoders of one hook point (the R folders)"
                )
            layer = layer_from_name(hook_in) if hook_in else layer_from_name(path.name)
            w_path = path / llama_scope.WEIGHTS
            tensors = _header(read_safetensors_header, w_path)
            _expect_shapes(
                tensors, {"encoder.weight": (d_sae, d_in), "decoder.weight": (d_in, d_sae)}, w_path
            )
        elif fmt == "gemma_scope":
            npz = gemma_scope.find_npz(path)
            tensors = _header(read_npz_header, npz)
            if "W_enc" not in tensors or len(tensors["W_enc"].shape) != 2:
                raise SAEError(
                    f"{npz}: expected a 2-D W_enc [d_in, d_sae]; it holds {sorted(tensors)}"
                )
            d_in, d_sae = tensors["W_enc"].shape
            _expect_shapes(
                tensors,
                {
                    "W_dec": (d_sae, d_in),
                    "b_enc": (d_sae,),
                    "b_dec": (d_in,),
                    "threshold": (d_sae,),
                },
                npz,
            )
            layer = layer_from_name(str(npz.parent))
        else:
            st = mmdiff_ckpt.find_checkpoint(path)
            meta = read_json(st.with_suffix(".json"))
            if meta.get("format") != mmdiff_ckpt.FORMAT or not isinstance(meta.get("config"), dict):
                raise SAEError(
                    f"{st.with_suffix('.json')} is not an MMDiff SAE sidecar (expected "
                    f"format={mmdiff_ckpt.FORMAT!r} and a 'config' object)"
                )
            c = meta["config"]
            d_in, d_sae, layer = int(c["d_in"]), int(c["d_sae"]), c.get("hook_layer")
            tensors = _header(read_safetensors_header, st)
            _expect_shapes(tensors, {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in)}, st)
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, MMDiffError):
            raise
        raise SAEError(
            f"the {fmt} checkpoint at {path} has a malformed config ({type(exc).__name__}: {exc})"
        ) from None
    return SAEFacts(fmt, int(d_in), int(d_sae), int(layer) if layer is not None else None)


_SAE_MARKERS = ("cfg.json", "hyperparams.json", "params.npz")


def _locate_sae(location: str, where: str, offline: bool, problems: list[str]) -> Path | None:
    from mmdiff.sae.formats.hub import _HUB_ID

    p = Path(location).expanduser()
    if p.exists():
        return p
    m = _HUB_ID.match(location)
    if m is None or location.startswith(("/", ".", "~")):
        problems.append(
            f"{where}: {p} does not exist: expected an SAE folder (SAELens cfg.json + "
            "sae_weights.safetensors, sparsify cfg.json + sae.safetensors, Llama Scope hyperparams.json + checkpoints/, Gemma "
            "Scope params.npz, or an MMDiff checkpoint); check the path (and MMDIFF_MODELS)"
        )
        return None
    repo_id, sub = f"{m.group(1)}/{m.group(2)}", (m.group(3) or "").strip("/")
    for marker in _SAE_MARKERS:
        hit = cached_file(repo_id, f"{sub}/{marker}" if sub else marker)
        if hit is not None:
            return hit.parent
    if offline:
        problems.append(not_cached(where, location))
    return None


def check_base_saes(
    template: str, layers: list[int], d_model: int | None, *, offline: bool = False
) -> list[str]:
    """Every layer's pretrained base-LM SAE: found, a recognised format, whole, fitting the model."""
    if "{layer}" not in template:
        return [
            (
                f"train.base_saes: {template!r} has no {{layer}} placeholder: expected a folder template "
                "such as '/sae/Llama3_1-8B-Base-L{layer}R-8x', one SAE per configured layer"
            )
        ]
    problems: list[str] = []
    for L in layers:
        where = f"train.base_saes (layer {L})"
        folder = _locate_sae(template.replace("{layer}", str(L)), where, offline, problems)
        if folder is None:
            continue
        try:
            sae = probe_sae(folder)
        except SAEError as exc:
            problems.append(f"{where}: {exc}")
            continue
        if d_model is not None and sae.d_in != d_model:
            problems.append(
                f"{where}: the SAE at {folder} expects d_in={sae.d_in}, the model's hidden size "
                f"is {d_model}: is this SAE for another model?"
            )
        if sae.layer is not None and sae.layer != L:
            problems.append(
                f"{where}: the SAE at {folder} was trained at layer {sae.layer}, but serves "
                f"layer {L}: the template points at the wrong layer's checkpoint"
            )
    return problems
