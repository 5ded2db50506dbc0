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


def read_manifest(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def shard_manifest_path(prefix: Path) -> Path:
    return Path(f"{prefix}.json")


def resolve_shards(spec: str | Path) -> tuple[list[Path], dict | None]:
    """A dataset folder (with dataset.json) -> its shard prefixes and manifest; a prefix -> itself,
    with its own manifest if there is one (Megatron data has none)."""
    spec = Path(spec)
    if spec.is_dir():
        manifest_file = spec / DATASET_MANIFEST
        if not manifest_file.is_file():
            raise FileNotFoundError(f"{spec}: a dataset folder needs {DATASET_MANIFEST} (written when mtp-preprocess "
                                    f"finishes; an interrupted run must be re-run to complete it)")
        manifest = read_manifest(manifest_file)
        return [spec / s for s in manifest["shards"]], manifest
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
