"""Hub ids looked up in the local Hugging Face cache only: the dry run downloads nothing."""

from __future__ import annotations

from pathlib import Path


def cached_file(repo_id: str, filename: str) -> Path | None:
    """The local copy of `filename` of hub repo `repo_id` in the Hugging Face cache, or None."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        hit = try_to_load_from_cache(repo_id, filename)
    except Exception:  # noqa: BLE001 - an id huggingface_hub rejects is simply not cached
        return None
    return Path(hit) if isinstance(hit, str) else None


def hub_cache_dir() -> str:
    try:
        from huggingface_hub.constants import HF_HUB_CACHE

        return str(HF_HUB_CACHE)
    except ImportError:
        return "the Hugging Face cache"


def not_cached(where: str, hub_id: str) -> str:
    return (
        f"{where}: {hub_id} is a hub id that is not cached in {hub_cache_dir()}, and loading is "
        "offline (HF_HUB_OFFLINE=1 or model.local_files_only): not cached; set MMDIFF_MODELS to a "
        f"folder holding a local copy and name it in the config, or go online (`hf download {hub_id}`)"
    )
