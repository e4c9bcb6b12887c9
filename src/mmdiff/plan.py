"""What a study will cost before it runs: tokens, FLOPs, peak GPU memory, disk and wall time per stage.

`plan_study(config, device)` returns a `Plan` (data); `mmdiff plan --config FILE` prints it, and so
does the end of `mmdiff run --dry-run`. No weights are loaded: the model pair is built on the meta
device from its config.json (or, when the checkpoint is not on disk yet, from the published config
of a known checkpoint, `mmdiff.models.published`), which gives exact parameter counts.

Formulas (per stage, summed over the datasets and sides it reads):
- tokens: records x tokens per record, from a sample of each dataset's records: encoded by the
  checkpoint's own processor and tokenizer when they are on disk (exact), else image tokens from
  the adapter's layout for each sampled image size (`image_tokens`) and text at 4 characters per
  token plus `TEMPLATE_TOKENS` for the prompt template.
- forward FLOPs: 2 x (decoder parameters up to the deepest layer the pass needs + lm_head when
  logits are needed) per token, plus attention scores 4 x seq x heads x head_dim per token and
  layer, plus 2 x vision-tower parameters per vision-tower token (VLM side). Backward = 2 x forward.
- SAE training FLOPs: 6 x d_model x d_sae per token and layer (the encoder product forward and its two
  backward products, dense-equivalent; the k-sparse decoder terms are O(k d) and left out).
  SAE encoding (stats): 2 x d_model x d_sae per token and layer.
- peak GPU memory: the runtime (`Device.runtime_bytes`), both models' weights in the config dtype
  (the run keeps both loaded), plus the stage's own: forward transients batch x seq x (6 d + 2 d_ff) x dtype bytes + one layer's attention
  scores batch x heads x seq^2 x dtype bytes (+ batch x seq x vocab x 4 when logits are needed);
  SAE training: per layer 16 bytes per parameter (fp32 weights, gradients, Adam m and v) of 2 d d_sae
  parameters, plus 3 x batch x d_sae x 4 bytes of pre-activations and their gradients.
- control stages: record passes of every evaluation the ablate stage runs (`control_evaluations`:
  the removal experiment and each removal analysis, each removal beside its split random control,
  without what their shared evaluator computes once) and the steer stage runs (`_steering_parts`:
  each task's own records on validation and test, alpha 0 once per split); generated answers decode
  max_new_tokens steps per batch.
- disk: activation stores, tokens x layers x d_model x capture dtype bytes; SAEs, 2 d d_sae x 4
  bytes per role and layer, and the same again with Adam state in the last checkpoint (x 4).
- wall time: forward FLOPs / (peak x forward_efficiency) + SAE FLOPs / (peak x sae_efficiency) +
  record passes x record_overhead_s (preprocessing, tokenisation, Python) + batched passes x
  batch_overhead_s (launches, hooks) + figures x figure_s + SAE steps x sae_step_overhead_s +
  token x layer x latent updates of the statistics pass x feature_stat_s + generated tokens x
  (weights bytes / memory bandwidth + decoder layers x decode_layer_s).

Judgment calls: the device table's peak is the dense bf16 rate of the named GPU; its efficiencies
and overheads were measured on one H200 by `make gpu-check` (the comment under `DEVICES` says how)
and are reused for the other GPUs. On CPU the rates are effective ones measured with the organism
study on this project's 2-core host (`CPU_*`), and the runtime's own memory is this process's
resident set. `mmdiff plan --against RUN_DIR` prints a plan beside what a finished run measured.
Stages that only read tables (diff, detect) are costed at `TABLE_STAGE_S` seconds.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from mmdiff.config import DatasetSpec, StudyConfig
from mmdiff.errors import MMDiffError, ModelError

TEMPLATE_TOKENS = 16  # BOS, role markers and separators around the question
CHARS_PER_TOKEN = 4.0  # when no tokenizer is at hand
DEFAULT_IMAGE_SIZE = (480, 640)  # (height, width) assumed when no image can be read: COCO's median
TABLE_STAGE_S = 1.0  # measured 0.2-0.7 s on the organism (GPU host), 4-15 s on a loaded 2-core CPU
TABLE_STAGES = ("diff", "detect")  # read tables only, no model pass
SAMPLE = 64  # records sampled per dataset for token lengths and image sizes
GIB = 1024**3


@dataclass(frozen=True)
class Device:
    """What a stage's wall time and memory are judged against."""

    name: str
    kind: str  # "cuda" or "cpu"
    peak_flops: float  # dense bf16 (GPU) or a timed fp32 matmul (CPU), FLOP/s
    memory_bytes: float | None  # None: host memory, not checked
    bandwidth: float  # bytes/s of weight reads while decoding
    # Defaults: the GPU figures of `make gpu-check` on an H200 (torch 2.11, CUDA 13.0, 2026-12-04,
    # mmdiff fac72d3); where they come from is said below the table.
    forward_efficiency: float = 0.53
    sae_efficiency: float = 0.0033
    record_overhead_s: float = 5e-4  # per record pass: preprocessing, tokenisation, collation
    batch_overhead_s: float = 0.03  # per batched model pass: kernel launches, hooks, Python
    decode_layer_s: float = 3e-4  # per generated step and decoder layer: one decode step's launches
    figure_s: float = 0.11  # per figure rendered (attention overlays): matplotlib, PNG encoding
    sae_step_overhead_s: float = 0.025  # per SAE optimisation step (all layers): bookkeeping, Adam
    feature_stat_s: float = 1.4e-9  # per token x layer x latent of the statistics pass's bookkeeping
    runtime_bytes: float = GIB  # CUDA context and allocator slack (CPU: the interpreter and libraries)


