"""Tensor names, dtypes and shapes from a weights file's header, without reading its data:
safetensors (8-byte length + JSON header, checked against the file size so that a truncated
download is caught) and the .npy headers inside .npz archives."""

from __future__ import annotations

import json
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path

from mmdiff.errors import MMDiffError

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
