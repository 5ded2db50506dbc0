"""What a run reads, as a small comparable record: per dataset its documents, tokens and a hash of its index
files, plus the parameters the sample and shuffle indices are built from.

Two copies of a dataset at different paths (node-local disks, data moved between runs) have the same
fingerprint; a copy with one document more or less does not. Paths are kept for messages only. The token
files (.bin) are not hashed: that would read the whole corpus at every start; the index (.idx) holds every
document's length, which is what decides the sample layout, so differing data shows up there.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .config import DataConfig
from .indexed_dataset import IndexedDataset, idx_path
from .manifest import resolve_shards

_CHUNK = 1 << 24
_IDENTITY = ("documents", "tokens", "index_sha256")
TOKENIZER = "data.tokenizer sha256"  # the file's content, not its path


def _file_sha256(path: Path, h) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)


def dataset_fingerprint(spec: str | Path) -> dict:
    """One dataset folder (its shards in manifest order) or Megatron prefix."""
    prefixes, manifest = resolve_shards(spec)
    h, documents, tokens = hashlib.sha256(), 0, 0
    for p in prefixes:
        ds = IndexedDataset(p)  # validates the pair (sizes agree) before it is trusted
        documents += len(ds.doc_indices) - 1
        tokens += ds.n_tokens
        _file_sha256(idx_path(p), h)
    return {"path": str(spec), "documents": documents, "tokens": tokens, "index_sha256": h.hexdigest()[:16],
            "tokenizer_sha256": (manifest or {}).get("tokenizer_sha256")}


def data_fingerprint(cfg: DataConfig, n_future_tokens: int) -> dict | None:
    """Everything the global sample order is a function of; None when the config names no datasets."""
    if not cfg.datasets:
        return None
    from .tokenizer import load_tokenizer

    tokenizer = load_tokenizer(cfg.tokenizer).sha256[:16] if cfg.tokenizer else None
    return {"datasets": [dataset_fingerprint(s) for s in cfg.datasets],
            "params": {"data.seq_len": cfg.seq_len, "model.n_future_tokens": n_future_tokens,
                       "data.seed": cfg.seed, "data.split": list(cfg.split), "data.weights": list(cfg.weights),
                       TOKENIZER: tokenizer}}


def identity(ds: dict) -> dict:
    return {k: ds.get(k) for k in _IDENTITY + ("tokenizer_sha256",)}


def digest(fp: dict | None) -> str:
    """Short hash of a fingerprint without its paths: equal digests mean the same samples in the same order."""
    if fp is None:
        return "none"
    body = {"datasets": [identity(d) for d in fp["datasets"]], "params": fp["params"]}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def describe(ds: dict) -> str:
    tok = f", tokenizer sha256 {ds['tokenizer_sha256'][:16]}" if ds.get("tokenizer_sha256") else ""
    return f"{ds['documents']} documents, {ds['tokens']} tokens, index sha256 {ds['index_sha256']}{tok}"


def dataset_differences(a: list[dict], b: list[dict], a_name: str, b_name: str) -> list[str]:
    """Datasets compared by identity, position by position; paths only name them."""
    if len(a) != len(b):
        return [f"data.datasets: {a_name} has {len(a)} datasets, {b_name} {len(b)}"]
    return [f"data.datasets[{k}]: {a_name} {x['path']} ({describe(x)}), {b_name} {y['path']} ({describe(y)})"
            for k, (x, y) in enumerate(zip(a, b)) if identity(x) != identity(y)]


def differences(a: dict | None, b: dict | None, a_name: str, b_name: str, params=None) -> list[str]:
    """Readable lines naming each dataset or parameter (all, or those named in params) on which two
    fingerprints differ."""
    if a is None or b is None:
        return [] if a is b else [f"data.datasets: {a_name} {'names none' if a is None else 'names some'}, "
                                  f"{b_name} {'names none' if b is None else 'names some'}"]
    lines = dataset_differences(a["datasets"], b["datasets"], a_name, b_name)
    for key, value in a["params"].items():
        if (params is None or key in params) and b["params"].get(key) != value:
            lines.append(f"{key}: {a_name} {value!r}, {b_name} {b['params'].get(key)!r}")
    return lines
