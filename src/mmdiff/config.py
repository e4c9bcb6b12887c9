"""The study config: one YAML file, validated by pydantic, resolved and saved in the run directory.

With no config file, `default_config()` describes the organism study. Every section is a model with
`extra="forbid"`, so a misspelt key is an error that names it, not a silently ignored setting.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import os
import re
import textwrap
import typing
from pathlib import Path
from typing import Any, Iterable, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from mmdiff.errors import ConfigError
from mmdiff.interp.client import LLMConfig
from mmdiff.sae.train_config import TrainConfig

ORGANISM = "organism"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def attribute_docstrings(cls: type) -> dict[str, str]:
    """The docstring written under each field of a class (the sparsify / simple_parsing habit),
    joined into one line per field."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for field, doc in zip(body, body[1:]):
        if (
            isinstance(field, ast.AnnAssign)
            and isinstance(field.target, ast.Name)
            and isinstance(doc, ast.Expr)
            and isinstance(doc.value, ast.Constant)
            and isinstance(doc.value.value, str)
        ):
            docs[field.target.id] = " ".join(doc.value.value.split())
    return docs


def dataclass_fields(cls: type, names: Iterable[str]) -> dict[str, Any]:
    """Pydantic fields copied from a settings dataclass: each field's type, default and docstring.

    How a library's settings (declared once, where the library reads them) become keys of a config
    section without a second declaration that could drift.
    """
    hints, docs = typing.get_type_hints(cls), attribute_docstrings(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out: dict[str, Any] = {}
    for name in names:
        f = fields[name]
        if f.default is not dataclasses.MISSING:
            info = Field(f.default, description=docs.get(name))
        elif f.default_factory is not dataclasses.MISSING:
            info = Field(default_factory=f.default_factory, description=docs.get(name))
        else:
            info = Field(description=docs.get(name))
        out[name] = (hints[name], info)
    return out


class ModelSpec(Section):
    """Which VLM and which base LM to diff."""

    vlm: str = Field(ORGANISM, description="Local path or hub id of the VLM; 'organism' = the bundled one.")
    base_lm: str | None = Field(ORGANISM, description="Local path or hub id of the base LM it came from.")
    family: str | None = Field(None, description="Adapter family; None = from config.model_type.")
    dtype: str = Field("float32", description="torch dtype name, or 'auto'.")
    device: str = Field("cpu", description="'cpu', 'cuda', 'cuda:1', ...")
    local_files_only: bool | None = Field(None, description="None = follow HF_HUB_OFFLINE.")
    trust_remote_code: bool = Field(False, description="Run a repo's own code; only if you trust it.")


class DatasetSpec(Section):
    """One dataset: a loader kind and the loader's arguments (paths, split, limit, ...)."""

    kind: str = Field(description="Loader name: shapes, vqav2, vsr, textvqa, ocrbench, mm_safetybench, figstep, easy_vqa, jsonl.")
    args: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments of the loader.")
    limit: int | None = Field(None, ge=1, description="Keep at most this many records (seeded subsample).")
    tasks: list[str] | None = Field(None, description="Keep only records carrying one of these task tags.")
    seed: int = 0


class CaptureSpec(Section):
    """Activation capture into the on-disk store."""

    datasets: list[str] = Field(default_factory=lambda: ["train"], description="Dataset names to capture.")
    sides: list[Literal["vlm", "base"]] = Field(default_factory=lambda: ["vlm", "base"])
    batch_size: int = Field(16, ge=1)
    dtype: str = Field("float32", description="Storage dtype of the activations.")
    shard_tokens: int = Field(65536, ge=1024, description="Tokens per shard file.")


class _TrainStudy(Section):
    """Multimodal SAEs by warm start (docs/method.md#sae-architectures-and-training): base-LM SAEs, then each masking regime on the VLM.

    The study's own keys are declared here; every other key is a field of the trainer's
    `TrainConfig` (sae/train_config.py), copied with its type, default and description.
    """

    dataset: str = Field("train", description="Dataset the SAEs train on (its captured activations).")
    heldout: str = Field("test", description="Dataset for held-out FVU, L0, dead fraction, spliced-in loss.")
    regimes: list[Literal["full", "image", "text", "random"]] = Field(
        default_factory=lambda: ["full", "image", "text", "random"],
        description="Masking regimes trained on the VLM, each warm-started from the base SAEs.")
    base_saes: str | dict[int, str] | None = Field(None, description=(
        "Pretrained base-LM SAEs: a folder template with {layer}, e.g. '/sae/L{layer}R-8x', or a "
        "{layer: folder} map (Llama Scope, Gemma Scope, SAELens or mmdiff folders, or hub ids). "
        "None = train them on the base LM first."))
    base_total_tokens: int | None = Field(None, ge=1, description="Training tokens of the base-LM SAEs (default: total_tokens).")
    spliced_loss: bool = Field(True, description="Measure the spliced-in next-token loss on the held-out set.")

    @model_validator(mode="after")
    def _valid_for_the_trainer(self) -> "_TrainStudy":
        self.train_config()  # the trainer's own checks (ConfigError -> a validation error)
        return self

    def train_config(self, **study: Any) -> TrainConfig:
        """The trainer's settings: this section's training keys, plus what the study sets (seed,
        regime, total_tokens of the base SAEs, device)."""
        own = {name: getattr(self, name) for name in TRAIN_KEYS}
        try:
            return TrainConfig(**{**own, **study})
        except ConfigError as exc:
            raise ValueError(str(exc).replace("TrainConfig.", "")) from None


# Set per role or by the study, never in the train section: the regime (from `regimes`), the seed
# (the study's `seed`) and the device (where the model runs).
TRAIN_KEYS = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in ("regime", "seed", "device")]

