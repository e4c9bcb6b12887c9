"""`mmdiff run --dry-run`: every file a study config names, checked without loading any weights.

`check_study(cfg)` returns one message per problem, each saying where in the config it is, what was
expected, what was found and what to do. It reads only small files: config.json / JSON sidecars,
the JSON header of safetensors files (8-byte length + header, checked against the file size so a
truncated download is caught), the .npy headers inside .npz archives, a few records of each
dataset through the dataset's own loader (their images must exist), and the analysis dataset as
the stats stage reads it, to see that every task split has records (read_records=False skips
the record reads). Hub ids are looked up in the local Hugging Face cache only; nothing is
downloaded, and no repository code runs.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmdiff.config import ORGANISM, DatasetSpec, StudyConfig
from mmdiff.errors import MMDiffError

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "tekken.json")
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
SAMPLE_RECORDS = 3
"""Records each dataset check draws through its loader (their images must exist)."""

_MAX_HEADER = 100 << 20  # a safetensors header beyond 100 MB is a corrupt length field
_ST_ITEM_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}


# ----------------------------------------------------------------------------- headers
@dataclass(frozen=True)
class TensorHeader:
    """A tensor as a file's header declares it: dtype name and shape (its data is never read)."""

    dtype: str
    shape: tuple[int, ...]


def read_safetensors_header(path: str | Path) -> dict[str, TensorHeader]:
    """{name: TensorHeader} from a safetensors file's header; MMDiffError if the file is corrupt or
    shorter than the header says (a truncated download)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise MMDiffError(
                f"{path} holds {size} bytes, too few for a safetensors file: it is "
                "truncated or empty; download or save it again"
            )
        n = int.from_bytes(head, "little")
        if n > min(size - 8, _MAX_HEADER):
            raise MMDiffError(
                f"{path}: the header length field says {n} bytes but the file holds "
                f"{size}: it is not a safetensors file, or it is truncated"
            )
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise MMDiffError(
                f"{path}: the safetensors header is not valid JSON ({exc}): the file "
                "is corrupt; download or save it again"
            ) from None
    if not isinstance(header, dict):
        raise MMDiffError(f"{path}: the safetensors header should be a JSON object")
    out: dict[str, TensorHeader] = {}
    data_end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, stop) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise MMDiffError(
                f"{path}: header entry {name!r} lacks dtype/shape/data_offsets: the file is corrupt"
            ) from None
        if dtype in _ST_ITEM_BYTES and stop - start != math.prod(shape) * _ST_ITEM_BYTES[dtype]:
            raise MMDiffError(
                f"{path}: tensor {name!r} ({dtype} {list(shape)}) spans {stop - start} "
                "bytes, which does not fit its shape: the file is corrupt"
            )
        out[name] = TensorHeader(dtype, shape)
        data_end = max(data_end, stop)
    if 8 + n + data_end > size:
        raise MMDiffError(
            f"{path}: the header declares {8 + n + data_end} bytes but the file holds "
            f"{size}: it is truncated (an interrupted download or copy?); fetch it again"
        )
    return out


def read_npz_header(path: str | Path) -> dict[str, TensorHeader]:
    """{array name: TensorHeader} from the .npy headers inside an .npz; no array data is read."""
    from numpy.lib import format as npy

    path = Path(path)
    out: dict[str, TensorHeader] = {}
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                name = info.filename.removesuffix(".npy")
                with z.open(info) as fh:
                    version = npy.read_magic(fh)
                    read = (
                        npy.read_array_header_1_0
                        if version == (1, 0)
                        else npy.read_array_header_2_0
                    )
                    shape, _, dtype = read(fh)
                    header_bytes = fh.tell()
                if dtype.hasobject:
                    raise MMDiffError(
                        f"{path}: array {name!r} holds Python objects (a pickle); "
                        "mmdiff reads numeric arrays only"
                    )
                if info.file_size < header_bytes + math.prod(shape) * dtype.itemsize:
                    raise MMDiffError(
                        f"{path}: array {name!r} ({dtype} {list(shape)}) is cut short: "
                        "the file is truncated; download it again"
                    )
                out[name] = TensorHeader(str(dtype), tuple(int(s) for s in shape))
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise MMDiffError(
            f"{path} is not a readable .npz archive ({type(exc).__name__}: {exc}): it "
            "is corrupt or truncated; download it again"
        ) from None
    if not out:
        raise MMDiffError(f"{path} holds no .npy arrays: is it the right file?")
    return out


# ----------------------------------------------------------------------------- hub cache
def _cached_file(repo_id: str, filename: str) -> Path | None:
    """The local copy of `filename` of hub repo `repo_id` in the Hugging Face cache, or None."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        hit = try_to_load_from_cache(repo_id, filename)
    except Exception:  # an id huggingface_hub rejects is simply not cached
        return None
    return Path(hit) if isinstance(hit, str) else None


