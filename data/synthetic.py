"""Write a valid dataset folder straight from token lists (no tokenizer): for tests and benchmarks."""

from __future__ import annotations

from pathlib import Path

from .indexed_dataset import IndexedDatasetWriter, token_dtype
from .manifest import DATASET_MANIFEST, TOOL_VERSION, shard_manifest_path, write_json_atomic


def write_token_dataset(folder: str | Path, documents, vocab_size: int, tokenizer_sha256: str | None = None,
                        docs_per_shard: int | None = None) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(vocab_size)
    docs = list(documents)
    per = docs_per_shard or max(1, len(docs))
    shards, total, max_id = [], 0, -1
    for k, start in enumerate(range(0, len(docs), per)):
        w = IndexedDatasetWriter(folder / f"shard_{k:05d}", dtype)
        for d in docs[start:start + per]:
            w.add(d)
        prefix = w.finish()
        write_json_atomic(shard_manifest_path(prefix), {
            "inputs": [], "documents": len(w.lengths), "tokens": w.n_tokens, "max_token_id": w.max_id,
            "dtype": str(dtype), "tokenizer_sha256": tokenizer_sha256, "vocab_size": vocab_size,
            "tool_version": TOOL_VERSION})
        shards.append(prefix.name)
        total += w.n_tokens
        max_id = max(max_id, w.max_id)
    write_json_atomic(folder / DATASET_MANIFEST, {
        "shards": shards, "tokenizer": None, "tokenizer_sha256": tokenizer_sha256, "vocab_size": vocab_size,
        "dtype": str(dtype), "documents": len(docs), "tokens": total, "max_token_id": max_id,
        "sources": [], "tool_version": TOOL_VERSION})
    return folder