TrainSpec = create_model(
    "TrainSpec", __base__=_TrainStudy, __doc__=_TrainStudy.__doc__, __module__=__name__,
    **dataclass_fields(TrainConfig, TRAIN_KEYS),
)  # fmt: skip


class StatsSpec(Section):
    """One statistics pass per side over the analysis dataset, split by task tags (docs/method.md#task-features)."""

    dataset: str | list[str] = Field("test", description=(
        "Dataset (or datasets, concatenated) whose records are analysed, e.g. [vqav2, vsr, textvqa, figstep]."))
    role: str = Field("text", description="Which adapted SAEs (regime) are diffed against the base SAEs.")
    base_split: str = Field("vqa", description="Task tag of the generic split that task splits are contrasted with.")
    tasks: list[str] = Field(default_factory=lambda: ["spatial", "ocr", "safety"], description="Task tags to detect.")
    neutral_tasks: list[str] = Field(default_factory=lambda: ["spatial"], description=(
        "Tasks whose images are re-run with the neutral instruction for the lexical filter."))
    neutral_instruction: str = Field("Describe the positions of all objects in the image.", description=(
        "The lexical filter's prompt-neutral question (the seed's); use one the model's vocabulary knows."))
    top_k: int = Field(16, ge=1, description="Top activating examples kept per feature.")
    n_chunks: int = Field(32, ge=2, description="Record chunks kept for the bootstrap.")
    batch_size: int = Field(16, ge=1)


class DiffSpec(Section):
    """The two-stage global selection of adapted features."""

    p_gap: float = Field(0.2, gt=0, le=1, description="Keep this top share of all features by variance gap...")
    p_cos: float = Field(0.2, gt=0, le=1, description="...then this bottom share of those by decoder cosine.")
    n_bootstrap: int = Field(100, ge=0, description="Resamples for each selected feature's stability score.")


class DetectSpec(Section):
    """Task features by contrastive firing, then the lexical filter."""

    min_delta_p: float = Field(0.01, ge=0, description="Minimum rise in firing frequency, task vs base.")
    alpha: float = Field(0.05, gt=0, lt=1, description="Benjamini-Hochberg false discovery rate.")
    min_neutral_firing: float = Field(1e-3, ge=0, description="Lexical filter: firing frequency on the neutral re-run.")
    min_image_share: float = Field(0.5, ge=0, le=1, description="Lexical filter: image-token share of activation mass.")
    restrict_to_adapted: bool = Field(True, description="Intersect candidates with the adapted set (the seed's method).")


