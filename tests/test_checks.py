"""The dry run: the example configs pass on a fake tree in the real formats, broken ones fail pointedly.

The fake tree holds model folders with the real 8B / 3B config.json files, safetensors shards whose
headers declare real tensor names and shapes (sparse files of the declared size, so they cost no
disk), Llama Scope / Gemma Scope SAE folders of the real widths (again sparse), and tiny datasets in
the real on-disk formats (tests/data_formats.py) placed where the example configs expect them.
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import shutil
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from data_formats import (
    write_figstep,
    write_mm_safetybench,
    write_ocrbench,
    write_textvqa,
    write_vqav2,
    write_vsr,
)

from mmdiff.checks import (
    SAEFacts,
    check_base_saes,
    check_dataset,
    check_study,
    probe_sae,
    read_npz_header,
    read_safetensors_header,
)
from mmdiff.config import DatasetSpec, StudyConfig, default_config, load_config
from mmdiff.errors import ConfigError, MMDiffError
from mmdiff.models.published import GEMMA2_2B, LLAMA31_8B, LLAVA_MORE_8B, PALIGEMMA2_3B

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

# ----------------------------------------------------------------------------- file writers
_ST_BYTES = {"BF16": 2, "F16": 2, "F32": 4}


def write_safetensors(path: Path, tensors: dict[str, tuple[str, tuple[int, ...]]]) -> Path:
    """A safetensors file whose header declares `tensors` {name: (dtype, shape)}; the data region
    is a hole of the declared size (a sparse file: real size, no disk)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        n = math.prod(shape) * _ST_BYTES[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little") + raw)
        fh.truncate(8 + len(raw) + offset)
    return path


@functools.cache
def _zeros_crc(prefix: bytes, n_zeros: int) -> int:
    crc, chunk = zlib.crc32(prefix), bytes(1 << 24)
    while n_zeros > 0:
        crc = zlib.crc32(chunk[: min(n_zeros, len(chunk))], crc)
        n_zeros -= len(chunk)
    return crc


def write_npz(path: Path, arrays: dict[str, tuple[str, tuple[int, ...]]]) -> Path:
    """An uncompressed .npz (a stored zip of .npy members, as np.savez writes) of zero arrays; the
    array data are holes, so a real-width Gemma Scope params.npz costs no disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    central = b""
    with open(path, "wb") as fh:
        for name, (dtype, shape) in arrays.items():
            buf = io.BytesIO()
            dt = np.dtype(dtype)
            np.lib.format.write_array_header_1_0(
                buf,
                {"descr": np.lib.format.dtype_to_descr(dt), "fortran_order": False, "shape": shape},
            )
            head, n_data = buf.getvalue(), math.prod(shape) * dt.itemsize
            size, crc, fname = len(head) + n_data, _zeros_crc(head, n_data), f"{name}.npy".encode()
            offset = fh.tell()
            fields = (20, 0, 0, 0, 33, crc, size, size, len(fname))
            fh.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, *fields, 0) + fname + head)
            fh.seek(n_data, os.SEEK_CUR)
            central += (
                struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, *fields, 0, 0, 0, 0, 0, offset)
                + fname
            )
        start = fh.tell()
        fh.write(
            central
            + struct.pack(
                "<IHHHHIIH", 0x06054B50, 0, 0, len(arrays), len(arrays), len(central), start, 0
            )
        )
    return path


def _json(path: Path, obj: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


# ----------------------------------------------------------------------------- real model configs
def write_model(
    folder: Path,
    config: dict,
    shards: list[dict[str, tuple[str, tuple[int, ...]]]],
    files: tuple[str, ...],
) -> Path:
    """A hub-layout model folder: config.json, sharded safetensors + index, tokenizer/processor files."""
    _json(folder / "config.json", config)
    weight_map = {}
    for i, tensors in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(folder / name, tensors)
        weight_map |= {t: name for t in tensors}
    _json(folder / "model.safetensors.index.json", {"metadata": {}, "weight_map": weight_map})
    for f in files:
        _json(folder / f, {"note": "present; the dry run does not parse it"})
    return folder


def write_llava_more(models: Path) -> None:
    D, V, F = 4096, 128320, 14336
    write_model(
        models / "LLaVA_MORE-llama_3_1-8B-finetuning",
        LLAVA_MORE_8B,
        [
            {
                "language_model.model.embed_tokens.weight": ("BF16", (V, D)),
                "vision_tower.vision_model.embeddings.patch_embedding.weight": (
                    "BF16",
                    (1024, 3, 14, 14),
                ),
                "multi_modal_projector.linear_1.weight": ("BF16", (D, 1024)),
            },
            {
                "language_model.model.layers.31.mlp.down_proj.weight": ("BF16", (D, F)),
                "language_model.lm_head.weight": ("BF16", (V, D)),
            },
        ],
        ("preprocessor_config.json", "tokenizer.json", "tokenizer_config.json"),
    )
    write_model(
        models / "Llama-3.1-8B",
        LLAMA31_8B,
        [
            {"model.embed_tokens.weight": ("BF16", (128256, D))},
            {
                "model.layers.31.mlp.down_proj.weight": ("BF16", (D, F)),
                "lm_head.weight": ("BF16", (128256, D)),
            },
        ],
        ("tokenizer.json", "tokenizer_config.json"),
    )


def write_llama_scope(folder: Path, layer: int, d_model: int = 4096, d_sae: int = 32768) -> Path:
    """A Llama Scope release folder: hyperparams.json as released, checkpoints/final.safetensors."""
    hook = f"blocks.{layer}.hook_resid_post"
    _json(
        folder / "hyperparams.json",
        {
            "d_model": d_model,
            "d_sae": d_sae,
            "expansion_factor": d_sae // d_model,
            "hook_point_in": hook,
            "hook_point_out": hook,
            "act_fn": "jumprelu",
            "jump_relu_threshold": 0.52734375,
            "norm_activation": "dataset-wise",
            "dataset_average_activation_norm": {"in": 17.125, "out": 17.125},
            "top_k": 50,
            "use_decoder_bias": True,
            "apply_decoder_bias_to_pre_encoder": False,
            "sparsity_include_decoder_norm": True,
        },
    )
    write_safetensors(
        folder / "checkpoints" / "final.safetensors",
        {
            "encoder.weight": ("F32", (d_sae, d_model)),
            "encoder.bias": ("F32", (d_sae,)),
            "decoder.weight": ("F32", (d_model, d_sae)),
            "decoder.bias": ("F32", (d_model,)),
        },
    )
    return folder


def write_paligemma2(models: Path) -> None:
    D, F = 2304, 9216
    write_model(
        models / "paligemma2-3b-mix-224",
        PALIGEMMA2_3B,
        [
            {
                "language_model.model.embed_tokens.weight": ("BF16", (257216, D)),
                "vision_tower.vision_model.embeddings.patch_embedding.weight": (
                    "BF16",
                    (1152, 3, 14, 14),
                ),
            },
            {
                "language_model.model.layers.25.mlp.down_proj.weight": ("BF16", (D, F)),
                "multi_modal_projector.linear.weight": ("BF16", (D, 1152)),
            },
        ],
        ("preprocessor_config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json"),
    )
    write_model(
        models / "gemma-2-2b",
        GEMMA2_2B,
        [
            {"model.embed_tokens.weight": ("F32", (256000, D))},
            {"model.layers.25.mlp.down_proj.weight": ("F32", (D, F))},
        ],
        ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"),
    )


def write_gemma_scope(
    root: Path, layer: int, l0: int, d_in: int = 2304, d_sae: int = 16384
) -> Path:
    """layer_<L>/width_16k/average_l0_<N>/params.npz, linked as canonical (the config's advice)."""
    width = root / f"layer_{layer}" / "width_16k"
    write_npz(
        width / f"average_l0_{l0}" / "params.npz",
        {
            "W_enc": ("<f4", (d_in, d_sae)),
            "W_dec": ("<f4", (d_sae, d_in)),
            "b_enc": ("<f4", (d_sae,)),
            "b_dec": ("<f4", (d_in,)),
            "threshold": ("<f4", (d_sae,)),
        },
    )
    (width / "canonical").symlink_to(f"average_l0_{l0}")
    return width / "canonical"


WRITERS = {
    "vqav2": write_vqav2,
    "vsr": write_vsr,
    "textvqa": write_textvqa,
    "ocrbench": write_ocrbench,
    "mm_safetybench": write_mm_safetybench,
    "figstep": write_figstep,
}


def place_datasets(cfg: StudyConfig, scratch: Path) -> None:
    """Write each dataset in its real format and put every file where the config names it."""
    for name, spec in cfg.datasets.items():
        writer = WRITERS[spec.kind]
        kw = (
            {"subtype": "train2014" if "train2014" in str(spec.args["questions"]) else "val2014"}
            if spec.kind == "vqav2"
            else {}
        )
        made = writer(scratch / name, **kw)
        for arg, src in made.items():
            dests = spec.args[arg] if isinstance(spec.args[arg], list) else [spec.args[arg]]
            for dest in map(Path, dests):
                if Path(src).is_dir():
                    shutil.copytree(src, dest, dirs_exist_ok=True)
                else:
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(src, dest)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """MMDIFF_MODELS and MMDIFF_DATA trees for both example configs."""
    root = tmp_path_factory.mktemp("tree")
    models, data = root / "models", root / "data"
    write_llava_more(models)
    for L in (8, 12, 16, 20, 24, 26):
        write_llama_scope(models / "Llama3_1-8B-Base-LXR-8x" / f"Llama3_1-8B-Base-L{L}R-8x", L)
    write_paligemma2(models)
    for L, l0 in {6: 70, 9: 73, 12: 82, 15: 78, 18: 74, 21: 70, 24: 73}.items():
        write_gemma_scope(models / "gemma-scope-2b-pt-res", L, l0)
    env = {"MMDIFF_MODELS": str(models), "MMDIFF_DATA": str(data)}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        place_datasets(load_config(CONFIGS / "llava_more_llamascope.yaml"), root / "scratch")
    return {"models": models, "data": data, "root": root}


@pytest.fixture
def env(tree: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    monkeypatch.setenv("MMDIFF_MODELS", str(tree["models"]))
    monkeypatch.setenv("MMDIFF_DATA", str(tree["data"]))
    # the example configs run on a GPU (device: cuda): check them as on the host they are for
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    return tree


def link_copy(src: Path, dst: Path) -> Path:
    """A copy of a folder whose files are links to the originals (sparse files are not re-read)."""
    for f in src.rglob("*"):
        if f.is_file():
            (dst / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
            (dst / f.relative_to(src)).symlink_to(f)
    return dst


def _edit(cfg: StudyConfig, **changes: Any) -> StudyConfig:
    """A validated copy of cfg with dotted-path changes, e.g. {"model.base_lm": "..."}."""
    raw = cfg.model_dump(mode="json")
    for dotted, value in changes.items():
        *path, last = dotted.split("__")
        node = raw
        for key in path:
            node = node[key]
        node[last] = value
    return StudyConfig.model_validate(raw)


# ----------------------------------------------------------------------------- the example configs
@pytest.mark.parametrize("name", ["llava_more_llamascope", "paligemma2_gemmascope"])
def test_example_config_passes_the_dry_run_on_the_real_layout(env: dict, name: str) -> None:
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert cfg.model.dtype == "bfloat16" and cfg.model.device == "cuda"
    assert check_study(cfg, progress=name.startswith("pali")) == []


def test_example_configs_need_their_roots(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MMDIFF_MODELS", raising=False)
    monkeypatch.setenv("MMDIFF_DATA", "/d")
    with pytest.raises(ConfigError, match="not set: MMDIFF_MODELS"):
        load_config(CONFIGS / "llava_more_llamascope.yaml")


def test_example_configs_describe_the_real_models(env: dict) -> None:
    llava = load_config(CONFIGS / "llava_more_llamascope.yaml")
    gemma = load_config(CONFIGS / "paligemma2_gemmascope.yaml")
    assert max(llava.layers) < 32 and max(gemma.layers) < 26
    assert "L{layer}R-8x" in llava.train.base_saes and "layer_{layer}" in gemma.train.base_saes
    tags = {t for c in (llava, gemma) for s in c.datasets.values() for t in (s.tasks or [])}
    assert tags == {"spatial", "ocr", "safety"}
    kinds = {s.kind for s in llava.datasets.values()}
    assert kinds == {"vqav2", "vsr", "textvqa", "ocrbench", "mm_safetybench", "figstep"}


def test_organism_config_is_the_default_study_written_out() -> None:
    cfg = load_config(CONFIGS / "organism.yaml")
    assert cfg == default_config()
    problems = check_study(cfg)
    # Everything but the shipped checkpoint is checked here; that one exists or is named missing.
    assert all(
        p.startswith("model: the shipped organism checkpoint is missing") for p in problems
    ), problems


# ----------------------------------------------------------------------------- broken configs
def test_misspelt_key_is_named(env: dict, tmp_path: Path) -> None:
    raw = yaml.safe_load((CONFIGS / "llava_more_llamascope.yaml").read_text())
    raw["train"]["base_sae"] = raw["train"].pop("base_saes")
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"train\.base_sae: unknown key"):
        load_config(p)


def test_misspelt_dataset_argument_and_unknown_kind(env: dict) -> None:
    cfg = load_config(CONFIGS / "llava_more_llamascope.yaml")
    args = dict(cfg.datasets["ocrbench"].args)
    args["imgs"] = args.pop("images")
    assert check_dataset("ocrbench", DatasetSpec(kind="ocrbench", args=args)) == [
        (
            "datasets.ocrbench.args: unknown argument(s) ['imgs'] for kind 'ocrbench' (misspelt?); it takes "
            "['path', 'images', 'limit', 'seed', 'check_images']"
        ),
        (
            "datasets.ocrbench.args: kind 'ocrbench' needs ['images'], which are not given; add them under "
            "args (it takes ['path', 'images', 'limit', 'seed', 'check_images'])"
        ),
    ]
    (msg,) = check_dataset("ocr", DatasetSpec(kind="ocr_bench2", args=args))
    assert msg.startswith("datasets.ocr.kind: unknown dataset kind 'ocr_bench2'; expected one of [")
    assert "'ocrbench'" in msg and "'shapes'" in msg


def test_missing_files_are_named(env: dict) -> None:
    cfg = load_config(CONFIGS / "llava_more_llamascope.yaml")
    data = env["data"]
    bad = _edit(
        cfg,
        datasets__textvqa__args__path=str(data / "textvqa" / "TextVQA_0.5.1_vall.json"),
        model__base_lm=str(env["models"] / "Llama-3.1-8B-Instruct"),
    )
    problems = check_study(bad)
    assert problems == [
        (
            f"model.base_lm: {env['models'] / 'Llama-3.1-8B-Instruct'} does not exist: expected a model folder "
            "or a hub id (owner/name); check the path (and MMDIFF_MODELS)"
        ),
        (
            f"datasets.textvqa.args.path: {data / 'textvqa' / 'TextVQA_0.5.1_vall.json'} does not exist: the "
            "textvqa loader's `path` must name an existing file or folder; check the path (and MMDIFF_DATA)"
        ),
    ]


def test_missing_image_and_missing_field_come_from_the_loader(tmp_path: Path) -> None:
    args = write_ocrbench(tmp_path / "a")
    for p in (tmp_path / "a" / "OCRBench_Images").rglob("*.png"):
        p.unlink()
    spec = DatasetSpec(kind="ocrbench", args={k: str(v) for k, v in args.items()})
    (msg,) = check_dataset("ocrbench", spec)
    assert msg.startswith("datasets.ocrbench: OCRBench record id=") and "image not found" in msg
    assert check_dataset("ocrbench", spec, read_records=False) == []  # names and paths only
    args = write_vsr(tmp_path / "b")
    lines = Path(args["path"]).read_text().splitlines()
    row = json.loads(lines[1])
    del row["relation"]
    Path(args["path"]).write_text("\n".join([lines[0], json.dumps(row), *lines[2:]]) + "\n")
    (msg,) = check_dataset(
        "vsr", DatasetSpec(kind="vsr", args={k: str(v) for k, v in args.items()})
    )
    assert msg.startswith("datasets.vsr: ") and "record line 2 has no field 'relation'" in msg


def test_sae_of_another_model_and_of_another_layer(tmp_path: Path) -> None:
    # d_in 2048 under a 4096-wide model; the layer-12 checkpoint in layer 8's folder
    write_llama_scope(tmp_path / "L8", layer=8, d_model=2048, d_sae=16384)
    write_llama_scope(tmp_path / "L12", layer=12)
    assert check_base_saes(str(tmp_path / "L{layer}"), [8, 12], 4096) == [
        (
            f"train.base_saes (layer 8): the SAE at {tmp_path / 'L8'} expects d_in=2048, the model's hidden "
            "size is 4096: is this SAE for another model?"
        ),
    ]
    shutil.rmtree(tmp_path / "L8")
    link_copy(tmp_path / "L12", tmp_path / "L8")
    assert check_base_saes(str(tmp_path / "L{layer}"), [8], 4096) == [
        (
            f"train.base_saes (layer 8): the SAE at {tmp_path / 'L8'} was trained at layer 12, but serves "
            "layer 8: the template points at the wrong layer's checkpoint"
        ),
    ]
    (msg,) = check_base_saes(str(tmp_path / "L12"), [12], 4096)
    assert "has no {layer} placeholder" in msg


def test_truncated_and_unrecognised_sae_folders(tmp_path: Path) -> None:
    folder = write_llama_scope(tmp_path / "L3", layer=3, d_model=64, d_sae=256)
    w = folder / "checkpoints" / "final.safetensors"
    os.truncate(w, w.stat().st_size - 1)
    (msg,) = check_base_saes(str(tmp_path / "L{layer}"), [3], 64)
    assert msg.startswith(f"train.base_saes (layer 3): {w}: the header declares ")
    assert "it is truncated" in msg
    npz = write_gemma_scope(tmp_path / "gs", 5, 60, d_in=64, d_sae=256) / "params.npz"
    assert probe_sae(npz.parent).d_in == 64
    os.truncate(npz, npz.stat().st_size // 2)  # loses the zip's central directory
    (msg,) = check_base_saes(
        str(tmp_path / "gs" / "layer_{layer}" / "width_16k" / "canonical"), [5], 64
    )
    assert "is not a readable .npz archive" in msg and "download it again" in msg
    (tmp_path / "empty_7").mkdir()
    (msg,) = check_base_saes(str(tmp_path / "empty_{layer}"), [7], 64)
    assert "no SAE checkpoint recognised" in msg and "hyperparams.json" in msg


def test_model_mismatches_and_layers(env: dict, tmp_path: Path) -> None:
    cfg = load_config(CONFIGS / "llava_more_llamascope.yaml")
    models = env["models"]
    # the base LM of another VLM (Gemma 2 2B) and a layer the 32-layer model lacks
    bad = _edit(
        cfg,
        model__base_lm=str(models / "gemma-2-2b"),
        layers=[8, 40],
        train__base_saes=None,
        datasets={
            "vqav2_train": cfg.datasets["vqav2_train"].model_dump(),
            "vqav2_val": cfg.datasets["vqav2_val"].model_dump(),
        },
    )
    assert check_study(bad) == [
        (
            "model.base_lm: its hidden size is 2304, the VLM's language model has 4096: is base_lm the LM "
            "this VLM was initialised from?"
        ),
        (
            "model.base_lm: it has 26 decoder layers, the VLM's language model has 32: is base_lm the LM this "
            "VLM was initialised from?"
        ),
        (
            "layers: [40] do not exist: the language model has 32 decoder layers (0..31); pick hook points "
            "below 32"
        ),
    ]
    # a VLM as base LM, and an incomplete download (one shard missing)
    vlm = tmp_path / "vlm"
    link_copy(models / "LLaVA_MORE-llama_3_1-8B-finetuning", vlm)
    (vlm / "model-00002-of-00002.safetensors").unlink()
    (vlm / "preprocessor_config.json").unlink()
    bad = _edit(
        bad, model__vlm=str(vlm), model__base_lm=str(models / "paligemma2-3b-mix-224"), layers=[8]
    )
    problems = check_study(bad)
    assert problems[:2] == [
        (
            f"model.vlm: model.safetensors.index.json names 2 shard file(s) but "
            f"['model-00002-of-00002.safetensors'] are missing from {vlm}: the download is incomplete; fetch "
            "the missing shards"
        ),
        (
            f"model.vlm: no image processor in {vlm}: expected preprocessor_config.json or "
            "processor_config.json (processor.save_pretrained writes it)"
        ),
    ]
    assert (
        problems[2].startswith("model.base_lm: ")
        and "is a 'paligemma' model, not a causal language" in problems[2]
    )


def test_cross_references_name_defined_datasets(env: dict) -> None:
    cfg = load_config(CONFIGS / "paligemma2_gemmascope.yaml")
    bad = _edit(
        cfg,
        capture__datasets=["vqav2_val", "vqa_val"],
        stats__dataset="val",
        stats__role="image",
        train__regimes=["full", "text"],
        train__base_saes=None,
        datasets={},
    )
    problems = check_study(bad)
    assert problems[:5] == [
        (
            "capture.datasets[0]: names dataset 'vqav2_val', which is not defined under `datasets` (defined: []); "
            "define it or fix the name"
        ),
        (
            "capture.datasets[1]: names dataset 'vqa_val', which is not defined under `datasets` (defined: []); "
            "define it or fix the name"
        ),
        (
            "train.dataset: names dataset 'vqav2_train', which is not defined under `datasets` (defined: []); "
            "define it or fix the name"
        ),
        (
            "train.heldout: names dataset 'vqav2_val', which is not defined under `datasets` (defined: []); "
            "define it or fix the name"
        ),
        (
            "stats.dataset: names dataset 'val', which is not defined under `datasets` (defined: []); define it "
            "or fix the name"
        ),
    ]
    assert problems[5] == (
        "stats.role: 'image' is not among train.regimes ['full', 'text'], so no SAEs "
        "of that regime are trained; add it or pick a trained regime"
    )
    assert len(problems) == 6


def test_hub_ids_are_looked_up_in_the_cache_only(
    env: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants as hc

    cache = tmp_path / "hub"
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = load_config(CONFIGS / "paligemma2_gemmascope.yaml")
    bad = _edit(
        cfg,
        model__base_lm="google/gemma-2-2b",
        train__base_saes=None,
        datasets={},
        capture__datasets=[],
        train__dataset="x",
        train__heldout="x",
        stats__dataset="x",
        layers=[6],
    )
    not_cached = [p for p in check_study(bad) if p.startswith("model.base_lm")]
    assert not_cached == [
        (
            f"model.base_lm: google/gemma-2-2b is a hub id that is not cached in {cache}, and loading is "
            "offline (HF_HUB_OFFLINE=1 or model.local_files_only): not cached; set MMDIFF_MODELS to a folder "
            "holding a local copy and name it in the config, or go online (`hf download google/gemma-2-2b`)"
        )
    ]
    # the same id in the cache's layout: the snapshot is checked like a local folder
    repo = cache / "models--google--gemma-2-2b"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    link_copy(env["models"] / "gemma-2-2b", repo / "snapshots" / "abc123")
    assert [p for p in check_study(bad) if p.startswith("model.base_lm")] == []
    (repo / "snapshots" / "abc123" / "tokenizer.json").unlink()
    (repo / "snapshots" / "abc123" / "tokenizer.model").unlink()
    (msg,) = [p for p in check_study(bad) if p.startswith("model.base_lm")]
    assert msg.startswith("model.base_lm: no tokenizer in ")


# ----------------------------------------------------------------------------- headers, exactly
def test_safetensors_header_is_read_without_the_data(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    p = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(3, 5, dtype=torch.bfloat16), "b": torch.ones(7)}, str(p))
    h = read_safetensors_header(p)
    assert {k: (v.dtype, v.shape) for k, v in h.items()} == {
        "a": ("BF16", (3, 5)),
        "b": ("F32", (7,)),
    }
    size = p.stat().st_size
    os.truncate(p, size - 4)
    with pytest.raises(
        MMDiffError, match=rf"declares {size} bytes but the file holds {size - 4}: it is truncated"
    ):
        read_safetensors_header(p)
    p.write_bytes(b"\x05\x00")
    with pytest.raises(MMDiffError, match="holds 2 bytes, too few"):
        read_safetensors_header(p)
    p.write_bytes((10**9).to_bytes(8, "little") + b"{}")
    with pytest.raises(MMDiffError, match="header length field says 1000000000 bytes"):
        read_safetensors_header(p)


def test_npz_header_matches_numpy_and_our_sparse_writer(tmp_path: Path) -> None:
    a = tmp_path / "np.npz"
    np.savez(a, W_enc=np.zeros((4, 6), np.float32), b=np.arange(3, dtype=np.float64))
    assert {k: (v.dtype, v.shape) for k, v in read_npz_header(a).items()} == {
        "W_enc": ("float32", (4, 6)),
        "b": ("float64", (3,)),
    }
    b = write_npz(tmp_path / "ours.npz", {"W_enc": ("<f4", (4, 6)), "b": ("<f8", (3,))})
    with np.load(b) as z:  # numpy reads our writer's archive (CRCs checked) as the same zeros
        assert z["W_enc"].shape == (4, 6) and not z["W_enc"].any() and z["b"].dtype == np.float64
    np.savez(a, obj=np.array([{"x": 1}], dtype=object))
    with pytest.raises(MMDiffError, match="holds Python objects"):
        read_npz_header(a)


def test_analysis_dataset_must_carry_every_task_split(env: dict) -> None:
    cfg = load_config(CONFIGS / "llava_more_llamascope.yaml")
    bad = _edit(cfg, stats__tasks=["spatial", "ocr", "safety"], train__base_saes=None)
    problems = check_study(bad)
    assert problems == [
        "stats: no records carry the task tags ['safety'] in the analysis dataset; check "
        "stats.tasks / stats.base_split against the dataset's tags (stats.dataset 'vqav2_val': "
        "5 records carrying the tags ['ocr', 'spatial', 'vqa', 'yesno'])"
    ]
    assert check_study(bad, read_records=False) == []  # the quick check reads no records


def test_sae_folders_written_by_the_sae_engine_are_probed_exactly(tmp_path: Path) -> None:
    from mmdiff.sae import SAEConfig, build_sae
    from mmdiff.sae.formats.gemma_scope import save_gemma_scope
    from mmdiff.sae.formats.mmdiff_ckpt import save_mmdiff_checkpoint
    from mmdiff.sae.formats.saelens import save_saelens

    topk = build_sae(
        SAEConfig(
            architecture="topk",
            d_in=16,
            d_sae=48,
            k=4,
            hook_layer=3,
            hook_name="blocks.3.hook_resid_post",
        )
    )
    jump = build_sae(SAEConfig(architecture="jumprelu", d_in=16, d_sae=40))
    save_saelens(topk, tmp_path / "saelens_3")
    save_mmdiff_checkpoint(topk, tmp_path / "ours_3" / "sae.safetensors")
    save_gemma_scope(jump, tmp_path / "layer_5" / "width_16k" / "params.npz")
    assert [probe_sae(tmp_path / f) for f in ("saelens_3", "ours_3", "layer_5/width_16k")] == [
        SAEFacts("saelens", 16, 48, 3),
        SAEFacts("mmdiff", 16, 48, 3),
        SAEFacts("gemma_scope", 16, 40, 5),
    ]
    assert check_base_saes(str(tmp_path / "saelens_{layer}"), [3], 16) == []
    (msg,) = check_base_saes(str(tmp_path / "ours_{layer}"), [3], 32)
    assert msg.endswith(
        "expects d_in=16, the model's hidden size is 32: is this SAE for another model?"
    )


def test_hub_id_saes_are_looked_up_in_the_cache_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    template = "fnlp/Llama3_1-8B-Base-LXR-8x/Llama3_1-8B-Base-L{layer}R-8x"
    (msg,) = check_base_saes(template, [8], 64, offline=True)
    assert msg.startswith(
        "train.base_saes (layer 8): fnlp/Llama3_1-8B-Base-LXR-8x/Llama3_1-8B-"
        "Base-L8R-8x is a hub id that is not cached in "
    )
    assert check_base_saes(template, [8], 64, offline=False) == []  # fetched at run time
    snap = tmp_path / "hub" / "models--fnlp--Llama3_1-8B-Base-LXR-8x" / "snapshots" / "r1"
    write_llama_scope(snap / "Llama3_1-8B-Base-L8R-8x", 8, d_model=64, d_sae=256)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("r1")
    assert check_base_saes(template, [8], 64, offline=True) == []
    (msg,) = check_base_saes(template, [8], 128, offline=True)
    assert "expects d_in=64, the model's hidden size is 128" in msg


# ----------------------------------------------------------------- what a run would only find later
def test_dataset_argument_of_the_wrong_type(tmp_path: Path) -> None:
    """`n_per_family: eight` used to pass the dry run and fail with a TypeError after the models loaded."""
    for read_records in (True, False):
        spec = DatasetSpec(kind="shapes", args={"split": "train", "n_per_family": "eight"})
        (msg,) = check_dataset("train", spec, read_records=read_records)
        assert msg.startswith("datasets.train.args.n_per_family: 'eight' is not of the type the shapes "
                              "loader takes (n_per_family: int;"), msg
    spec = DatasetSpec(kind="shapes", args={"split": "train", "n_per_family": 2, "families": "colour"})
    (msg,) = check_dataset("train", spec)
    assert "families: " in msg and "not allowed as a Sequence" in msg
    assert check_dataset("train", DatasetSpec(kind="shapes", args={"split": "train", "n_per_family": 2})) == []


def test_empty_training_split_is_refused_before_capture() -> None:
    """n_per_family: 0 used to pass, capture 0 records, and fail in training naming a non-key."""
    spec = DatasetSpec(kind="shapes", args={"split": "train", "n_per_family": 0})
    for read_records in (True, False):
        assert check_dataset("train", spec, read_records=read_records) == [
            "datasets.train.args.n_per_family: 0 records per question family makes the dataset "
            "empty; expected an int >= 1"
        ]


def test_cuda_device_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from mmdiff.checks.models import check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (msg,) = check_device("cuda")
    assert msg.startswith("model.device: 'cuda', but this torch (") and "use device: cpu" in msg
    assert check_device("cpu") == []
    (msg,) = check_device("gpu")
    assert msg.startswith("model.device: 'gpu' is not a torch device")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert check_device("cuda:0") == []
    (msg,) = check_device("cuda:1")
    assert "only 1 CUDA device(s) are visible" in msg
    cfg = default_config()
    cfg.model.device = "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert any(p.startswith("model.device: 'cuda'") for p in check_study(cfg, read_records=False))
