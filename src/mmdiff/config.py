"""The study config: one YAML file, validated by pydantic, resolved and saved in the run directory.

With no config file, `default_config()` describes the organism study. Every section is a model with
`extra="forbid"`, so a misspelt key is an error that names it, not a silently ignored setting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mmdiff.errors import ConfigError

ORGANISM = "organism"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


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


class StudyConfig(Section):
    """A whole study: the model pair, the data, the layers and each stage's parameters."""

    name: str = Field("organism", description="Run directory name under runs/.")
    seed: int = 0
    model: ModelSpec = Field(default_factory=ModelSpec)
    layers: list[int] = Field(default_factory=lambda: [0, 1, 2, 3], description="Hook points (residual after layer L).")
    datasets: dict[str, DatasetSpec] = Field(default_factory=dict)
    capture: CaptureSpec = Field(default_factory=CaptureSpec)

    @field_validator("layers")
    @classmethod
    def _layers_sorted_unique(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("at least one layer is needed")
        if any(layer < 0 for layer in v):
            raise ValueError(f"layers must be >= 0, got {v}")
        return sorted(set(v))

    def hash_scope(self) -> dict[str, Any]:
        """What every stage depends on: the model pair, layers, seed and the datasets."""
        return {
            "model": self.model.model_dump(mode="json", exclude={"device"}),
            "layers": self.layers,
            "seed": self.seed,
            "datasets": {k: v.model_dump(mode="json") for k, v in self.datasets.items()},
        }


def default_config() -> StudyConfig:
    """The organism study: what `mmdiff run` does with no config file."""
    return StudyConfig(
        name="organism",
        model=ModelSpec(),
        datasets={
            "train": DatasetSpec(kind="shapes", args={"split": "train"}, limit=256),
            "test": DatasetSpec(kind="shapes", args={"split": "test"}, limit=256),
        },
    )


def _format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (misspelt? see `mmdiff config --help` or the example configs)"
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def load_config(path: str | Path | None) -> StudyConfig:
    """Read and validate a YAML study config; None gives the organism study."""
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
    try:
        return StudyConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, str(path))) from None


def dump_config(config: StudyConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