def _hub_cache_dir() -> str:
    try:
        from huggingface_hub.constants import HF_HUB_CACHE

        return str(HF_HUB_CACHE)
    except ImportError:
        return "the Hugging Face cache"


def _not_cached(where: str, hub_id: str) -> str:
    return (
        f"{where}: {hub_id} is a hub id that is not cached in {_hub_cache_dir()}, and loading is "
        "offline (HF_HUB_OFFLINE=1 or model.local_files_only): not cached; set MMDIFF_MODELS to a "
        f"folder holding a local copy and name it in the config, or go online (`hf download {hub_id}`)"
    )


# ----------------------------------------------------------------------------- models
@dataclass
class ModelFacts:
    """What the dry run learnt about one model folder (None where it could not be read)."""

    folder: Path | None = None
    model_type: str | None = None
    hidden_size: int | None = None
    num_layers: int | None = None


def _read_hf_config(
    folder: Path, where: str, problems: list[str], remote_code: bool = False
) -> tuple[dict | None, Any]:
    """(raw config.json, transformers config) of a model folder; None where unreadable.

    A dry run never executes a repository's own code: with `remote_code` (the config trusts it),
    a config transformers cannot read by itself is left unchecked instead of reported."""
    path = folder / "config.json"
    if not path.is_file():
        problems.append(
            f"{where}: {folder} has no config.json: expected a Hugging Face model folder "
            "(written by save_pretrained or `hf download`); is the path right?"
        )
        return None, None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        problems.append(f"{where}: {path} is not valid JSON ({exc}): download it again")
        return None, None
    if not isinstance(raw, dict) or not isinstance(raw.get("model_type"), str):
        problems.append(f"{where}: {path} has no model_type: expected a transformers config.json")
        return None, None
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # unknown model_type, malformed fields: transformers says which
        if remote_code:
            return raw, None
        problems.append(
            f"{where}: transformers cannot read {path} (model_type "
            f"{raw['model_type']!r}): {type(exc).__name__}: {exc}"
        )
        return raw, None
    return raw, config


def _check_weights(folder: Path, where: str, problems: list[str]) -> None:
    """Weights present and whole: a safetensors file or an index whose shards exist and hold
    the tensors the index names (headers only)."""
    single = folder / "model.safetensors"
    if single.is_file():
        try:
            read_safetensors_header(single)
        except MMDiffError as exc:
            problems.append(f"{where}: {exc}")
        return
    for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
        index = folder / index_name
        if not index.is_file():
            continue
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            weight_map = None
        if not isinstance(weight_map, dict):
            problems.append(
                f"{where}: {index} is not a weights index (a JSON object with a "
                "'weight_map'): download it again"
            )
            return
        shards: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            shards.setdefault(str(shard), []).append(name)
        missing = sorted(s for s in shards if not (folder / s).is_file())
        if missing:
            problems.append(
                f"{where}: {index.name} names {len(shards)} shard file(s) but "
                f"{missing} are missing from {folder}: the download is incomplete; "
                "fetch the missing shards"
            )
            return
        if index_name == SAFETENSORS_INDEX:
            for shard, names in sorted(shards.items()):
                try:
                    held = read_safetensors_header(folder / shard)
                except MMDiffError as exc:
                    problems.append(f"{where}: {exc}")
                    continue
                absent = [n for n in names if n not in held]
                if absent:
                    problems.append(
                        f"{where}: shard {folder / shard} lacks {len(absent)} tensor(s) "
                        f"its index names (e.g. {absent[:3]}): the shard is from another "
                        "checkpoint or revision; download it again"
                    )
        return
    if (folder / "pytorch_model.bin").is_file():
        return  # transformers reads it with torch.load(weights_only=True)
    found = sorted(p.name for p in folder.iterdir())[:20]
    problems.append(
        f"{where}: no weights in {folder}: expected model.safetensors or "
        f"{SAFETENSORS_INDEX} with its shards; found {found}"
    )