DEVICES: dict[str, Device] = {
    "h100": Device("H100 SXM 80 GB", "cuda", 989e12, 80e9, 3.35e12),
    "h200": Device("H200 141 GB", "cuda", 989e12, 141e9, 4.8e12),
    "a100": Device("A100 80 GB", "cuda", 312e12, 80e9, 2.0e12),
    "a100-40gb": Device("A100 40 GB", "cuda", 312e12, 40e9, 1.56e12),
    "l40s": Device("L40S 48 GB", "cuda", 362e12, 48e9, 0.864e12),
    "l4": Device("L4 24 GB", "cuda", 121e12, 24e9, 0.3e12),
}
"""Named GPUs: dense bf16 peak and HBM bandwidth from the vendors' data sheets."""

# Where the GPU constants come from (one H200, `make gpu-check`, 2026-12-04, mmdiff fac72d3; the raw
# outputs are in docs/measurements/gpu_check_h200_2026-12-04_*.json):
# - forward_efficiency 0.53: benchmarks/scale.py's LLaVA-MORE-shaped 8.35B VLM in bf16, batch 8 x 641
#   tokens, 31,277 tokens/s = 2 x 8.35e9 x 31,277 FLOP/s = 0.53 of the 989 TFLOP/s peak.
# - sae_efficiency 0.0033: the same benchmark's SAE training at D=4096, F=32768, k=50, batch 4,096:
#   mmdiff 4,105 tokens/s = 6 x 4096 x 32768 x 4,105 FLOP/s (eai-sparsify: 157,881 tokens/s, 0.13).
#   That is mmdiff's certified TopK falling back to exact keys on CUDA (issue 23); re-measure when
#   it is fixed.
# - record, batch, figure, SAE-step and statistics overheads: least squares (relative error) over the
#   organism study's stages on that GPU; in-sample, measured / predicted is 0.80-1.52x per stage.
# - decode_layer_s 3e-4: an estimate (about ten kernel launches and their Python per layer and
#   generated token), not fitted: the organism's decoding is too short to separate it.
# Not yet checked on a second config or GPU model: the other entries reuse these factors.

# Fitted on this project's 2-core CPU host by benchmarks/fit_cpu_plan.py: non-negative least squares,
# relative error, of each stage's seconds in a run's manifest against the work this module counts for
# it (capture, train, stats, attribute, concepts, ablate and steer of the organism study run from a
# fresh clone on a mostly quiet host, `make run`, 2026-12-04, mmdiff 7fc9ef1; torch's 2 default
# threads, passive OpenMP waits). One model size cannot tell the per-record cost from the forward
# FLOP rate (both grow with the records): the per-record cost is held at the processor's measured
# 1 ms per record (images and tokenisation of a 128-record batch), the per-decode-step and per-figure
# costs at the GPU host's (`--fix 2=0.001 --fix 5=3e-4 --fix 6=0.11`). In that fit, measured / fitted
# is 0.81 (attribute) to 2.4 (capture, 16 s); the SAE-step cost came out 0 (the trainer's steps are
# inside its FLOP rate). The former constants were
# fitted under load with spinning OpenMP threads: train 79 min and stats 7 min against 5 min and 13 s.
CPU_FORWARD_FLOPS = 19e9
CPU_SAE_FLOPS = 8.9e9
CPU_RECORD_OVERHEAD_S = 0.001
CPU_SAE_STEP_S = 0.0
CPU_FEATURE_STAT_S = 2.2e-8
CPU = Device("the 2-core CPU host of the organism measurements", "cpu", CPU_FORWARD_FLOPS, None, 10e9,
             forward_efficiency=1.0, sae_efficiency=CPU_SAE_FLOPS / CPU_FORWARD_FLOPS,
             record_overhead_s=CPU_RECORD_OVERHEAD_S, sae_step_overhead_s=CPU_SAE_STEP_S,
             feature_stat_s=CPU_FEATURE_STAT_S, runtime_bytes=0.0,
             # per-batch launch costs are inside the per-record and FLOP rates; figures and decode
             # steps as on the GPU host (not separable on the organism)
             batch_overhead_s=0.0, figure_s=0.11, decode_layer_s=3e-4)


