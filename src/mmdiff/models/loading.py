"""Loading HF checkpoints from a local path or a hub id, with errors that say what to do.

Every `from_pretrained` of a model, processor, tokenizer or config in mmdiff goes through
`pretrained_call`, so an uncached hub id in offline mode, a missing directory, or a checkpoint of
another family all fail with one clear `ModelError`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from mmdiff.errors import ModelError

T = TypeVar("T")

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def parse_dtype(dtype: str | torch.dtype) -> str | torch.dtype:
    """ "auto" (the checkpoint's own dtype), a torch dtype, or one of float32/float16/bfloat16."""
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.lower().removeprefix("torch.")]
    raise ModelError(
        f"unknown dtype {dtype!r}: expected 'auto', a torch.dtype, or one of {sorted(set(_DTYPES))}"
    )


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) asks for no network access."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in {"1", "true", "yes", "on"}:
            return True
    return False


def is_local(path_or_id: str | Path) -> bool:
    return Path(path_or_id).expanduser().is_dir()


def looks_like_path(path_or_id: str | Path) -> bool:
    """A string that names a filesystem location rather than an "owner/name" hub id."""
    text = str(path_or_id)
    return (
        isinstance(path_or_id, Path)
        or text.startswith(("/", "./", "../", "~"))
        or text.count("/") > 1
        or os.sep != "/"
        and os.sep in text
    )


def resolve(path_or_id: str | Path, local_files_only: bool | None) -> tuple[str, bool]:
    """(what to pass to from_pretrained, local_files_only) with the offline default applied.

    A path that does not exist fails here, before transformers tries to read it as a hub id.
    """
    if local_files_only is None:
        local_files_only = hub_offline()
    if is_local(path_or_id):
        return str(Path(path_or_id).expanduser()), local_files_only
    if looks_like_path(path_or_id):
        raise ModelError(
            f"model directory {str(path_or_id)!r} does not exist: expected a folder written by "
            "save_pretrained (config.json, weights, processor/tokenizer files), or a hub id "
            "such as 'llava-hf/llava-1.5-7b-hf'"
        )
    return str(path_or_id), local_files_only


def pretrained_call(
    load: Callable[..., T],
    path_or_id: str | Path,
    what: str,
    *,
    local_files_only: bool | None,
    **kwargs: Any,
) -> T:
    """Call `load(path_or_id, local_files_only=..., **kwargs)`; turn load failures into ModelError."""
    target, offline = resolve(path_or_id, local_files_only)
    try:
        return load(target, local_files_only=offline, **kwargs)
    except OSError as exc:
        if not is_local(target):
            if offline:
                raise ModelError(
                    f"cannot load the {what} {target!r}: it is not a local directory and not in the "
                    "Hugging Face cache, and loading is offline (HF_HUB_OFFLINE=1 or "
                    "local_files_only=True). Either download it where there is network "
                    f"(`hf download {target}`) and point HF_HOME at that cache, or pass the path "
                    "of a local save_pretrained directory."
                ) from exc
            raise ModelError(
                f"cannot load the {what} {target!r} from the Hugging Face hub: {exc}. Check the "
                "id and your network, or pass the path of a local save_pretrained directory."
            ) from exc
        raise ModelError(f"cannot load the {what} from {target!r}: {exc}") from exc


def read_config(
    path_or_id: str | Path, *, local_files_only: bool | None = None, trust_remote_code: bool = False
) -> Any:
    """The checkpoint's HF config (AutoConfig), or a ModelError saying why it cannot be read."""
    from transformers import AutoConfig

    return pretrained_call(
        AutoConfig.from_pretrained,
        path_or_id,
        "config",
        local_files_only=local_files_only,
        trust_remote_code=trust_remote_code,
    )


def load_model(
    model_class: Any,
    path_or_id: str | Path,
    *,
    dtype: str | torch.dtype,
    device: str | torch.device,
    local_files_only: bool | None,
    trust_remote_code: bool,
    what: str = "model",
) -> Any:
    """`model_class.from_pretrained` in eval mode on `device`.

    transformers 5 reads safetensors, and falls back to torch.load(weights_only=True) for .bin files.
    """
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ModelError(
            f"unknown device {device!r}: expected 'cpu', 'cuda', 'cuda:0', 'mps', ..."
        ) from exc
    # with accelerate (not a core dependency), weights go straight to the device
    placement = {"device_map": str(target)} if accelerate_available() else {}
    model = pretrained_call(
        model_class.from_pretrained,
        path_or_id,
        what,
        local_files_only=local_files_only,
        dtype=parse_dtype(dtype),
        trust_remote_code=trust_remote_code,
        **placement,
    )
    return model.to(target).eval()


def accelerate_available() -> bool:
    """Whether transformers can place weights with device_map (it needs accelerate for that)."""
    from transformers.utils import is_accelerate_available

    return bool(is_accelerate_available())


def load_tokenizer(
    path_or_id: str | Path,
    *,
    local_files_only: bool | None,
    trust_remote_code: bool,
    what: str = "tokenizer",
) -> Any:
    """AutoTokenizer, padding on the left so the last position is the next-token position."""
    from transformers import AutoTokenizer

    tokenizer = pretrained_call(
        AutoTokenizer.from_pretrained,
        path_or_id,
        what,
        local_files_only=local_files_only,
        trust_remote_code=trust_remote_code,
    )
    return prepare_tokenizer(tokenizer)


def load_processor(
    path_or_id: str | Path, *, local_files_only: bool | None, trust_remote_code: bool
) -> Any:
    """AutoProcessor with its tokenizer padding on the left."""
    from transformers import AutoProcessor

    processor = pretrained_call(
        AutoProcessor.from_pretrained,
        path_or_id,
        "processor",
        local_files_only=local_files_only,
        trust_remote_code=trust_remote_code,
    )
    prepare_tokenizer(processor.tokenizer)
    return processor


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Left padding, and a pad token (EOS) for tokenizers that have none (Llama, Qwen base LMs)."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(
                f"tokenizer {type(tokenizer).__name__} has neither a pad nor an EOS token, so batches "
                "cannot be padded: give it a pad_token"
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