def _check_preprocessing(
    folder: Path, where: str, needs_processor: bool, problems: list[str]
) -> None:
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        problems.append(
            f"{where}: no tokenizer in {folder}: expected one of {list(TOKENIZER_FILES)} "
            "(save the tokenizer or processor beside the model)"
        )
    if needs_processor and not any((folder / f).is_file() for f in PROCESSOR_FILES):
        problems.append(
            f"{where}: no image processor in {folder}: expected {' or '.join(PROCESSOR_FILES)} "
            "(processor.save_pretrained writes it)"
        )


def _text_dims(config: Any) -> tuple[int | None, int | None]:
    """(hidden size, decoder layers) of the language model inside a (VLM or LM) config."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    hidden = getattr(text, "hidden_size", None)
    layers = getattr(text, "num_hidden_layers", None)
    return (
        int(hidden) if hidden is not None else None,
        int(layers) if layers is not None else None,
    )


def _locate(
    location: str, where: str, offline: bool, problems: list[str]
) -> tuple[Path | None, bool]:
    """(folder to inspect, whether its files must be complete) for a local path or a hub id."""
    from mmdiff.models.loading import looks_like_path

    p = Path(location).expanduser()
    if p.is_dir():
        return p, True
    if p.exists():
        problems.append(
            f"{where}: {p} is a file; expected a model folder (config.json, weights, "
            "tokenizer/processor files)"
        )
        return None, False
    if looks_like_path(location) or location.count("/") != 1:
        problems.append(
            f"{where}: {location} does not exist: expected a model folder or a hub id "
            "(owner/name); check the path (and MMDIFF_MODELS)"
        )
        return None, False
    cached = _cached_file(location, "config.json")
    if cached is None:
        if offline:
            problems.append(_not_cached(where, location))
        return None, False  # online: transformers fetches it at run time
    # offline, the cached snapshot is all the run will have; online, the rest is fetched later
    return cached.parent, offline


def check_model(
    location: str,
    where: str,
    *,
    vlm: bool,
    family: str | None = None,
    offline: bool = False,
    remote_code: bool = False,
) -> tuple[list[str], ModelFacts]:
    """Problems with one model (the VLM or the base LM) and what was learnt about it."""
    problems: list[str] = []
    facts = ModelFacts()
    folder, complete = _locate(location, where, offline, problems)
    if folder is None:
        return problems, facts
    facts.folder = folder
    raw, config = _read_hf_config(folder, where, problems, remote_code)
    if raw is None:
        return problems, facts
    facts.model_type = raw["model_type"]
    if vlm:
        from mmdiff.models import ADAPTERS, adapter_for_model_type

        if family is not None:
            if family not in ADAPTERS:
                problems.append(
                    f"model.family: {family!r} is not an adapter family; expected one of "
                    f"{sorted(ADAPTERS)}, or leave it unset to follow config.model_type"
                )
        else:
            try:
                adapter_for_model_type(facts.model_type)
            except MMDiffError as exc:
                problems.append(f"{where}: {exc}")
    else:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        # config None: unreadable (reported above) or repo code the dry run does not execute
        if config is not None and facts.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            problems.append(
                f"{where}: {folder} is a {facts.model_type!r} model, not a causal language "
                "model: expected the LM the VLM's language backbone was initialised from "
                "(e.g. llama, gemma2, qwen2)"
            )
    if config is not None:
        facts.hidden_size, facts.num_layers = _text_dims(config)
    if complete:
        _check_weights(folder, where, problems)
        _check_preprocessing(folder, where, needs_processor=vlm, problems=problems)
    return problems, facts


def _resolve_organism(cfg: StudyConfig, problems: list[str]) -> tuple[str | None, str | None]:
    vlm, base = cfg.model.vlm, cfg.model.base_lm
    if ORGANISM not in (vlm, base):
        return vlm, base
    from mmdiff.organism import checkpoint_path

    try:
        root = checkpoint_path()
    except MMDiffError as exc:
        problems.append(f"model: {exc}")
        return (None if vlm == ORGANISM else vlm), (None if base == ORGANISM else base)
    return (
        str(root / "vlm") if vlm == ORGANISM else vlm,
        str(root / "base_lm") if base == ORGANISM else base,
    )


def check_models(cfg: StudyConfig) -> tuple[list[str], ModelFacts, ModelFacts]:
    """The VLM and base LM: files, types, matching dimensions, and the configured layers."""
    from mmdiff.models.loading import ModelError, hub_offline, parse_dtype

    problems: list[str] = []
    m = cfg.model
    offline = m.local_files_only if m.local_files_only is not None else hub_offline()
    try:
        parse_dtype(m.dtype)
    except ModelError as exc:
        problems.append(f"model.dtype: {exc}")
    vlm_loc, base_loc = _resolve_organism(cfg, problems)
    vlm = base = ModelFacts()
    if vlm_loc is not None:
        found, vlm = check_model(
            vlm_loc,
            "model.vlm",
            vlm=True,
            family=m.family,
            offline=offline,
            remote_code=m.trust_remote_code,
        )
        problems += found
    if base_loc is not None:
        found, base = check_model(
            base_loc, "model.base_lm", vlm=False, offline=offline, remote_code=m.trust_remote_code
        )
        problems += found
    if None not in (vlm.hidden_size, base.hidden_size) and vlm.hidden_size != base.hidden_size:
        problems.append(
            f"model.base_lm: its hidden size is {base.hidden_size}, the VLM's language model "
            f"has {vlm.hidden_size}: is base_lm the LM this VLM was initialised from?"
        )
    if None not in (vlm.num_layers, base.num_layers) and vlm.num_layers != base.num_layers:
        problems.append(
            f"model.base_lm: it has {base.num_layers} decoder layers, the VLM's language "
            f"model has {vlm.num_layers}: is base_lm the LM this VLM was initialised from?"
        )
    n_layers = vlm.num_layers or base.num_layers
    if n_layers is not None:
        beyond = [L for L in cfg.layers if L >= n_layers]
        if beyond:
            problems.append(
                f"layers: {beyond} do not exist: the language model has {n_layers} decoder "
                f"layers (0..{n_layers - 1}); pick hook points below {n_layers}"
            )
    return problems, vlm, base


# ----------------------------------------------------------------------------- SAEs
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
    from mmdiff.errors import SAEError

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
    from mmdiff.errors import SAEError

    if not path.is_file():
        raise SAEError(f"SAE weights file {path} does not exist")
    try:
        return read(path)
    except MMDiffError as exc:
        raise SAEError(str(exc)) from None


def probe_sae(path: str | Path) -> SAEFacts:
    """Format, d_in, d_sae and recorded layer of an SAE checkpoint, from its config and weight
    headers only (SAEError when the folder is not a recognised, whole checkpoint)."""
    from mmdiff.errors import SAEError
    from mmdiff.sae.formats import detect_format, gemma_scope, llama_scope, mmdiff_ckpt, saelens
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
            "sae_weights.safetensors, Llama Scope hyperparams.json + checkpoints/, Gemma "
            "Scope params.npz, or an MMDiff checkpoint); check the path (and MMDIFF_MODELS)"
        )
        return None
    repo_id, sub = f"{m.group(1)}/{m.group(2)}", (m.group(3) or "").strip("/")
    for marker in _SAE_MARKERS:
        hit = _cached_file(repo_id, f"{sub}/{marker}" if sub else marker)
        if hit is not None:
            return hit.parent
    if offline:
        problems.append(_not_cached(where, location))
    return None


def check_base_saes(
    template: str, layers: list[int], d_model: int | None, *, offline: bool = False
) -> list[str]:
    """Every layer's pretrained base-LM SAE: found, a recognised format, whole, fitting the model."""
    from mmdiff.errors import SAEError

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