class AttributionSpec(Section):
    """Attribution patching of task features to attention heads (docs/method.md#attribution-patching)."""

    top_k: int = Field(8, ge=1, description="Each feature's top activating samples averaged over.")
    n_calibration: int = Field(256, ge=1, description="Records whose mean visual embedding is the corrupt run.")
    objective: Literal["projection", "activation"] = Field("projection", description=(
        "Residual projection on the decoder direction summed over positions, or the SAE activation."))
    exact: bool = Field(False, description="Also run exact activation patching (one pass per head) to validate.")
    max_features: int = Field(24, ge=1, description="At most this many task features (strongest first).")
    overlay_heads: int = Field(3, ge=0, description="Attention overlays of this many top and bottom heads.")
    batch_size: int = Field(8, ge=1)


class _LLMSection(Section):
    """An OpenAI-compatible chat endpoint (OpenAI, vLLM, sglang, ollama) for explanations and scoring.

    Every key is a field of `interp/client.py:LLMConfig`; the reply cache lives in the run folder.
    """

    @model_validator(mode="after")
    def _valid_for_the_client(self) -> "_LLMSection":
        self.llm_config()
        return self

    def llm_config(self, cache_dir: Path | None = None) -> LLMConfig:
        """The client's settings: this section's keys and the study's cache folder."""
        try:
            return LLMConfig(**{name: getattr(self, name) for name in LLM_KEYS}, cache_dir=cache_dir)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None


LLM_KEYS = [f.name for f in dataclasses.fields(LLMConfig) if f.name != "cache_dir"]

LLMSpec = create_model(
    "LLMSpec", __base__=_LLMSection, __doc__=_LLMSection.__doc__, __module__=__name__,
    **dataclass_fields(LLMConfig, LLM_KEYS),
)  # fmt: skip


class InterpSpec(Section):
    """Top examples, heatmaps, explanations and feature dashboards (docs/method.md#feature-explanations)."""

    k: int = Field(10, ge=1, description="Top examples per feature and source.")
    heatmaps: bool = Field(True, description="Image-patch heatmaps on the model's grid.")
    max_adapted: int = Field(16, ge=0, description="Besides the task features, the most-changed adapted features.")
    llm: LLMSpec | None = Field(None, description="None = the offline explainer (no network).")
    batch_size: int = Field(8, ge=1)
    grounding: str | list[str] | None = Field(None, description=(
        "Dataset (or datasets, concatenated) of held-out records whose annotations (the organism's scenes and "
        "questions; COCO boxes; OCR tokens) ground every explanation with IoU and detection AUROC "
        "(docs/method.md#grounded-explanations); None = no grounded scores."))
    grounding_records: int = Field(96, ge=1, description="At most this many of its records, evenly spaced.")
    grounding_coco: list[str] | None = Field(None, description=(
        "COCO instances files (annotations/instances_{train,val}{2014,2017}.json): the `grounding` records whose "
        "meta image_id they annotate (VQAv2, VSR) are grounded on their boxes (one concept per category, VSR's two "
        "related objects, the asked relation); None = the organism's scene metadata (unless grounding_ocr is set)."))
    grounding_ocr: list[str] | None = Field(None, description=(
        "TextVQA Rosetta OCR files (TextVQA_Rosetta_OCR_v0.2_{train,val,test}.json): the `grounding` TextVQA / "
        "TextCaps records whose image_id they list get the concept 'text' (the OCR boxes; absent where none was "
        "found), and OCRBench records 'text' without a region (detection only); [] = OCRBench records only."))


class ConceptsSpec(Section):
    """Concept shift vectors (docs/method.md#concept-shift-vectors): base LM on captions vs VLM on images, same records."""

    enabled: bool = Field(True, description="Run the concepts stage.")
    dataset: str = Field("test", description="Records with both an image and a caption.")
    layer: int | None = Field(None, description="Layer of the per-sample vectors; None = the middle configured layer.")
    k: int = Field(20, ge=2, description="Concepts per model.")
    method: Literal["kmeans", "semi_nmf", "dictionary"] = "kmeans"
    alphas: list[float] = Field(default_factory=lambda: [0.0, 0.5, 1.0])
    holdout: float = Field(0.25, ge=0, lt=1, description="Share of records kept out of the fit to test transfer.")
    top_k: int = Field(10, ge=1, description="Grounding tokens and samples per concept.")
    batch_size: int = Field(16, ge=1)


