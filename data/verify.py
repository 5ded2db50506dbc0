"""Open a dataset and check it once, before any sample reaches a model: manifests agree with the shards they
describe, the dataset is not empty, and every token id fits the model's vocabulary.

The largest id comes from a manifest when one describes the shard (its document and token counts and dtype
are cross-checked against the index, so a stale or edited manifest is refused rather than believed). Data
without a manifest (Megatron/GPT-NeoX prefixes) is scanned once, vectorised over the memory-mapped tokens in
chunks; the result is cached beside the index (or in the cache dir when the data folder is read-only), keyed
by both files' sizes and modification times, so a changed file is scanned again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .indexed_dataset import DatasetFormatError, IndexedDataset, bin_path, idx_path
from .manifest import DATASET_MANIFEST, read_manifest, resolve_shards, shard_manifest_path, write_json_atomic

SCAN_CHUNK = 1 << 24  # tokens per vectorised min/max step: bounded memory whatever the shard size
SAMPLE = 1 << 16  # tokens read from each end of a shard to cross-check a manifest's max id


@dataclass
class OpenedDataset:
    spec: str
    prefixes: list[Path]
    manifest: dict | None
    shards: list[IndexedDataset]
    shard_manifests: list[dict | None] = field(default_factory=list)

    @property
    def n_documents(self) -> int:
        return sum(len(s.doc_indices) - 1 for s in self.shards)

    @property
    def n_tokens(self) -> int:
        return sum(s.n_tokens for s in self.shards)

    @property
    def manifest_file(self) -> Path:
        spec = Path(self.spec)
        return spec / DATASET_MANIFEST if spec.is_dir() else shard_manifest_path(spec)


def _check_counts(where: Path, m: dict, n_docs: int, n_tokens: int, dtype: str | None) -> None:
    for key, actual in (("documents", n_docs), ("tokens", n_tokens), ("dtype", dtype)):
        if m.get(key) is not None and actual is not None and m[key] != actual:
            raise DatasetFormatError(f"{where}: records {key} {m[key]}, but the files hold {actual} "
                                     f"(the manifest does not describe these files)")


def open_dataset(spec: str | Path) -> OpenedDataset:
    """Resolve, open and cross-check; refuses an empty dataset in one line that says where."""
    prefixes, manifest = resolve_shards(spec)
    shards = [IndexedDataset(p) for p in prefixes]
    ds = OpenedDataset(str(spec), prefixes, manifest, shards)
    for s in shards:
        m_path = shard_manifest_path(s.prefix)
        m = read_manifest(m_path) if m_path.is_file() else None
        if m is not None:
            _check_counts(m_path, m, len(s.doc_indices) - 1, s.n_tokens, str(s.dtype))
        ds.shard_manifests.append(m)
    if manifest is not None and Path(spec).is_dir():
        dtypes = {str(s.dtype) for s in shards}
        _check_counts(ds.manifest_file, manifest, ds.n_documents, ds.n_tokens,
                      dtypes.pop() if len(dtypes) == 1 else None)
        recorded = [m.get("max_token_id") if m else None for m in ds.shard_manifests]
        if manifest.get("max_token_id") is not None and shards and None not in recorded \
                and manifest["max_token_id"] != max(recorded):
            raise DatasetFormatError(f"{ds.manifest_file}: records max_token_id {manifest['max_token_id']}, but its "
                                     f"shard manifests record {max(recorded)}")
    if ds.n_tokens == 0:
        where = ds.manifest_file if manifest is not None and Path(spec).is_dir() else idx_path(spec)
        raise ValueError(f"dataset {spec}: empty ({ds.n_documents} documents, 0 tokens in {len(shards)} "
                         f"shard(s); {where})")
    return ds


def _cache_key(prefix: Path) -> dict:
    return {str(f.name): [f.stat().st_size, f.stat().st_mtime_ns] for f in (idx_path(prefix), bin_path(prefix))}


def _cache_files(prefix: Path, cache_dir: Path | None) -> list[Path]:
    # hidden, so that no glob for shard manifests (shard_*.json) ever takes it for one
    beside = Path(prefix).with_name(f".{Path(prefix).name}.token_range.json")
    if cache_dir is None:
        return [beside]
    tag = hashlib.sha1(str(Path(prefix).resolve()).encode()).hexdigest()[:12]
    return [beside, Path(cache_dir) / f"{Path(prefix).name}-{tag}.token_range.json"]


def scan_token_range(ds: IndexedDataset) -> tuple[int, int]:
    lo, hi = None, None
    for start in range(0, ds.n_tokens, SCAN_CHUNK):
        chunk = ds.tokens[start:start + SCAN_CHUNK]
        a, b = int(chunk.min()), int(chunk.max())
        lo, hi = a if lo is None else min(lo, a), b if hi is None else max(hi, b)
    return (0, -1) if lo is None else (lo, hi)


def token_range(ds: IndexedDataset, cache_dir: Path | None = None) -> tuple[int, int]:
    """(smallest, largest) token id of one shard, from the cache when both files are unchanged."""
    key = _cache_key(ds.prefix)
    files = _cache_files(ds.prefix, cache_dir)
    for f in files:
        try:
            cached = json.loads(f.read_text())
            if cached.get("key") == key:
                return int(cached["min"]), int(cached["max"])
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            pass  # missing, unreadable or damaged cache: scan again
    lo, hi = scan_token_range(ds)
    for f in files:
        try:
            f.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(f, {"key": key, "min": lo, "max": hi})
            break
        except OSError:
            continue  # read-only data folder: try the cache dir; neither writable: scan again next time
    return lo, hi


def _vouched(where: Path, recorded: int, shards: list[IndexedDataset]) -> tuple[Path, int, int]:
    """A recorded max id, cross-checked cheaply against the first and last SAMPLE tokens of each shard."""
    for s in shards:
        ends = [s.tokens[:SAMPLE], s.tokens[max(0, s.n_tokens - SAMPLE):]]
        hi = max(int(e.max()) for e in ends if len(e)) if s.n_tokens else -1
        lo = min(int(e.min()) for e in ends if len(e)) if s.n_tokens else 0
        if hi > recorded or lo < 0:
            raise DatasetFormatError(f"{where}: records max_token_id {recorded}, but {bin_path(s.prefix)} holds "
                                     f"id {hi if hi > recorded else lo} (the manifest does not describe these files)")
    return where, 0, recorded


def shard_id_bounds(ds: OpenedDataset, cache_dir: Path | None = None,
                    scan: bool = True) -> list[tuple[Path, int, int]]:
    """(file that vouches for it, smallest id, largest id): per shard from its manifest, else from the dataset's
    manifest, else from a scan (leaves such shards out when not `scan`)."""
    recorded = [m.get("max_token_id") if m else None for m in ds.shard_manifests]
    if None in recorded and Path(ds.spec).is_dir() and ds.manifest.get("max_token_id") is not None:
        return [_vouched(ds.manifest_file, int(ds.manifest["max_token_id"]), ds.shards)]
    out = []
    for s, r in zip(ds.shards, recorded):
        if r is not None:
            out.append(_vouched(shard_manifest_path(s.prefix), int(r), [s]))
        elif scan:
            lo, hi = token_range(s, cache_dir)
            out.append((bin_path(s.prefix), lo, hi))
    return out


def check_token_ids(ds: OpenedDataset, vocab_size: int, cache_dir: Path | None = None, scan: bool = True) -> None:
    """Refuse ids the model's embedding cannot look up, naming the file and both numbers. Not `scan`: only the ids
    that manifests record (a shard without one is left to the check when training opens it)."""
    for s in ds.shards:
        if s.dtype.kind == "f":
            raise DatasetFormatError(f"{idx_path(s.prefix)}: holds {s.dtype} tokens; token ids must be integers")
    if all(s.dtype.kind == "u" and np.iinfo(s.dtype).max < vocab_size for s in ds.shards):
        return  # e.g. uint16 data for a vocabulary of 65536 or more: no id can be out of range, nothing to read
    for where, lo, hi in shard_id_bounds(ds, cache_dir, scan):
        if hi >= vocab_size:
            raise ValueError(f"{where}: holds token id {hi}, but model.vocab_size is {vocab_size} "
                             f"(ids must be < vocab_size)")
        if lo < 0:
            raise ValueError(f"{where}: holds token id {lo}; token ids must be >= 0")