# ----------------------------------------------------------------------------- datasets
def _loader(kind: str) -> Callable[..., Any] | None:
    if kind == "shapes":
        from mmdiff.data.shapes import shapes_records

        return shapes_records
    from mmdiff.data.loaders import LOADERS

    return LOADERS.get(kind.lower().replace("-", "_"))


def _is_path_param(p: inspect.Parameter) -> bool:
    return "Path" in str(p.annotation)


def check_dataset(
    name: str, spec: DatasetSpec, *, sample: int = SAMPLE_RECORDS, read_records: bool = True
) -> list[str]:
    """One configured dataset: a known loader, its arguments, its paths, and (read_records) a few
    records read through the loader itself, so the fields checked are exactly the ones a run
    needs. The loader parses its whole annotation file: about 16 s for VQAv2 val (157 MB)."""
    where = f"datasets.{name}"
    fn = _loader(spec.kind)
    if fn is None:
        from mmdiff.data.loaders import LOADERS

        return [
            (
                f"{where}.kind: unknown dataset kind {spec.kind!r}; expected one of "
                f"{sorted([*LOADERS, 'shapes'])}"
            )
        ]
    params = inspect.signature(fn).parameters
    required = [n for n, p in params.items() if p.default is inspect.Parameter.empty]
    problems: list[str] = []
    unknown = [k for k in spec.args if k not in params]
    if unknown:
        problems.append(
            f"{where}.args: unknown argument(s) {unknown} for kind {spec.kind!r} (misspelt?); "
            f"it takes {list(params)}"
        )
    missing = [n for n in required if n not in spec.args]
    if missing:
        problems.append(
            f"{where}.args: kind {spec.kind!r} needs {missing}, which are not given; add "
            f"them under args (it takes {list(params)})"
        )
    for arg, value in spec.args.items():
        if arg not in params or not _is_path_param(params[arg]) or value is None:
            continue
        for v in value if isinstance(value, list) else [value]:
            if not Path(str(v)).expanduser().exists():
                problems.append(
                    f"{where}.args.{arg}: {v} does not exist: the {spec.kind} loader's "
                    f"`{arg}` must name an existing file or folder; check the path (and "
                    "MMDIFF_DATA)"
                )
    if problems or not read_records:
        return problems
    kwargs = dict(spec.args)
    if spec.kind == "shapes" and "n_per_family" in params:
        kwargs["n_per_family"] = 1  # generated, no files: one record per family checks the args
    if "limit" in params:
        kwargs["limit"] = min(sample, kwargs.get("limit") or sample)
    if "seed" in params:
        kwargs.setdefault("seed", spec.seed)
    if "check_images" in params:
        kwargs["check_images"] = True
    try:
        records = fn(**kwargs)
    except MMDiffError as exc:
        return [f"{where}: {exc}"]
    except (OSError, TypeError, ValueError, KeyError) as exc:
        return [
            (
                f"{where}: the {spec.kind} loader failed on these arguments "
                f"({type(exc).__name__}: {exc}); check args against the loader's documentation"
            )
        ]
    if not records:
        return [
            f"{where}: the {spec.kind} loader found no records in {dict(spec.args)}: is the file empty?"
        ]
    return []