def cpu_device() -> Device:
    """The CPU rates measured with the organism, with this process's resident memory (torch,
    transformers, the records) as the runtime a run adds to the model's own memory."""
    import resource

    return replace(CPU, runtime_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def device_for(cfg: StudyConfig, name: str | None = None) -> tuple[Device, str | None]:
    """The device to plan for: `name` from DEVICES or "cpu", else the config's; with a note when assumed."""
    if name is None:
        if not str(cfg.model.device).startswith("cuda"):
            return cpu_device(), None
        return DEVICES["h100"], "the config runs on cuda: planned for an H100 (pass --device to change)"
    key = name.lower()
    if key == "cpu":
        return cpu_device(), None
    if key not in DEVICES:
        raise MMDiffError(f"unknown device {name!r}: expected 'cpu' or one of {sorted(DEVICES)}")
    return DEVICES[key], None


# ----------------------------------------------------------------------------- the model pair
@dataclass
class ModelFacts:
    """Sizes of the model pair, counted on the meta device."""

    adapter: Any  # the family adapter over the meta-device models (no weights)
    vlm_config: Any
    preprocessor: dict[str, Any]
    vlm_params: int
    vision_params: int
    layer_params: list[int]  # per decoder layer of the VLM's LM
    head_params: int  # lm_head
    base_params: int
    base_layer_params: list[int]
    d_model: int
    d_ff: int
    n_heads: int
    head_dim: int
    vocab: int
    bytes_per_param: int
    exact: bool  # the checkpoints' processor and tokenizer are on disk: token counts are exact
    source: str

    @property
    def n_layers(self) -> int:
        return len(self.layer_params)

    def weights_bytes(self) -> float:
        return (self.vlm_params + self.base_params) * self.bytes_per_param


def _dtype_bytes(dtype: str) -> int:
    name = str(dtype).lower().removeprefix("torch.")
    return 2 if name in ("bfloat16", "bf16", "float16", "fp16", "half", "auto") else 4


def _read_model_config(path_or_id: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    """(config.json, image-processor settings, where they came from) of a checkpoint."""
    from mmdiff.models.published import PREPROCESSORS, PUBLISHED, published_id

    folder = Path(path_or_id).expanduser()
    if (folder / "config.json").is_file():
        pre = folder / "preprocessor_config.json"
        preprocessor = json.loads(pre.read_text()) if pre.is_file() else {}
        return json.loads((folder / "config.json").read_text()), preprocessor, str(folder)
    hub_id = published_id(path_or_id)
    if hub_id is None:
        raise ModelError(
            f"no config.json at {path_or_id} and it is not a checkpoint whose published config "
            "mmdiff knows (mmdiff.models.published.PUBLISHED): download the checkpoint's "
            "config.json into that folder, and the plan reads the sizes from it"
        )
    return PUBLISHED[hub_id], PREPROCESSORS.get(hub_id, {}), f"published config of {hub_id}"


def model_facts(cfg: StudyConfig) -> ModelFacts:
    """Parameter counts and shapes of the config's VLM and base LM, built on the meta device."""
    import transformers

    from mmdiff.models import adapter_for_model_type

    from mmdiff.study import resolve_model_paths

    vlm_path, base_path = resolve_model_paths(cfg)
    vlm_raw, preprocessor, source = _read_model_config(vlm_path)
    base_raw, _, base_source = _read_model_config(base_path or vlm_path)
    vlm_config = transformers.AutoConfig.for_model(**vlm_raw)
    base_config = transformers.AutoConfig.for_model(**base_raw)
    cls = adapter_for_model_type(vlm_config.model_type)
    vlm_class = getattr(transformers, cls.vlm_classes[vlm_config.model_type])
    with torch.device("meta"):
        vlm = vlm_class(vlm_config)
        base = transformers.AutoModelForCausalLM.from_config(base_config)
    processor, base_tokenizer = _local_processor(cls, vlm_path, base_path)
    adapter = cls(vlm, processor or SimpleNamespace(tokenizer=None), base, base_tokenizer,
                  name=str(vlm_path))
    lm, b = adapter.vlm, adapter.base
    assert b is not None
    count = lambda *ms: sum(  # noqa: E731  (tied embeddings are one parameter, counted once)
        p.numel() for p in {id(p): p for m in ms for p in m.parameters()}.values())
    language = count(vlm.get_decoder(), vlm.get_output_embeddings())
    text = vlm_config.get_text_config()
    return ModelFacts(
        adapter=adapter,
        vlm_config=vlm_config,
        preprocessor=preprocessor,
        vlm_params=count(vlm),
        vision_params=count(vlm) - language,
        layer_params=[count(layer) for layer in lm.layers],
        head_params=count(vlm.get_output_embeddings()),
        base_params=count(base),
        base_layer_params=[count(layer) for layer in b.layers],
        d_model=lm.d_model,
        d_ff=int(getattr(text, "intermediate_size", 4 * lm.d_model)),
        n_heads=lm.num_heads,
        head_dim=lm.head_dim,
        vocab=int(text.vocab_size),
        bytes_per_param=_dtype_bytes(cfg.model.dtype),
        exact=processor is not None and base_tokenizer is not None,
        source=source if source == base_source else f"{source}; base: {base_source}",
    )


def _local_processor(cls: Any, vlm_path: str, base_path: str | None) -> tuple[Any, Any]:
    """The VLM's processor and the base LM's tokenizer when both are on disk, else (None, None)."""
    from mmdiff.models.loading import load_tokenizer

    if base_path is None or not all(Path(p).expanduser().is_dir() for p in (vlm_path, base_path)):
        return None, None
    try:
        processor = cls.load_processor(vlm_path, local_files_only=True, trust_remote_code=False)
        return processor, load_tokenizer(base_path, local_files_only=True, trust_remote_code=False)
    except MMDiffError:
        return None, None


def image_tokens(facts: ModelFacts, height: int, width: int) -> tuple[int, int]:
    """(image tokens in the LM, vision-tower tokens) of one image of this size, by the adapter's layout."""
    from mmdiff.interp.heatmap import tile_token_count

    adapter, config, pre = facts.adapter, facts.vlm_config, facts.preprocessor
    if adapter.family == "qwen2_vl":
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        vision = config.vision_config
        patch, merge = int(vision.patch_size), int(vision.spatial_merge_size)
        h, w = smart_resize(height, width, factor=patch * merge,
                            min_pixels=pre.get("min_pixels", 56 * 56),
                            max_pixels=pre.get("max_pixels", 28 * 28 * 1280))
        patches = (h // patch) * (w // patch)
        return patches // merge**2, patches
    if adapter.family == "internvl":
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

        from mmdiff.models.internvl import tokens_per_tile

        size = pre.get("size", {}).get("height", 448)
        cols, rows = get_optimal_tiled_canvas((height, width), (size, size),
                                              pre.get("min_patches", 1), pre.get("max_patches", 12))
        tiles = cols * rows + (cols * rows > 1)
        per_tile = tokens_per_tile(config)
        return tiles * per_tile, int(tiles * per_tile / config.downsample_ratio**2)
    inputs = {"image_sizes": torch.tensor([[height, width]])} if adapter.family == "llava_next" else {}
    n = tile_token_count(adapter.patch_grid(inputs, 0))
    return n, n


# ----------------------------------------------------------------------------- the datasets
@dataclass
class DatasetFacts:
    """Records and average tokens per record of one configured dataset."""

    name: str
    records: int
    vlm_tokens: float  # text + image tokens per record (records with an image)
    image_tokens: float
    vision_tokens: float  # the vision tower's own tokens per record
    base_tokens: float  # caption + question tokens per record, the base side
    image_share: float  # records with an image
    generate_tokens: float  # new tokens per record when the control stages evaluate it
    note: str | None = None
    tasks: dict[str, int] = field(default_factory=dict)  # records of each evaluation task (control.tasks)


def _text_tokens(texts: Sequence[str]) -> float:
    return sum(len(t) for t in texts) / CHARS_PER_TOKEN / max(len(texts), 1)


def _encoded_lengths(facts: ModelFacts, records: Sequence[Any]) -> tuple[float, float, float]:
    """(VLM tokens, image tokens, base tokens) per record, by the checkpoint's own processor."""
    adapter = facts.adapter
    with_image = [r for r in records if r.image is not None]
    vlm = image = 0.0
    if with_image:
        prompts = [adapter.vlm_prompt(r.question) for r in with_image]
        encoded = adapter._encode_vlm(prompts, [r.load_image() for r in with_image], None)
        ids = torch.as_tensor(encoded["input_ids"])
        vlm = float(torch.as_tensor(encoded["attention_mask"]).sum()) / len(with_image)
        image = float((ids == adapter.image_token_id).sum()) / len(with_image)
    captioned = [r for r in records if r.caption]
    base = 0.0
    if captioned:
        prompts = [adapter.base_prompt(r.caption, r.question) for r in captioned]
        lengths = [len(x) for x in adapter.base_tokenizer(prompts)["input_ids"]]
        base = sum(lengths) / len(lengths)
    return vlm, image, base


def _image_size(record: Any) -> tuple[int, int] | None:
    from PIL import Image

    image = record.image
    if image is None:
        return None
    try:
        if isinstance(image, Image.Image):
            return image.height, image.width
        with Image.open(image) as im:  # reads the header only
            return im.height, im.width
    except OSError:
        return None


def dataset_facts(name: str, spec: DatasetSpec, facts: ModelFacts, sample: int = SAMPLE) -> DatasetFacts:
    """Record count and tokens per record, from the dataset's files when they can be read here."""
    from mmdiff.control.tasks import DEFAULT_MAX_NEW_TOKENS, YESNO_TASKS, task_of
    from mmdiff.data.loaders._common import subsample
    from mmdiff.data.selection import load_records

    try:
        records = load_records(spec)
    except (MMDiffError, OSError) as exc:  # files not here: plan from the config alone
        n = spec.limit or 1000
        h, w = DEFAULT_IMAGE_SIZE
        img, vis = image_tokens(facts, h, w)
        text = 20 + TEMPLATE_TOKENS
        return DatasetFacts(name, n, text + img, img, vis, text + 15, 1.0, 0.0,
                            note=f"{name}: its files are not readable here ({type(exc).__name__}); "
                            f"assumed {n} records of {h}x{w} images, 20-token questions")
    chosen = subsample(records, sample, 0)
    sizes = [_image_size(r) for r in chosen]
    with_image = [s for s in sizes if s is not None]
    counts = [image_tokens(facts, h, w) for h, w in with_image] or [(0, 0)]
    img = sum(c[0] for c in counts) / len(counts)
    vis = sum(c[1] for c in counts) / len(counts)
    share = len(with_image) / max(len(chosen), 1)
    if facts.exact:
        vlm, img_exact, base = _encoded_lengths(facts, chosen)
        img = img_exact or img
    else:
        questions = _text_tokens([r.question for r in chosen]) + TEMPLATE_TOKENS
        vlm = questions + img
        base = questions + _text_tokens([r.caption for r in chosen if r.caption])
    generate = 0.0
    for r in chosen:
        task = task_of(r)
        if task is not None and task not in YESNO_TASKS:
            generate += DEFAULT_MAX_NEW_TOKENS.get(task, 8)
    tasks = Counter(t for r in records if r.image is not None and (t := task_of(r)) is not None)
    return DatasetFacts(name, len(records), vlm, img, vis, base, share, generate / max(len(chosen), 1),
                        tasks=dict(tasks))


# ----------------------------------------------------------------------------- the stages
@dataclass
class StagePlan:
    """One stage's predicted cost."""

    stage: str
    tokens: float = 0.0  # tokens through a model forward (both sides)
    forward_flops: float = 0.0
    sae_flops: float = 0.0
    peak_bytes: float = 0.0  # GPU (or host) memory at the stage's peak
    disk_bytes: float = 0.0
    seconds: float = 0.0
    records: float = 0.0  # record-passes (each pays the per-record overhead)
    batches: float = 0.0  # batched model passes (each pays the per-batch overhead)
    figures: float = 0.0  # figures rendered
    sae_steps: float = 0.0  # SAE optimisation steps
    feature_stats: float = 0.0  # token x layer x latent updates of the feature statistics
    generated: float = 0.0  # tokens decoded one at a time
    notes: list[str] = field(default_factory=list)


@dataclass
class Plan:
    """The predicted cost of every stage of a study on one device."""

    config: str
    device: Device
    model: str
    params: dict[str, int]
    datasets: dict[str, DatasetFacts]
    stages: list[StagePlan]
    warnings: list[str]
    assumptions: list[str]

    @property
    def total_seconds(self) -> float:
        return sum(s.seconds for s in self.stages)


class _Costs:
    """Forward and SAE costs of the model pair; each method returns a partial StagePlan."""

    def __init__(self, cfg: StudyConfig, facts: ModelFacts, data: dict[str, DatasetFacts]):
        self.cfg, self.facts, self.data = cfg, facts, data
        self.d_sae = facts.d_model * cfg.train.expansion_factor
        self.deepest = max(cfg.layers) + 1

    def forward(self, names: str | Sequence[str], side: str, *, passes: float = 1.0,
                layers: int | None = None, logits: bool = False, batch: int = 16,
                backward: bool = False) -> StagePlan:
        """A forward pass (x passes) over datasets on one side, through `layers` decoder layers."""
        f = self.facts
        names = [names] if isinstance(names, str) else list(names)
        n_layers = layers if layers is not None else f.n_layers
        per_layer = f.layer_params if side == "vlm" else f.base_layer_params
        weights = sum(per_layer[:n_layers]) + (f.head_params if logits else 0)
        out = StagePlan("")
        seq_max = 0.0
        for name in names:
            d = self.data[name]
            seq = d.vlm_tokens if side == "vlm" else d.base_tokens
            tokens = d.records * seq * passes
            attention = 4 * seq * f.n_heads * f.head_dim * n_layers
            flops = tokens * (2 * weights + attention)
            if side == "vlm":
                flops += 2 * f.vision_params * d.vision_tokens * d.image_share * d.records * passes
            out.tokens += tokens
            out.forward_flops += flops * (3 if backward else 1)
            out.records += d.records * passes
            out.batches += math.ceil(d.records / max(batch, 1)) * passes
            seq_max = max(seq_max, seq)
        bytes_ = f.bytes_per_param
        act = batch * seq_max * (6 * f.d_model + 2 * f.d_ff) * bytes_
        act += batch * f.n_heads * seq_max**2 * bytes_
        if logits:
            act += batch * seq_max * f.vocab * 4
        out.peak_bytes = f.weights_bytes() + act * (3 if backward else 1)
        return out

    def sae_params(self) -> float:
        return 2 * self.facts.d_model * self.d_sae + self.d_sae + self.facts.d_model

    def sae_training(self, tokens: float, n_layers: int) -> StagePlan:
        t = self.cfg.train
        out = StagePlan("")
        out.sae_flops = 6 * self.facts.d_model * self.d_sae * tokens * n_layers
        out.sae_steps = tokens / t.batch_size
        out.peak_bytes = self.facts.weights_bytes() + n_layers * (
            16 * self.sae_params() + 3 * t.batch_size * self.d_sae * 4)
        return out


def _merge(name: str, parts: Sequence[StagePlan], device: Device, facts: ModelFacts) -> StagePlan:
    out = StagePlan(name)
    for p in parts:
        out.tokens += p.tokens
        out.forward_flops += p.forward_flops
        out.sae_flops += p.sae_flops
        out.disk_bytes += p.disk_bytes
        out.records += p.records
        out.batches += p.batches
        out.figures += p.figures
        out.generated += p.generated
        out.sae_steps += p.sae_steps
        out.feature_stats += p.feature_stats
        out.peak_bytes = max(out.peak_bytes, p.peak_bytes)
        out.notes += p.notes
    if out.peak_bytes:
        out.peak_bytes += device.runtime_bytes
    out.seconds = (out.forward_flops / (device.peak_flops * device.forward_efficiency)
                   + out.sae_flops / (device.peak_flops * device.sae_efficiency)
                   + out.records * device.record_overhead_s
                   + out.batches * device.batch_overhead_s
                   + out.figures * device.figure_s
                   + out.sae_steps * device.sae_step_overhead_s
                   + out.feature_stats * device.feature_stat_s
                   + out.generated * (facts.vlm_params * facts.bytes_per_param / device.bandwidth
                                      + facts.n_layers * device.decode_layer_s))
    return out


def _stats_names(cfg: StudyConfig) -> list[str]:
    return [cfg.stats.dataset] if isinstance(cfg.stats.dataset, str) else list(cfg.stats.dataset)


def _stage_parts(cfg: StudyConfig, c: _Costs) -> dict[str, list[StagePlan]]:
    """Each stage's partial costs (before they are merged and timed)."""
    f, t, L = c.facts, cfg.train, len(cfg.layers)
    captured = {(ds, side) for ds in cfg.capture.datasets for side in cfg.capture.sides}
    stages: dict[str, list[StagePlan]] = {}

    parts = []
    for ds in cfg.capture.datasets:
        for side in cfg.capture.sides:
            p = c.forward(ds, side, layers=c.deepest, batch=cfg.capture.batch_size)
            p.disk_bytes = p.tokens * L * f.d_model * _dtype_bytes(cfg.capture.dtype)
            parts.append(p)
    stages["capture"] = parts

    # train: base SAEs (unless given), then each regime on the VLM, then held-out metrics
    train = cfg.train.dataset
    d = c.data[train]
    parts = []
    sae_disk = L * c.sae_params() * 4 * 4  # final weights + the last checkpoint with Adam state
    if t.base_saes is None:
        base_tokens = t.base_total_tokens or t.total_tokens
        parts.append(c.sae_training(base_tokens, L))
        if (train, "base") not in captured:
            parts.append(c.forward(train, "base", passes=base_tokens / max(d.records * d.base_tokens, 1),
                                   layers=c.deepest, batch=cfg.capture.batch_size))
        parts[-1].disk_bytes += sae_disk
    shares = {"full": 1.0, "random": 1.0, "image": d.image_tokens * d.image_share / max(d.vlm_tokens, 1)}
    shares["text"] = 1.0 - shares["image"]
    for regime in t.regimes:
        p = c.sae_training(t.total_tokens, L)
        p.disk_bytes = sae_disk
        parts.append(p)
        if (train, "vlm") not in captured:
            forwarded = t.total_tokens / max(shares[regime], 1e-3)
            parts.append(c.forward(train, "vlm", passes=forwarded / max(d.records * d.vlm_tokens, 1),
                                   layers=c.deepest, batch=cfg.capture.batch_size))
    held = cfg.train.heldout
    for side in ("vlm", "base"):
        parts.append(c.forward(held, side, layers=c.deepest, batch=cfg.capture.batch_size))
        if t.spliced_loss:  # clean, one zero-ablated per layer, one per SAE (metrics.spliced_losses)
            roles = len(t.regimes) + 1 if side == "vlm" else 1
            parts.append(c.forward(held, side, passes=1 + L + L * roles, logits=True,
                                   batch=cfg.capture.batch_size))
    stages["train"] = parts

    s = cfg.stats
    names = _stats_names(cfg)
    parts = []
    for side in ("vlm", "base"):
        p = c.forward(names, side, layers=c.deepest, batch=s.batch_size)
        p.sae_flops = 2 * f.d_model * c.d_sae * p.tokens * L
        p.feature_stats = p.tokens * L * c.d_sae
        p.peak_bytes += L * c.sae_params() * 4
        parts.append(p)
    if s.neutral_tasks:
        share = 1.0 / max(len(s.tasks) + 1, 1)  # the neutral tasks' share of the analysis records
        parts.append(c.forward(names, "vlm", passes=share * len(s.neutral_tasks), layers=c.deepest,
                               batch=s.batch_size))
    stages["stats"] = parts
    stages.update({name: [] for name in TABLE_STAGES})

    a = cfg.attribution
    per_record = c.data[names[0]]
    samples = a.max_features * a.top_k
    parts = [c.forward(names[0], "vlm", passes=samples / max(per_record.records, 1), backward=True,
                       batch=a.batch_size),
             c.forward(names[0], "vlm", passes=a.n_calibration / max(per_record.records, 1), batch=a.batch_size)]
    if a.exact:
        heads = f.n_heads * c.deepest
        parts.append(c.forward(names[0], "vlm", passes=samples * heads / max(per_record.records, 1),
                               batch=a.batch_size))
    parts[0].figures = a.max_features * 2 * a.overlay_heads  # attention overlays, top and bottom heads
    stages["attribute"] = parts

    stages["interp"] = [c.forward(names, "vlm", batch=cfg.interp.batch_size)]
    if cfg.concepts.enabled and cfg.concepts.dataset in c.data:
        k = cfg.concepts
        stages["concepts"] = [c.forward(k.dataset, side, batch=k.batch_size) for side in ("vlm", "base")]
        stages["concepts"].append(c.forward(k.dataset, "vlm", passes=len(k.alphas) * k.holdout,
                                            logits=True, batch=k.batch_size))

    ctl = cfg.control
    if ctl.test in c.data:
        parts = []
        for name, (n_eval, records, steps) in control_evaluations(cfg, c.data[ctl.test]).items():
            p = c.forward(ctl.test, "vlm", passes=records / max(c.data[ctl.test].records, 1), logits=True,
                          batch=ctl.batch_size)
            p.generated = steps
            p.notes.append(f"{name}: {n_eval} evaluations, {records:,.0f} record passes")
            parts.append(p)
        if ctl.pipeline_ablation:  # the random-regime SAEs' statistics: one more statistics pass, VLM side
            regime = c.forward(names, "vlm", layers=c.deepest, batch=s.batch_size)
            regime.sae_flops = 2 * f.d_model * c.d_sae * regime.tokens * L
            regime.feature_stats = regime.tokens * L * c.d_sae
            parts.append(regime)
        stages["ablate"] = parts
        if ctl.validation in c.data:
            stages["steer"] = _steering_parts(cfg, c)
    return stages


PLAN_SET_SIZE = 48
"""Features per task set assumed before the detect stage has run, for the dose-response's steps (1, 2,
4, ... and the whole set: 7 at 48; the organism's sets hold 35-56 features)."""
CATEGORY_SHARE = 1 / 6
"""A single feature's own category, as a share of its task's records (the organism: 50 of 200 records
per spatial relation, about 16 per safety noun)."""


PIPELINE_SETS = 7 / 3
"""Sets the pipeline ablation removes per task besides the task set: the random-regime SAE's and the
steps whose filter changes the set (a filter that keeps every feature, or was not run, repeats the
step before, which is not evaluated again; the organism: 28 evaluations over 3 tasks and 2 eval tasks,
7/3 sets each)."""


def _evaluation(n: float, new_tokens: int, batch: int, draws: int = 1) -> tuple[float, float]:
    """(record passes, decode steps) of one evaluation of n records split over `draws` interventions
    (each part batched on its own)."""
    per = n / max(draws, 1)
    return n, draws * math.ceil(per / max(batch, 1)) * new_tokens


def control_evaluations(cfg: StudyConfig, test: DatasetFacts) -> dict[str, tuple[int, float, float]]:
    """{part: (evaluations, record passes, decode steps)} of the ablate stage on `test`: the removal
    experiment and each removal analysis (control.analyses), without what their shared Evaluator
    computes once (the clean pass; a removal evaluated for an earlier analysis: the full set at the
    removal positions on tasks of at most `analysis_records` records, the dose-response's first and
    last steps, the pipeline's last step). Every removal also pays for its matched random control,
    split over `n_random` draws."""
    from mmdiff.control.analyses import dose_sizes
    from mmdiff.control.tasks import DEFAULT_MAX_NEW_TOKENS, YESNO_TASKS

    ctl, batch = cfg.control, cfg.control.batch_size
    draws = ctl.n_random if ctl.n_random > 1 else 1
    counts = test.tasks or {"all": test.records}
    new = {t: 0 if t in YESNO_TASKS else DEFAULT_MAX_NEW_TOKENS.get(t, 8) for t in counts}
    sets = [t for t in (ctl.tasks or cfg.stats.tasks) if t in counts]
    out: dict[str, tuple[int, float, float]] = {}

    def add(part: str, task: str | None, n_scale: float = 1.0, control: bool = True, treated: bool = True,
            times: float = 1.0) -> None:
        if task is None or task not in counts:
            return
        n = counts[task] if part == "removal" or ctl.analysis_records is None else min(ctl.analysis_records, counts[task])
        e, r, g = out.get(part, (0, 0.0, 0.0))
        for kind, on in (("treated", treated), ("control", control)):
            if on:
                rec, steps = _evaluation(n * n_scale, new[task], batch, draws if kind == "control" else 1)
                e, r, g = e + times, r + times * rec, g + times * steps
        out[part] = (e, r, g)

    for task in counts:  # clean, then each set and its random control on every task
        add("removal", task, control=False)
        for _ in sets:
            add("removal", task, control=ctl.n_random > 0)
    roles = [ctl.general_task, ctl.benign_task]
    at = ctl.analysis_positions or ctl.positions
    for t in sets:
        for _variant in ("full", "own"):
            for pos in ctl.variant_positions:
                for task in [t, *roles]:
                    cached = _variant == "full" and pos == ctl.positions and task in counts
                    small = cached and (ctl.analysis_records is None or counts[task] <= ctl.analysis_records)
                    add("set_variants", task, treated=not cached, control=not small)
        for _rank in range(ctl.single_top):
            for task in [t, *roles]:
                add("single_features", task)
            if t in ctl.categories:
                add("single_features", t, n_scale=CATEGORY_SHARE)
        if ctl.dose_response:
            sizes = dose_sizes(PLAN_SET_SIZE, ctl.dose_max)
            for i, k in enumerate(sizes):
                free = (i == 0 and ctl.single_top > 0) or (k == PLAN_SET_SIZE and at in ctl.variant_positions)
                for task in (t, ctl.general_task):
                    add("dose_response", task, treated=not free, control=not free)
        if ctl.pipeline_ablation:  # the last step's set is the task set, evaluated by the set variants
            steps = PIPELINE_SETS + (at not in ctl.variant_positions)
            for task in (t, ctl.general_task):
                add("pipeline_ablation", task, times=steps)
    return {k: (round(e), r, g) for k, (e, r, g) in out.items()}


def _steering_parts(cfg: StudyConfig, c: _Costs) -> list[StagePlan]:
    """The steer stage: per task set, feature steering over the alphas and the single-layer baseline
    at each candidate layer on its validation records (alpha 0 once: the unsteered model), the
    baseline's difference of means (one pass over the validation records per layer), then both
    sweeps on its test records."""
    from mmdiff.control.tasks import DEFAULT_MAX_NEW_TOKENS, YESNO_TASKS

    ctl = cfg.control
    test, val = c.data[ctl.test], c.data[ctl.validation]
    n_layers = len(cfg.layers)
    alphas = [a for a in ctl.alphas if a != 0.0]
    zero = len(alphas) < len(ctl.alphas)
    parts = []
    for t in ctl.tasks or cfg.stats.tasks:
        if t not in test.tasks or t not in val.tasks:
            continue
        new = 0 if t in YESNO_TASKS else DEFAULT_MAX_NEW_TOKENS.get(t, 8)
        for data, name, n_eval in ((val, ctl.validation, len(alphas) * (1 + n_layers) + zero),
                                   (test, ctl.test, 2 * len(alphas) + zero)):
            p = c.forward(name, "vlm", passes=n_eval * data.tasks[t] / max(data.records, 1), logits=True,
                          batch=ctl.batch_size)
            p.generated = n_eval * math.ceil(data.tasks[t] / max(ctl.batch_size, 1)) * new
            parts.append(p)
        parts.append(c.forward(ctl.validation, "vlm", passes=n_layers, batch=ctl.batch_size))
    return parts


def plan_study(cfg: StudyConfig, device: Device | None = None, *, sample: int = SAMPLE) -> Plan:
    """The predicted tokens, FLOPs, peak memory, disk and wall time of every stage of `cfg`."""
    assumptions: list[str] = []
    if device is None:
        device, note = device_for(cfg)
        if note:
            assumptions.append(note)
    facts = model_facts(cfg)
    assumptions.append(f"model sizes from {facts.source}")
    if not facts.exact:
        assumptions.append(f"text lengths at {CHARS_PER_TOKEN:g} characters per token + {TEMPLATE_TOKENS} "
                           "for the template (the checkpoints' processor and tokenizer are not on disk)")
    used = _used_datasets(cfg)
    data = {name: dataset_facts(name, cfg.datasets[name], facts, sample) for name in used}
    assumptions += [d.note for d in data.values() if d.note]
    costs = _Costs(cfg, facts, data)
    stages = []
    for name, parts in _stage_parts(cfg, costs).items():
        stage = _merge(name, parts, device, facts)
        if name in TABLE_STAGES:
            stage.seconds = TABLE_STAGE_S
        stages.append(stage)
    warnings = _warnings(cfg, facts, costs, stages, device)
    params = {"vlm": facts.vlm_params, "vision": facts.vision_params, "base": facts.base_params}
    return Plan(cfg.name, device, str(facts.adapter.name), params, data, stages, warnings, assumptions)


def _used_datasets(cfg: StudyConfig) -> list[str]:
    names = [*cfg.capture.datasets, cfg.train.dataset, cfg.train.heldout, *_stats_names(cfg)]
    if cfg.concepts.enabled:
        names.append(cfg.concepts.dataset)
    names += [cfg.control.test] + ([cfg.control.validation] if cfg.control.validation else [])
    return [n for n in dict.fromkeys(names) if n in cfg.datasets]


def _warnings(cfg: StudyConfig, facts: ModelFacts, costs: _Costs, stages: list[StagePlan],
              device: Device) -> list[str]:
    """Stages that will not fit, with what to change."""
    out = []
    L = len(cfg.layers)
    by_name = {s.stage: s for s in stages}
    if device.memory_bytes is not None:
        weights = facts.weights_bytes()
        if weights > device.memory_bytes:
            out.append(f"the two models' weights alone take {weights / GIB:.1f} GiB, more than the "
                       f"{device.memory_bytes / GIB:.0f} GiB of the {device.name}: use a larger GPU "
                       "or a smaller dtype")
        train = by_name.get("train")
        if train is not None and train.peak_bytes > device.memory_bytes:
            per_layer = (train.peak_bytes - weights) / L
            fit = max(int((device.memory_bytes * 0.9 - weights) // per_layer), 0)
            if fit == 0:
                out.append(f"train: one layer's SAE with Adam state ({per_layer / GIB:.1f} GiB) does not fit "
                           f"beside the weights on the {device.name}: lower train.expansion_factor or "
                           "train.batch_size")
            else:
                ranks = math.ceil(L / fit)
                out.append(f"train: {L} layers' SAEs with Adam state take {train.peak_bytes / GIB:.0f} GiB, "
                           f"more than the {device.memory_bytes / GIB:.0f} GiB of the {device.name}: put at "
                           f"most {fit} layers per rank under torchrun (torchrun --nproc-per-node {ranks}), "
                           "or train fewer layers per run")
        for s in stages:
            if s.stage != "train" and s.peak_bytes > device.memory_bytes:
                out.append(f"{s.stage}: peak {s.peak_bytes / GIB:.0f} GiB exceeds the {device.name}: lower "
                           f"its batch_size (capture.batch_size / {s.stage} batch_size)")
    capture = by_name.get("capture")
    if capture is not None and capture.disk_bytes > 1e12:
        out.append(f"capture: the activation stores take {capture.disk_bytes / 1e12:.1f} TB: train on "
                   "live forward passes instead (capture.datasets: []), or capture fewer records")
    slow = [s for s in stages if s.seconds > 7 * 86400]
    for s in slow:
        out.append(f"{s.stage}: about {s.seconds / 86400:.0f} days on one {device.name}: lower its "
                   "token budget or spread it over ranks with torchrun")
    return out


# ----------------------------------------------------------------------------- plan vs a real run
@dataclass(frozen=True)
class StageCheck:
    """One stage's prediction beside what a run's manifest measured (None: not measured)."""

    stage: str
    predicted_s: float
    measured_s: float | None
    predicted_peak_bytes: float
    measured_peak_bytes: float | None
    peak_kind: str  # "cuda allocated" (torch's allocator, no CUDA context) or "host RSS"

    @property
    def time_ratio(self) -> float | None:
        """measured / predicted seconds (> 1: the plan was optimistic)."""
        if self.measured_s is None or self.predicted_s <= 0:
            return None
        return self.measured_s / self.predicted_s

    @property
    def peak_ratio(self) -> float | None:
        if self.measured_peak_bytes is None or self.predicted_peak_bytes <= 0:
            return None
        return self.measured_peak_bytes / self.predicted_peak_bytes


def check_against_run(plan: Plan, manifest: dict[str, Any]) -> list[StageCheck]:
    """Each planned stage beside the seconds and peak memory a run's manifest recorded.

    On CUDA the run records torch's allocator peak, which holds no CUDA context, so the plan's
    runtime allowance (`Device.runtime_bytes`) is taken off the prediction before they are compared;
    on the CPU the run records the process's peak resident set, the plan's runtime included."""
    stages = manifest.get("stages", {})
    cuda = plan.device.kind == "cuda"
    out = []
    for s in plan.stages:
        m = stages.get(s.stage) or {}
        done = m.get("status") == "done"
        seconds = m.get("seconds") if done else None
        if cuda:
            predicted = max(s.peak_bytes - plan.device.runtime_bytes, 0.0) if s.peak_bytes else 0.0
            measured = m.get("peak_cuda_mib")
        else:
            predicted, measured = s.peak_bytes, m.get("peak_rss_mib")
        out.append(StageCheck(s.stage, s.seconds, None if seconds is None else float(seconds), predicted,
                              None if (measured is None or not done) else float(measured) * 2**20,
                              "cuda allocated" if cuda else "host RSS"))
    return out


def check_text(plan: Plan, checks: Sequence[StageCheck]) -> list[str]:
    """The comparison as lines of text, ending with the range of the ratios."""
    header = ["stage", "predicted", "measured", "ratio", f"peak ({checks[0].peak_kind if checks else ''})",
              "measured", "ratio"]
    rows = [header]
    for c in checks:
        rows.append([c.stage, _duration(c.predicted_s),
                     "-" if c.measured_s is None else _duration(c.measured_s),
                     "-" if c.time_ratio is None else f"{c.time_ratio:.2f}x",
                     _memory(c.predicted_peak_bytes) if c.predicted_peak_bytes else "-",
                     "-" if c.measured_peak_bytes is None else _memory(c.measured_peak_bytes),
                     "-" if c.peak_ratio is None else f"{c.peak_ratio:.2f}x"])
    lines = [f"plan of {plan.config!r} on {plan.device.name} against the run (ratio = measured / predicted)"]
    lines += _table_lines(rows, rules_after=(0,))
    for label, values in (("time", [c.time_ratio for c in checks]), ("peak memory", [c.peak_ratio for c in checks])):
        got = [v for v in values if v is not None]
        if got:
            lines.append(f"{label}: measured / predicted from {min(got):.2f}x to {max(got):.2f}x "
                         f"over {len(got)} stages")
    return lines


# ----------------------------------------------------------------------------- presentation
def _human(n: float, unit: str = "") -> str:
    for scale, suffix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def _memory(n: float) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / 2**20:.0f} MiB"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


PLAN_COLUMNS = ("stage", "tokens", "forward FLOPs", "SAE FLOPs", "peak memory", "disk", "time")


def plan_rows(plan: Plan) -> list[list[str]]:
    """The plan as table rows (PLAN_COLUMNS), with a total row."""
    rows = []
    for s in plan.stages:
        rows.append([s.stage, _human(s.tokens), _human(s.forward_flops), _human(s.sae_flops),
                     _memory(s.peak_bytes) if s.peak_bytes else "-",
                     _human(s.disk_bytes, "B") if s.disk_bytes else "-", _duration(s.seconds)])
    rows.append(["total", _human(sum(s.tokens for s in plan.stages)),
                 _human(sum(s.forward_flops for s in plan.stages)),
                 _human(sum(s.sae_flops for s in plan.stages)),
                 _memory(max(s.peak_bytes for s in plan.stages)),
                 _human(sum(s.disk_bytes for s in plan.stages), "B"), _duration(plan.total_seconds)])
    return rows


def _table_lines(rows: Sequence[Sequence[str]], rules_after: Sequence[int]) -> list[str]:
    """Rows as aligned text (first column left, the others right), a rule after each row index given."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for i, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))))
        if i in rules_after:
            lines.append("-" * (sum(widths) + 2 * (len(widths) - 1)))
    return lines


def plan_text(plan: Plan) -> list[str]:
    """The plan as lines of text: a header, the table, then warnings and assumptions."""
    rows = [list(PLAN_COLUMNS), *plan_rows(plan)]
    p = plan.params
    lines = [f"plan of {plan.config!r} on {plan.device.name}: VLM {_human(p['vlm'])} parameters "
             f"({_human(p['vision'])} vision), base LM {_human(p['base'])}"]
    lines += _table_lines(rows, rules_after=(0, len(rows) - 2))  # under the header, above the total
    lines += [f"warning: {w}" for w in plan.warnings]
    lines += [f"assumed: {a}" for a in plan.assumptions]
    return lines