class ControlSpec(Section):
    """Removal and steering of the task sets against controls, with bootstrap CIs (docs/method.md#interventions-and-controls)."""

    test: str = Field("test", description="Dataset every intervention is evaluated on.")
    validation: str | None = Field("validation", description=(
        "Dataset on which steering alphas and the single-layer baseline's layer are chosen; None = no steering."))
    tasks: list[str] | None = Field(None, description="Task sets to remove/steer; None = stats.tasks.")
    positions: Literal["text", "image", "all"] = Field("text", description="Where features are ablated.")
    n_random: int = Field(3, ge=1, description="Random control draws matched in layer and firing frequency.")
    n_bins: int = Field(10, ge=1, description="Firing-frequency bins for the matched random controls.")
    alphas: list[float] = Field(default_factory=lambda: [-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0],
                                description="Feature-steering strengths (times each feature's typical activation).")
    steer_positions: Literal["text", "image", "all"] = Field("all")
    n_boot: int = Field(2000, ge=100, description="Bootstrap resamples per confidence interval.")
    batch_size: int = Field(16, ge=1)
    general_task: str | None = Field("vqa", description=(
        "The evaluation task that stands for general VQA in the removal analyses (set variants, single "
        "features, dose-response, pipeline ablation); None = none."))
    benign_task: str | None = Field("existence", description=(
        "A task no task set is about, scored as the benign control of the set variants and single features; "
        "None = none."))
    variant_positions: list[Literal["text", "image", "all"]] = Field(default_factory=lambda: ["text", "all"], description=(
        "Each task set in full and its own features (minus the other sets) removed at each of these "
        "position kinds, side by side (eval/set_variants.parquet); [] = not run."))
    analysis_positions: Literal["text", "image", "all"] | None = Field(None, description=(
        "Where single features, dose steps and pipeline-stage sets are removed; None = `positions`."))
    single_top: int = Field(5, ge=0, description=(
        "The top features of each task set by delta_p, each removed alone (eval/single_features.parquet); "
        "0 = not run."))
    categories: dict[str, str] = Field(default_factory=lambda: {"spatial": "relation", "ocr": "type", "safety": "category"},
                                       description=(
        "{task: the record meta key of its categories}: each single feature is also scored on its task's "
        "records of its own category (the commonest among its top activating records)."))
    dose_response: bool = Field(True, description=(
        "Remove the top 1, 2, 4, ... features of each set (and the whole set) against random sets of the "
        "same size (eval/dose_response.parquet)."))
    dose_max: int | None = Field(None, ge=1, description="The dose-response's largest step; None = the whole set.")
    pipeline_ablation: bool = Field(True, description=(
        "Remove the features each step of the selection pipeline keeps (contrastive firing only, + visual "
        "responsiveness, + lexical filter, + adapted filter) and random ones (eval/pipeline_ablation.parquet)."))
    analysis_records: int | None = Field(None, ge=2, description=(
        "Score the analyses on n evenly spaced records of each task (general VQA has one task per family); "
        "None = all of them."))


