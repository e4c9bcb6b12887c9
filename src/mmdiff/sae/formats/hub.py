"""Hub ids -> local folders through huggingface_hub, with a clear error when offline."""

from __future__ import annotations

import re
from pathlib import Path

from mmdiff.errors import SAEError

_HUB_ID = re.compile(r"^(?:hf://)?([A-Za-z0-9][\w.-]*)/([\w.-]+)(?:/(.+))?$")


def resolve_path(path: str | Path) -> Path:
    """A local path as is; "owner/repo[/sub/folder]" or "hf://..." downloaded (or from the cache)."""
    p = Path(path).expanduser()
    if p.exists():
        return p
    s = str(path)
    m = _HUB_ID.match(s)
    if m is None or s.startswith(("/", ".", "~")):
        raise SAEError(f"SAE path {s} does not exist, and is not a hub id like "
                       "'owner/repo' or 'owner/repo/sub/folder'.")
    repo_id, sub = f"{m.group(1)}/{m.group(2)}", m.group(3)
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise SAEError(f"{s} is not a local path and huggingface_hub is not installed: "
                       "pip install huggingface-hub, or pass a local folder.") from None
    patterns = [f"{sub.rstrip('/')}/*", f"{sub.rstrip('/')}/**"] if sub else None
    errors = []
    for local_only in (False, True):
        try:
            root = Path(snapshot_download(repo_id, allow_patterns=patterns,
                                          local_files_only=local_only))
            target = root / sub if sub else root
            if target.exists():
                return target
            errors.append(f"{target} not in the snapshot")
        except Exception as e:  # noqa: BLE001 -- network, auth, missing repo: same advice
            errors.append(f"{type(e).__name__}: {e}")
    raise SAEError(
        f"SAE path {s!r} does not exist locally, and as a Hugging Face hub id it is not cached and "
        f"the hub cannot be reached ({errors[-1]}). Check the local path, or download it on a "
        f"machine with network access (huggingface-cli download {repo_id}) and pass the folder."
    )