def check_analysis_splits(cfg: StudyConfig) -> list[str]:
    """The analysis dataset (stats.dataset) holds records of every task split the stats stage
    contrasts (stats.tasks and stats.base_split), found by reading it as the run will (images
    unchecked), so a study does not fail at the stats stage after hours of SAE training."""
    from mmdiff.study import load_records, task_splits

    name = cfg.stats.dataset
    spec = cfg.datasets[name]
    fn = _loader(spec.kind)
    args = dict(spec.args)
    if fn is not None and "check_images" in inspect.signature(fn).parameters:
        args["check_images"] = False  # images were sampled by check_dataset
    try:
        records = load_records(spec.model_copy(update={"args": args}))
    except MMDiffError as exc:
        return [f"datasets.{name}: {exc}"]
    try:
        task_splits(records, cfg.stats.base_split, cfg.stats.tasks)
    except MMDiffError as exc:
        carried = sorted({t for r in records for t in r.tasks})
        return [
            f"stats: {exc} (stats.dataset {name!r}: {len(records)} records carrying the tags "
            f"{carried})"
        ]
    return []


# ----------------------------------------------------------------------------- cross-references
def check_references(cfg: StudyConfig) -> list[str]:
    """Stage sections name configured datasets and a trained regime; dtypes are known."""
    problems: list[str] = []
    names = sorted(cfg.datasets)
    refs = [(f"capture.datasets[{i}]", n) for i, n in enumerate(cfg.capture.datasets)]
    refs += [
        ("train.dataset", cfg.train.dataset),
        ("train.heldout", cfg.train.heldout),
        ("stats.dataset", cfg.stats.dataset),
    ]
    for where, n in refs:
        if n not in cfg.datasets:
            problems.append(
                f"{where}: names dataset {n!r}, which is not defined under `datasets` "
                f"(defined: {names}); define it or fix the name"
            )
    if cfg.stats.role not in cfg.train.regimes:
        problems.append(
            f"stats.role: {cfg.stats.role!r} is not among train.regimes {cfg.train.regimes}, "
            "so no SAEs of that regime are trained; add it or pick a trained regime"
        )
    for t in cfg.stats.neutral_tasks:
        if t not in cfg.stats.tasks:
            problems.append(
                f"stats.neutral_tasks: {t!r} is not in stats.tasks {cfg.stats.tasks}; the "
                "lexical filter re-runs only tasks that are detected"
            )
    if cfg.capture.dtype.lower().removeprefix("torch.") not in ("float32", "float16", "bfloat16"):
        problems.append(
            f"capture.dtype: {cfg.capture.dtype!r} is not a storage dtype; expected float32, "
            "float16 or bfloat16"
        )
    return problems


