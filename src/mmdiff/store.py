"""Activation store: residual-stream activations on disk as safetensors shards, streamed back shuffled.

Layout of a store directory:

    manifest.json             layers, d_model, dtype, and the list of finished shards with their
                              record ids, token counts, byte sizes and sha256
    shard_000000.safetensors  per shard: "acts.<L>" [n, d_model] for every layer L,
                              "token_types" [n] int8, "record_index" [n] int32 (index into the
                              shard's record ids), "position" [n] int32 (position of the token among
                              the record's non-padding tokens), and optionally "input_ids" [n] int32

A shard holds whole records only, and it is complete only once its file was renamed into place AND
the manifest lists it. The manifest is rewritten (atomically) after every shard, so a writer killed
at any moment leaves a store whose manifest describes exactly the finished shards; reopening the
writer deletes unlisted files and skips records already stored.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import torch

from mmdiff.activations import ActivationBatch
from mmdiff.atomic import save_safetensors, sha256_file, write_json
from mmdiff.errors import StoreError

FORMAT = "mmdiff-activation-store"
VERSION = 1
MANIFEST = "manifest.json"
_SHARD_RE = re.compile(r"^shard_(\d{6})\.safetensors$")
_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}
_SAFETENSORS_DTYPES = {
    "float16": "F16",
    "bfloat16": "BF16",
    "float32": "F32",
    "int8": "I8",
    "int32": "I32",
}


def _dtype_name(dtype: str | torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise StoreError(f"activation store dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    return name


def _shard_name(index: int) -> str:
    return f"shard_{index:06d}.safetensors"


def _read_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise StoreError(
            f"activation store manifest {path} is not valid JSON ({exc}); the store is corrupt: "
            "delete the directory and capture again"
        ) from exc
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise StoreError(
            f"{path} is not an {FORMAT} v{VERSION} manifest (format={manifest.get('format')!r}, "
            f"version={manifest.get('version')!r})"
        )
    return manifest


def _check_shard(
    root: Path,
    entry: dict[str, Any],
    layers: list[int],
    d_model: int,
    dtype: str,
    verify: Literal["header", "hash"],
    input_ids: bool = False,
) -> None:
    """Raise StoreError unless the shard file matches its manifest entry (size, header, optionally hash)."""
    from safetensors import safe_open

    path = root / entry["file"]
    fix = "delete it and resume the capture (the writer re-captures the records it held)"
    if not path.is_file():
        raise StoreError(f"activation shard {path} is listed in the manifest but missing: {fix}")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise StoreError(
            f"activation shard {path} has {size} bytes, the manifest says {entry['bytes']}: the file "
            f"is truncated or corrupt; {fix}"
        )
    n = entry["n_tokens"]
    expected = {f"acts.{L}": ([n, d_model], dtype) for L in layers}
    expected |= {
        "token_types": ([n], "int8"),
        "record_index": ([n], "int32"),
        "position": ([n], "int32"),
    }
    if input_ids:
        expected["input_ids"] = ([n], "int32")
    try:
        with safe_open(str(path), framework="pt") as fh:
            for key, (shape, dt) in expected.items():
                sl = fh.get_slice(key)
                got_shape, got_dt = list(sl.get_shape()), sl.get_dtype()
                want_dt = _SAFETENSORS_DTYPES[dt]
                if got_shape != shape or got_dt != want_dt:
                    raise StoreError(
                        f"activation shard {path}: tensor {key!r} is {got_dt}{got_shape}, expected "
                        f"{want_dt}{shape}; {fix}"
                    )
    except StoreError:
        raise
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise StoreError(f"activation shard {path} cannot be read ({exc}); {fix}") from exc
    if verify == "hash" and sha256_file(path) != entry["sha256"]:
        raise StoreError(
            f"activation shard {path} does not match its sha256 in the manifest; {fix}"
        )


class ActivationStoreWriter:
    """Append `ActivationBatch`es to a store; reopening a partly written store resumes it.

    Only non-padding tokens are kept. Records whose id is already stored are skipped, so a killed
    capture is resumed by re-running it over the same records with a new writer.
    """

    def __init__(
        self,
        root: str | Path,
        layers: Sequence[int],
        d_model: int,
        *,
        dtype: str | torch.dtype = "float16",
        shard_tokens: int = 1 << 14,
        input_ids: bool = False,
        meta: dict[str, Any] | None = None,
    ) -> None:
        if not layers:
            raise StoreError("an activation store needs at least one layer, got none")
        if shard_tokens < 1:
            raise StoreError(f"shard_tokens must be a positive token count, got {shard_tokens}")
        self.root = Path(root)
        self.layers = sorted({int(L) for L in layers})
        self.d_model = int(d_model)
        self.dtype = _dtype_name(dtype)
        self.shard_tokens = int(shard_tokens)
        self.input_ids = bool(input_ids)
        self.root.mkdir(parents=True, exist_ok=True)
        if (self.root / MANIFEST).exists():
            self._manifest = self._resume(meta)
        else:
            self._manifest = {
                "format": FORMAT,
                "version": VERSION,
                "layers": self.layers,
                "d_model": self.d_model,
                "dtype": self.dtype,
                "shard_tokens": self.shard_tokens,
                "input_ids": self.input_ids,
                "complete": False,
                "meta": meta or {},
                "shards": [],
            }
            self._clean_unlisted()
            self._write_manifest()
        self._done: set[str] = {rid for s in self._manifest["shards"] for rid in s["record_ids"]}
        self._next_index = 1 + max(
            (int(_SHARD_RE.match(s["file"]).group(1)) for s in self._manifest["shards"]), default=-1
        )
        self._buffer: list[dict[str, torch.Tensor]] = []  # one dict per record
        self._buffer_ids: list[str] = []
        self._buffer_tokens = 0

    # -- resume -------------------------------------------------------------------------------

    def _resume(self, meta: dict[str, Any] | None) -> dict[str, Any]:
        manifest = _read_manifest(self.root)
        if manifest["layers"] != self.layers or manifest["d_model"] != self.d_model:
            raise StoreError(
                f"activation store {self.root} holds layers {manifest['layers']} with d_model="
                f"{manifest['d_model']}, this capture writes layers {self.layers} with d_model="
                f"{self.d_model}: use another directory, or delete this one to start over"
            )
        if bool(manifest.get("input_ids")) != self.input_ids:
            raise StoreError(
                f"activation store {self.root} was written with input_ids={bool(manifest.get('input_ids'))}, "
                f"this capture asks for input_ids={self.input_ids}: use the same setting or another directory"
            )
        if manifest["dtype"] != self.dtype:
            raise StoreError(
                f"activation store {self.root} is {manifest['dtype']}, this capture writes {self.dtype}: "
                "use the store's dtype, another directory, or delete this one"
            )
        kept = []
        for entry in manifest["shards"]:
            if not (self.root / entry["file"]).exists():
                continue  # deleted by the user after a corruption error: its records are re-captured
            _check_shard(
                self.root,
                entry,
                self.layers,
                self.d_model,
                self.dtype,
                verify="header",
                input_ids=self.input_ids,
            )
            kept.append(entry)
        manifest["shards"] = kept
        manifest["complete"] = False
        if meta:
            manifest["meta"] = {**manifest.get("meta", {}), **meta}
        self._manifest = manifest
        self._clean_unlisted()
        self._write_manifest()
        return manifest

    def _write_manifest(self) -> None:
        # compact JSON: the manifest is rewritten after every shard and lists every record id
        write_json(self.root / MANIFEST, self._manifest, indent=None)

    def _clean_unlisted(self) -> None:
        """Delete shard files the manifest does not list and temp files of a killed writer."""
        listed = {s["file"] for s in self._manifest["shards"]}
        for path in self.root.iterdir():
            orphan_shard = _SHARD_RE.match(path.name) and path.name not in listed
            temp = path.name.startswith(".") and path.name.endswith(".tmp")
            if (orphan_shard or temp) and path.is_file():
                path.unlink()

    # -- writing ------------------------------------------------------------------------------

    def has_record(self, record_id: str) -> bool:
        """Whether a record is already stored (in a finished shard or in the pending buffer)."""
        return str(record_id) in self._done or str(record_id) in self._buffer_ids

    @property
    def num_shards(self) -> int:
        return len(self._manifest["shards"])

    @property
    def num_tokens(self) -> int:
        """Tokens written so far: finished shards plus the buffer the next flush writes."""
        return sum(s["n_tokens"] for s in self._manifest["shards"]) + self._buffer_tokens

    def add(self, batch: ActivationBatch) -> int:
        """Buffer a batch's non-padding tokens, writing shards as they fill; returns tokens added."""
        missing = [L for L in self.layers if L not in batch.acts]
        if missing:
            raise StoreError(
                f"batch lacks layers {missing}; the store records layers {self.layers}: capture those "
                "hook points or open the store with the layers you capture"
            )
        B, T = batch.attention_mask.shape
        for L in self.layers:
            shape = tuple(batch.acts[L].shape)
            if shape != (B, T, self.d_model):
                raise StoreError(
                    f"layer {L} activations have shape {list(shape)}, expected [batch={B}, seq={T}, "
                    f"d_model={self.d_model}]: is this batch from another model?"
                )
        if self.input_ids and (batch.input_ids is None or tuple(batch.input_ids.shape) != (B, T)):
            raise StoreError(
                f"this store keeps input_ids, the batch has {None if batch.input_ids is None else list(batch.input_ids.shape)}"
                f" instead of [{B}, {T}]: capture with input_ids or open the writer with input_ids=False"
            )
        if tuple(batch.token_types.shape) != (B, T) or len(batch.record_ids) != B:
            raise StoreError(
                f"batch token_types {list(batch.token_types.shape)} / {len(batch.record_ids)} record ids "
                f"do not match attention_mask [{B}, {T}]"
            )
        # Select the new records first, then gather and cast each layer once for all of them.
        rows, ids, seen = [], [], set(self._buffer_ids) | self._done
        for b, rid in enumerate(batch.record_ids):
            rid = str(rid)
            if rid not in seen:
                rows.append(b)
                ids.append(rid)
                seen.add(rid)
        if not rows:
            return 0
        index = torch.tensor(rows)
        mask = batch.attention_mask.detach().cpu().bool()[index]  # [r, seq]
        lengths = mask.sum(1).tolist()  # tokens per selected record
        cols = {}
        for L in self.layers:
            x = batch.acts[L].detach()
            cols[f"acts.{L}"] = self._cast(
                x[index.to(x.device)][mask.to(x.device)], L
            )  # [n, d_model]
        cols["token_types"] = batch.token_types.detach().cpu()[index][mask].to(torch.int8)  # [n]
        cols["position"] = torch.cat([torch.arange(n, dtype=torch.int32) for n in lengths])  # [n]
        if self.input_ids:
            cols["input_ids"] = batch.input_ids.detach().cpu()[index][mask].to(torch.int32)  # [n]
        parts = {k: torch.split(v, lengths) for k, v in cols.items()}
        for j, rid in enumerate(ids):
            self._buffer.append({k: v[j] for k, v in parts.items()})
            self._buffer_ids.append(rid)
            self._buffer_tokens += lengths[j]
            if self._buffer_tokens >= self.shard_tokens:
                self.flush()
        return sum(lengths)

    append = add  # the name the capture stage uses

    def _cast(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """x [n, d_model] to the store dtype on CPU; float16 overflow is an error, not a silent inf."""
        if self.dtype == "float16" and x.numel():
            peak = x.abs().amax().item()
            if math.isfinite(peak) and peak > torch.finfo(torch.float16).max:
                raise StoreError(
                    f"layer {layer}: activations overflow float16 (max |x| = {peak:.4g} > 65504); "
                    "store this model in bfloat16 or float32"
                )
        return x.to(_DTYPES[self.dtype]).cpu()  # cast on the capture device: half the transfer

    def flush(self) -> None:
        """Write the buffered records as one shard and list it in the manifest (no-op when empty)."""
        if not self._buffer_ids:
            return
        tensors = {k: torch.cat([r[k] for r in self._buffer]) for k in self._buffer[0]}
        lengths = torch.tensor([len(r["position"]) for r in self._buffer])
        tensors["record_index"] = torch.repeat_interleave(
            torch.arange(len(self._buffer), dtype=torch.int32), lengths
        )  # [n]
        name = _shard_name(self._next_index)
        path = self.root / name
        save_safetensors(path, tensors)
        types = tensors["token_types"].tolist()
        entry = {
            "file": name,
            "n_tokens": len(types),
            "bytes": path.stat().st_size,
            "sha256": sha256_file(path),
            "token_type_counts": {str(t): types.count(t) for t in sorted(set(types))},
            "record_ids": list(self._buffer_ids),
        }
        self._manifest["shards"].append(entry)
        self._write_manifest()  # only now is the shard complete
        self._done.update(self._buffer_ids)
        self._next_index += 1
        self._buffer, self._buffer_ids, self._buffer_tokens = [], [], 0

    def close(self) -> None:
        """Flush the last partial shard and mark the store complete."""
        self.flush()
        self._manifest["complete"] = True
        self._write_manifest()

    def __enter__(self) -> "ActivationStoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # On an error the buffered records are dropped (not marked done): a resume re-captures them.
        if exc_type is None:
            self.close()


@dataclass
class StoreBatch:
    """A batch of stored tokens: acts is one [batch, d_model] tensor, or {layer: tensor} for several."""

    acts: torch.Tensor | dict[int, torch.Tensor]
    token_types: torch.Tensor  # [batch] int8
    record_index: torch.Tensor  # [batch] int64, index into ActivationStore.record_ids
    position: torch.Tensor  # [batch] int32, position among the record's non-padding tokens
    input_ids: torch.Tensor | None = None  # [batch] int32, when the store keeps them


class ActivationStore:
    """Read a store: sizes, and shuffled (or ordered) batches of tokens of chosen layers and types.

    Opening checks every shard listed in the manifest against its file (existence, size, tensor
    names, shapes and dtypes; with verify="hash" also the sha256).
    """

    def __init__(self, root: str | Path, *, verify: Literal["header", "hash"] = "header") -> None:
        self.root = Path(root)
        if not (self.root / MANIFEST).is_file():
            raise StoreError(
                f"no activation store at {self.root}: {MANIFEST} is missing; capture activations first"
            )
        self.manifest = _read_manifest(self.root)
        self.layers: list[int] = list(self.manifest["layers"])
        self.d_model: int = int(self.manifest["d_model"])
        self.dtype: torch.dtype = _DTYPES[self.manifest["dtype"]]
        self.complete: bool = bool(self.manifest["complete"])
        self.has_input_ids: bool = bool(self.manifest.get("input_ids"))
        self.shards: list[dict[str, Any]] = list(self.manifest["shards"])
        for entry in self.shards:
            _check_shard(
                self.root,
                entry,
                self.layers,
                self.d_model,
                self.manifest["dtype"],
                verify,
                input_ids=self.has_input_ids,
            )
        self._record_offsets: list[int] = []
        self.record_ids: list[str] = []
        for entry in self.shards:
            self._record_offsets.append(len(self.record_ids))
            self.record_ids.extend(entry["record_ids"])

    @property
    def num_tokens(self) -> int:
        return sum(s["n_tokens"] for s in self.shards)

    def count_tokens(self, token_types: Sequence[int] | None = None) -> int:
        """Number of stored tokens, optionally of some token types only (from the manifest)."""
        if token_types is None:
            return self.num_tokens
        wanted = {str(int(t)) for t in token_types}
        return sum(n for s in self.shards for t, n in s["token_type_counts"].items() if t in wanted)

    def _layers_arg(self, layers: int | Sequence[int]) -> list[int]:
        wanted = [layers] if isinstance(layers, int) else [int(L) for L in layers]
        bad = [L for L in wanted if L not in self.layers]
        if bad or not wanted:
            raise StoreError(
                f"layers {bad or wanted} are not in the store at {self.root}; it holds {self.layers}"
            )
        return wanted

    def _load_shard(
        self, i: int, layers: list[int], token_types: Sequence[int] | None
    ) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        entry = self.shards[i]
        path = self.root / entry["file"]
        try:
            with safe_open(str(path), framework="pt") as fh:
                out = {k: fh.get_tensor(k) for k in self._meta_keys}
                keep = None
                if token_types is not None:
                    keep = torch.isin(
                        out["token_types"], torch.tensor(list(token_types), dtype=torch.int8)
                    )
                    out = {k: v[keep] for k, v in out.items()}
                for L in layers:
                    x = fh.get_tensor(f"acts.{L}")  # [n, d_model]
                    out[f"acts.{L}"] = x[keep] if keep is not None else x
        except Exception as exc:
            raise StoreError(
                f"activation shard {path} cannot be read ({exc}): delete it and resume the capture"
            ) from exc
        out["record_index"] = out["record_index"].long() + self._record_offsets[i]
        return out

    def iter_batches(
        self,
        layers: int | Sequence[int],
        batch_size: int,
        *,
        token_types: Sequence[int] | None = None,
        shuffle: bool = True,
        buffer_tokens: int = 1 << 17,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        dtype: torch.dtype | None = None,
    ) -> Iterator[StoreBatch]:
        """Batches of [batch_size, d_model] tokens; every selected token appears exactly once.

        With shuffle, shard order is permuted and tokens pass through a shuffle buffer of about
        `buffer_tokens` tokens (filled, permuted, the first half emitted, refilled), so batches mix
        tokens of several shards; the order is a function of `seed` only. With world_size > 1, rank r
        reads shards r, r + world_size, ... of the (shuffled) shard order. `dtype` casts the
        activations (default: as stored).
        """
        wanted = self._layers_arg(layers)
        if batch_size < 1:
            raise StoreError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise StoreError(f"rank must be in [0, world_size={world_size}), got {rank}")
        gen = torch.Generator().manual_seed(int(seed))
        order = (
            torch.randperm(len(self.shards), generator=gen).tolist()
            if shuffle
            else list(range(len(self.shards)))
        )
        order = order[rank::world_size]
        keys = self._meta_keys + [f"acts.{L}" for L in wanted]
        buffer: dict[str, torch.Tensor] | None = None
        fill = max(int(buffer_tokens), batch_size) if shuffle else batch_size

        def emit(buf: dict[str, torch.Tensor], n: int) -> Iterator[StoreBatch]:
            for start in range(0, n, batch_size):
                stop = min(start + batch_size, n)
                if stop - start < batch_size and drop_last:
                    break
                yield self._batch({k: v[start:stop] for k, v in buf.items()}, layers, dtype)

        for i in order:
            part = self._load_shard(i, wanted, token_types)
            buffer = part if buffer is None else {k: torch.cat([buffer[k], part[k]]) for k in keys}
            size = len(buffer["token_types"])
            if size < fill:
                continue
            if shuffle:
                perm = torch.randperm(size, generator=gen)
                buffer = {k: v[perm] for k, v in buffer.items()}
                n_out = (size - fill // 2) // batch_size * batch_size
            else:
                n_out = size // batch_size * batch_size
            yield from emit({k: v[:n_out] for k, v in buffer.items()}, n_out)
            buffer = {k: v[n_out:] for k, v in buffer.items()}
        if buffer is not None and len(buffer["token_types"]):
            if shuffle:
                perm = torch.randperm(len(buffer["token_types"]), generator=gen)
                buffer = {k: v[perm] for k, v in buffer.items()}
            yield from emit(buffer, len(buffer["token_types"]))

    @property
    def _meta_keys(self) -> list[str]:
        return ["token_types", "record_index", "position"] + (
            ["input_ids"] if self.has_input_ids else []
        )

    def _batch(
        self, part: dict[str, torch.Tensor], layers: int | Sequence[int], dtype: torch.dtype | None
    ) -> StoreBatch:
        def get(L: int) -> torch.Tensor:
            x = part[f"acts.{L}"]
            return x if dtype is None else x.to(dtype)

        acts = get(layers) if isinstance(layers, int) else {int(L): get(int(L)) for L in layers}
        return StoreBatch(
            acts, part["token_types"], part["record_index"], part["position"], part.get("input_ids")
        )

    def load_all(self, layer: int, token_types: Sequence[int] | None = None) -> torch.Tensor:
        """Every stored token of one layer in store order, [n_tokens, d_model] (small stores only)."""
        wanted = self._layers_arg(layer)
        parts = [
            self._load_shard(i, wanted, token_types)[f"acts.{layer}"]
            for i in range(len(self.shards))
        ]
        if not parts:
            return torch.empty(0, self.d_model, dtype=self.dtype)
        return torch.cat(parts)

    def num_batches(
        self, batch_size: int, token_types: Sequence[int] | None = None, drop_last: bool = False
    ) -> int:
        n = self.count_tokens(token_types)
        return n // batch_size if drop_last else math.ceil(n / batch_size)
