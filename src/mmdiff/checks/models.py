"""The dry run's model checks: the VLM and the base LM folder (or cached hub snapshot), config,
weights (headers only), tokenizer / processor files, and matching dimensions. No repository code
runs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmdiff.checks.headers import read_safetensors_header
from mmdiff.checks.hub_cache import cached_file, not_cached
from mmdiff.config import ORGANISM, StudyConfig
from mmdiff.errors import MMDiffError

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "tekken.json")
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


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
    except Exception as exc:  # noqa: BLE001 - unknown model_type, malformed fields: transformers says which
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
    cached = cached_file(location, "config.json")
    if cached is None:
        if offline:
            problems.append(not_cached(where, location))
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


def check_device(device: str | None) -> list[str]:
    """model.device names a device this torch build can use (a CUDA device needs a CUDA build
    and a visible GPU), so a run does not fail after reading its datasets."""
    import torch

    if device is None:
        return []
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        return [f"model.device: {device!r} is not a torch device ({exc}); expected cpu, cuda, cuda:1 or mps"]
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU-only build"
            return [
                f"model.device: {device!r}, but this torch ({torch.__version__}, a {build}) sees no "
                "CUDA GPU; use device: cpu, or run where a GPU is visible with a CUDA build of torch"
            ]
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            return [
                f"model.device: {device!r}, but only {torch.cuda.device_count()} CUDA device(s) are "
                f"visible (cuda:0 to cuda:{torch.cuda.device_count() - 1}); pick one of them"
            ]
    if dev.type == "mps" and not torch.backends.mps.is_available():
        return [f"model.device: {device!r}, but MPS is not available here; use device: cpu"]
    return []


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
    problems += check_device(m.device)
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