# ----------------------------------------------------------------------------- the whole study
def check_study(
    cfg: StudyConfig,
    *,
    sample: int = SAMPLE_RECORDS,
    read_records: bool = True,
    progress: bool = False,
) -> list[str]:
    """Problems with everything a study config names, without loading weights: one message each,
    saying what was expected, what was found and what to do. Empty means the dry run passes.

    Order: cross-references, the model pair, the base SAEs (against the models' hidden size), each
    dataset (with read_records, a `sample` of records through its loader), then (read_records)
    the analysis dataset's task splits. read_records=False checks files by name and header only:
    seconds instead of about a minute per VQAv2-sized dataset, for a check before every run.
    """
    from mmdiff.models.loading import hub_offline

    m = cfg.model
    offline = m.local_files_only if m.local_files_only is not None else hub_offline()
    facts: dict[str, ModelFacts] = {}
    dataset_ok: dict[str, bool] = {}

    def models() -> list[str]:
        found, facts["vlm"], facts["base"] = check_models(cfg)
        return found

    def saes() -> list[str]:
        if cfg.train.base_saes is None:
            return []
        d_model = facts["base"].hidden_size or facts["vlm"].hidden_size
        return check_base_saes(cfg.train.base_saes, cfg.layers, d_model, offline=offline)

    def dataset(name: str, spec: DatasetSpec) -> list[str]:
        found = check_dataset(name, spec, sample=sample, read_records=read_records)
        dataset_ok[name] = not found
        return found

    def splits() -> list[str]:
        if not read_records or not dataset_ok.get(cfg.stats.dataset):
            return []
        return check_analysis_splits(cfg)

    steps: list[tuple[str, Callable[[], list[str]]]] = [
        ("references", lambda: check_references(cfg)),
        ("models", models),
        ("base SAEs", saes),
        *[(f"dataset {n}", functools.partial(dataset, n, s)) for n, s in cfg.datasets.items()],
        ("task splits", splits),
    ]
    problems: list[str] = []
    if not progress:
        for _, step in steps:
            problems += step()
        return problems
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task("checking the config", total=len(steps))
        for label, step in steps:
            bar.update(task, description=f"checking {label}")
            problems += step()
            bar.advance(task)
    return problems


__all__ = [
    "ModelFacts",
    "SAEFacts",
    "TensorHeader",
    "check_analysis_splits",
    "check_base_saes",
    "check_dataset",
    "check_model",
    "check_models",
    "check_references",
    "check_study",
    "probe_sae",
    "read_npz_header",
    "read_safetensors_header",
]