class StudyConfig(Section):
    """A whole study: the model pair, the data, the layers and each stage's parameters."""

    name: str = Field("organism", description="Run directory name under runs/.")
    seed: int = 0
    model: ModelSpec = Field(default_factory=ModelSpec)
    layers: list[int] = Field(default_factory=lambda: [0, 1, 2, 3], description="Hook points (residual after layer L).")
    datasets: dict[str, DatasetSpec] = Field(default_factory=dict)
    capture: CaptureSpec = Field(default_factory=CaptureSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    stats: StatsSpec = Field(default_factory=StatsSpec)
    diff: DiffSpec = Field(default_factory=DiffSpec)
    detect: DetectSpec = Field(default_factory=DetectSpec)
    attribution: AttributionSpec = Field(default_factory=AttributionSpec)
    interp: InterpSpec = Field(default_factory=InterpSpec)
    control: ControlSpec = Field(default_factory=ControlSpec)
    concepts: ConceptsSpec = Field(default_factory=ConceptsSpec)

    @field_validator("layers")
    @classmethod
    def _layers_sorted_unique(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("at least one layer is needed")
        if any(layer < 0 for layer in v):
            raise ValueError(f"layers must be >= 0, got {v}")
        return sorted(set(v))

    def hash_scope(self, datasets: Iterable[str] = ()) -> dict[str, Any]:
        """What a stage depends on besides its own section: the model pair, layers, seed and the
        datasets it reads (the device is left out, so a run moved from CPU to GPU keeps its results)."""
        return {
            "model": self.model.model_dump(mode="json", exclude={"device"}),
            "layers": self.layers,
            "seed": self.seed,
            "datasets": {k: self.datasets[k].model_dump(mode="json") for k in sorted(set(datasets)) if k in self.datasets},
        }


# The organism's question families that come with an image (the text-only ones feed the base LM).
# Spatial is the grounding pair ("is the red circle at the left ?", "where is the red circle ?"):
# the seed's D_sp holds absolute-position questions, and the VLM answers them well above their
# constant-answer floors (build 15, 500 test records: 0.75 and 0.44, floors 0.54 and 0.13), while
# the relations between two objects stay at chance in every build, where a removal could show no
# loss (organism README).
ORGANISM_FAMILIES = ["colour", "shape", "count", "existence", "grounding_yesno", "grounding_open", "ocr",
                     "safety", "instruction", "describe"]


# The families the control stages evaluate (control.study_eval_tasks: safety, ocr, spatial yes/no and
# open, existence, and colour / shape / count as general VQA); the text-only ones form no task.
ORGANISM_EVAL_FAMILIES = ["colour", "shape", "count", "existence", "grounding_yesno", "grounding_open", "ocr",
                          "safety"]
# Records per family of the control evaluation: 200 per task puts the smallest detectable change of a
# 0/1 score at 0.038 (evals.power.binary_mde_floor; 0.197 at the former 32) and 95% intervals of a
# clean score near 0.5 at about +-0.07 instead of +-0.17.
ORGANISM_EVAL_RECORDS = 200
# Its records start at index 1000 of each test family, so none is among the "test" records the
# statistics, and so the task features, were computed on (indices 0-31): the effects are out of sample.
ORGANISM_EVAL_START = 1000


def default_config() -> StudyConfig:
    """The organism study: what `mmdiff run` does with no config file.

    Sized to finish in minutes on a 2-core laptop CPU: 4 layers of a 128-wide model, 1,024-latent
    SAEs, a few hundred records per split of the procedural shapes world; the control stages
    evaluate on their own 200 records per task ("eval", drawn from the test split), in batches of
    128 (generation on this model costs per step, not per record). The removals act at all positions:
    the task features fire mostly on image tokens (the lexical filter keeps those; build 15's spatial
    set holds 2.7% of its activation mass on text tokens), so a removal at text positions alone could
    not test them. The analyses take the top 3 single features and score 200 records per task
    (general VQA's 600 evenly thinned).
    """

    def shapes(split: str, n: int) -> DatasetSpec:
        return DatasetSpec(kind="shapes", args={"split": split, "n_per_family": n, "families": ORGANISM_FAMILIES})

    return StudyConfig(
        name="organism",
        model=ModelSpec(),
        layers=[0, 1, 2, 3],
        datasets={"train": shapes("train", 48), "test": shapes("test", 32), "validation": shapes("validation", 16),
                  "eval": DatasetSpec(kind="shapes", args={"split": "test", "n_per_family": ORGANISM_EVAL_RECORDS,
                                                           "families": ORGANISM_EVAL_FAMILIES,
                                                           "start": ORGANISM_EVAL_START})},
        capture=CaptureSpec(datasets=["train"], batch_size=32),
        train=TrainSpec(k=16, expansion_factor=8, batch_size=512, total_tokens=120_000,
                        dead_tokens_threshold=20_000, checkpoint_every=50),
        stats=StatsSpec(neutral_instruction="describe the image .", batch_size=32),
        attribution=AttributionSpec(top_k=4, n_calibration=64, exact=True, max_features=12),
        interp=InterpSpec(k=6, max_adapted=8, grounding="validation"),
        control=ControlSpec(test="eval", n_random=3, alphas=[-2.0, -1.0, 0.0, 1.0, 2.0], batch_size=128,
                            positions="all", single_top=3, analysis_records=200,
                            categories={"spatial": "relation", "safety": "noun"}),
        concepts=ConceptsSpec(k=10),
    )


def _sections_in(annotation: Any) -> tuple[type[Section] | None, bool]:
    """(the config section inside a field's type, whether it sits in a dict keyed by name)."""
    if isinstance(annotation, type) and issubclass(annotation, Section):
        return annotation, False
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is dict and args:
        return _sections_in(args[-1])[0], True
    for arg in args:  # X | None
        found, keyed = _sections_in(arg)
        if found is not None:
            return found, keyed
    return None, False


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, type):
        return annotation.__name__
    return re.sub(r"\b(typing|pathlib|mmdiff\.config)\.", "", str(annotation))


def config_keys(section: type[BaseModel] | None = None, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """Every key of the study config (or of one section): (key, type, default, description).

    Keys inside a section are dotted (`train.k`); a section keyed by a name the user chooses is
    written `datasets.<name>.kind`. The default is the section's own, not the organism study's.
    """
    rows = []
    for name, field in (section or StudyConfig).model_fields.items():
        key = prefix + name
        inner, keyed = _sections_in(field.annotation)
        if field.is_required():
            default = "required"
        else:
            value = field.get_default(call_default_factory=True)
            default = "{}" if keyed else ("(section)" if isinstance(value, Section) else repr(value))
        doc = field.description
        if not doc and inner is not None:  # a section: the first line of its docstring
            doc = (inner.__doc__ or "").strip().split("\n")[0]
        rows.append((key, _type_name(field.annotation), default, doc or ""))
        if inner is not None:
            rows += config_keys(inner, f"{key}.<name>." if keyed else f"{key}.")
    return rows


def describe_keys(section: type[BaseModel] | None = None, prefix: str = "") -> str:
    """The config keys as text, one per line with its type and default, then its description:
    what `mmdiff config --keys` prints and what an unknown key's error shows for its section."""
    lines = []
    for key, kind, default, doc in config_keys(section, prefix):
        lines.append(f"{key}: {kind} = {default}")
        if doc:
            lines.append(textwrap.indent(textwrap.fill(doc, 96), "    "))
    return "\n".join(lines)


def _section_at(loc: tuple[Any, ...]) -> tuple[type[BaseModel], str]:
    """The config section a validation error's location points into, and its key prefix."""
    section: type[BaseModel] = StudyConfig
    parts = list(loc[:-1])
    while parts:
        field = section.model_fields.get(str(parts.pop(0)))
        inner, keyed = _sections_in(field.annotation) if field is not None else (None, False)
        if inner is None:
            break
        section = inner
        if keyed and parts:
            parts.pop(0)
    return section, ".".join(str(p) for p in loc[:-1])


def _format_validation_error(exc: ValidationError, source: str) -> str:
    import difflib

    lines = [f"invalid config {source}:"]
    unknown_in: dict[str, type[BaseModel]] = {}
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            section, where = _section_at(tuple(err["loc"]))
            close = difflib.get_close_matches(str(err["loc"][-1]), list(section.model_fields), n=1)
            msg = "unknown key" + (f" (did you mean {close[0]!r}?)" if close else "")
            unknown_in[where] = section
        lines.append(f"  {loc}: {msg}")
    for where, section in unknown_in.items():
        lines.append(f"\nthe keys of {where or 'the top level'} (all keys: `mmdiff config --keys`):")
        lines.append(textwrap.indent(describe_keys(section, f"{where}." if where else ""), "  "))
    return "\n".join(lines)


def _expand(obj: Any) -> Any:
    """Expand ${VAR} and ~ in every string, so configs can name data roots portably."""
    import os

    if isinstance(obj, str):
        return os.path.expanduser(os.path.expandvars(obj))
    if isinstance(obj, dict):
        return {k: _expand(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_expand(v) for v in obj]
    return obj


def load_config(path: str | Path | None) -> StudyConfig:
    """Read and validate a YAML study config; None gives the organism study.

    ${VAR} and ~ in string values are expanded from the environment; an unset variable is an error.
    """
    if path is None:
        return default_config()
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path} is not valid YAML: {exc}") from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path} must be a mapping of sections, found {type(raw).__name__}")
    unset = sorted(set(re.findall(r"\$\{(\w+)\}", path.read_text())) - set(os.environ))
    if unset:
        raise ConfigError(f"config {path} uses environment variables that are not set: {', '.join(unset)}")
    raw = _expand(raw)
    try:
        return StudyConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, str(path))) from None


def dump_config(config: StudyConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
