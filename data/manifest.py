"""The JSON manifests beside the data: one per shard (`<prefix>.json`) and one per dataset folder
(`dataset.json`). They record what is needed to check data against a model before training on it."""

from __future__ import annotations

import json
import os
from pathlib import Path

TOOL_VERSION = "mtplm-preprocess 1"
DATASET_MANIFEST = "dataset.json"


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def write_jsonl_atomic(path: Path, records) -> None:
    """One JSON object per line, under a temporary name renamed when complete."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


# Fields the readers rely on, with the types they must have (None allowed unless listed in _REQUIRED).
_FIELDS = {"shards": list, "tokenizer": str, "tokenizer_sha256": str, "vocab_size": int, "eod_id": int,
           "dtype": str, "documents": int, "tokens": int, "max_token_id": int}
_REQUIRED = {"shards"}


def read_manifest(path: Path, dataset: bool = False) -> dict:
    """A manifest, checked for the fields the readers use, so damage is one line here and not a KeyError later."""
    try:
        data = json.loads(Path(path).read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    for key, tp in _FIELDS.items():
        if key == "shards" and not dataset:
            continue
        value = data.get(key)
        if value is None:
            if key in _REQUIRED:
                raise ValueError(f"{path}: missing field {key!r}")
            continue
        low = -1 if key == "max_token_id" else 0  # -1: no tokens at all
        if not isinstance(value, tp) or isinstance(value, bool) or (tp is int and value < low):
            raise ValueError(f"{path}: field {key!r} must be {'a list' if tp is list else tp.__name__}"
                             f"{f' >= {low}' if tp is int else ''}, got {value!r}")
    if dataset:
        shards = data["shards"]
        if not all(isinstance(s, str) and s for s in shards):
            raise ValueError(f"{path}: field 'shards' must list shard names, got {shards!r}")
        if len(set(shards)) != len(shards):
            raise ValueError(f"{path}: field 'shards' names a shard twice: {shards!r}")
    return data


def shard_manifest_path(prefix: Path) -> Path:
    return Path(f"{prefix}.json")


def resolve_shards(spec: str | Path) -> tuple[list[Path], dict | None]:
    """A dataset folder (with dataset.json) -> its shard prefixes and manifest; a prefix -> itself,
    with its own manifest if there is one (Megatron data has none)."""
    spec = Path(spec)
    if spec.is_dir():
        manifest_file = spec / DATASET_MANIFEST
        if not manifest_file.is_file():
            pairs = sorted(p.name[:-4] for p in spec.glob("*.idx") if p.with_suffix(".bin").is_file())
            if pairs and not any(shard_manifest_path(spec / p).is_file() for p in pairs):
                raise FileNotFoundError(
                    f"{spec}: a folder without {DATASET_MANIFEST}; name a Megatron .idx/.bin pair by its prefix "
                    f"instead (e.g. {spec / pairs[0]}); this folder holds the prefixes: {', '.join(pairs)}")
            raise FileNotFoundError(f"{spec}: a dataset folder needs {DATASET_MANIFEST} (written when mtp-preprocess "
                                    f"finishes; an interrupted run must be re-run to complete it)")
        manifest = read_manifest(manifest_file, dataset=True)
        return [spec / s for s in manifest["shards"]], manifest
    if spec.suffix in (".idx", ".bin") and spec.is_file() and not Path(f"{spec}.idx").is_file():
        raise FileNotFoundError(f"dataset {spec}: name a .idx/.bin pair by its prefix, without the extension: "
                                f"{spec.with_suffix('')}")
    if not Path(f"{spec}.idx").is_file():
        raise FileNotFoundError(f"dataset {spec}: neither a folder with {DATASET_MANIFEST} nor a prefix of an "
                                f".idx/.bin pair ({spec}.idx is missing)")
    m = shard_manifest_path(spec)
    return [spec], (read_manifest(m) if m.is_file() else None)


def check_manifest(manifest: dict | None, where: str, vocab_size: int, tokenizer_sha256: str | None) -> None:
    """Refuse data that the model cannot embed or that came from another tokenizer."""
    if manifest is None:
        return
    if manifest.get("vocab_size") is not None and manifest["vocab_size"] > vocab_size:
        raise ValueError(f"{where}: tokenized with vocab_size {manifest['vocab_size']}, but model.vocab_size is "
                         f"{vocab_size}")
    max_id = manifest.get("max_token_id")
    if max_id is not None and max_id >= vocab_size:
        raise ValueError(f"{where}: holds token id {max_id}, but model.vocab_size is {vocab_size} "
                         f"(ids must be < vocab_size)")
    if tokenizer_sha256 and manifest.get("tokenizer_sha256") and manifest["tokenizer_sha256"] != tokenizer_sha256:
        raise ValueError(f"{where}: tokenized with tokenizer sha256 {manifest['tokenizer_sha256'][:16]}... "
                         f"({manifest.get('tokenizer')}), but data.tokenizer has sha256 {tokenizer_sha256[:16]}...")
