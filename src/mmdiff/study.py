"""The study's stages, in order, wired to the library's functions.

Each stage function is thin: it reads the config section and upstream files, calls the library,
and writes its outputs into the run directory. The work itself lives in the modules it calls, so
every stage is also usable alone from Python.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from mmdiff.config import ORGANISM, DatasetSpec, StudyConfig
from mmdiff.data.records import Record
from mmdiff.errors import ConfigError
from mmdiff.pipeline import Stage, StageContext


# ----------------------------------------------------------------------------- shared resources
def resolve_model_paths(cfg: StudyConfig) -> tuple[str, str | None]:
    """The VLM and base-LM locations, with 'organism' replaced by the shipped checkpoint."""
    vlm, base = cfg.model.vlm, cfg.model.base_lm
    if ORGANISM in (vlm, base):
        from mmdiff.organism import checkpoint_path

        root = checkpoint_path()
        vlm = str(root / "vlm") if vlm == ORGANISM else vlm
        base = str(root / "base_lm") if base == ORGANISM else base
    return vlm, base


def get_adapter(ctx: StageContext):  # -> VLMAdapter
    """Load the model pair once per run and share it between stages."""
    if "adapter" not in ctx.cache:
        from mmdiff.models import load_adapter

        vlm, base = resolve_model_paths(ctx.config)
        m = ctx.config.model
        ctx.cache["adapter"] = load_adapter(
            vlm, base_lm=base, family=m.family, dtype=m.dtype, device=m.device,
            local_files_only=m.local_files_only, trust_remote_code=m.trust_remote_code,
        )
    return ctx.cache["adapter"]


def load_records(spec: DatasetSpec) -> list[Record]:
    """Records of one configured dataset, filtered by task tags and subsampled (seeded)."""
    if spec.kind == "shapes":
        from mmdiff.data.shapes import shapes_records

        records = list(shapes_records(**spec.args))
    else:
        from mmdiff.data.loaders import load_dataset

        records = list(load_dataset(spec.kind, **spec.args))
    if spec.tasks is not None:
        wanted = set(spec.tasks)
        records = [r for r in records if wanted.intersection(r.tasks)]
    if spec.limit is not None and len(records) > spec.limit:
        rng = random.Random(spec.seed)
        keep = sorted(rng.sample(range(len(records)), spec.limit))
        records = [records[i] for i in keep]
    return records


def get_records(ctx: StageContext, name: str) -> list[Record]:
    key = f"records:{name}"
    if key not in ctx.cache:
        if name not in ctx.config.datasets:
            raise ConfigError(f"dataset {name!r} is not defined in the config's `datasets` section")
        ctx.cache[key] = load_records(ctx.config.datasets[name])
    return ctx.cache[key]


# ----------------------------------------------------------------------------- stages
def stage_capture(ctx: StageContext) -> dict[str, Any]:
    """Capture the residual stream at the configured layers into activation stores."""
    from mmdiff.capture import iter_activations
    from mmdiff.store import ActivationStoreWriter

    adapter = get_adapter(ctx)
    c = ctx.config.capture
    summary: dict[str, Any] = {}
    for ds in c.datasets:
        records = get_records(ctx, ds)
        for side in c.sides:
            out = ctx.run_dir / "activations" / ds / side
            writer = ActivationStoreWriter(
                out, layers=ctx.config.layers, d_model=adapter.backbone(side).d_model,
                dtype=c.dtype, shard_tokens=c.shard_tokens,
            )
            with writer:
                todo = [r for r in records if not writer.has_record(r.id)]
                for batch in iter_activations(adapter, todo, ctx.config.layers, side=side,
                                              batch_size=c.batch_size, progress=ctx.progress):
                    writer.add(batch)
            summary[f"{ds}/{side}"] = {"records": len(records), "tokens": writer.num_tokens}
    return summary


def study_stages(cfg: StudyConfig) -> list[Stage]:
    """The stages of a study, in the order they run."""
    capture_outputs = [f"activations/{ds}/{side}" for ds in cfg.capture.datasets for side in cfg.capture.sides]
    return [
        Stage("capture", stage_capture, outputs=capture_outputs, config_key="capture",
              describe="residual-stream activations of the VLM and the base LM"),
    ]


def check_config(cfg: StudyConfig) -> list[str]:
    """Problems with the files and names a config refers to, found without loading weights."""
    problems: list[str] = []
    for key in cfg.capture.datasets:
        if key not in cfg.datasets:
            problems.append(f"capture.datasets names {key!r}, which is not in `datasets`")
    for role, loc in (("model.vlm", cfg.model.vlm), ("model.base_lm", cfg.model.base_lm)):
        if loc is None or loc == ORGANISM:
            continue
        p = Path(loc)
        if p.exists():
            if not (p / "config.json").is_file():
                problems.append(f"{role}: {p} has no config.json; is it a Hugging Face model folder?")
        elif loc.startswith((".", "/", "~")) or loc.count("/") != 1:
            problems.append(f"{role}: {loc} is neither an existing folder nor a hub id (owner/name)")
    return problems
