"""A consolidated model on disk: params.json (Meta's keys plus ours) and model.safetensors (Meta's names).

This is what training writes at the end, what export to Hugging Face reads and what generation loads.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import ConfigError, ModelConfig
from .transformer import MTPTransformer

PARAMS_FILE = "params.json"
WEIGHTS_FILE = "model.safetensors"


def model_config_to_json(cfg: ModelConfig) -> dict:
    return dataclasses.asdict(cfg)


def model_config_from_json(data: dict, source: str = PARAMS_FILE) -> ModelConfig:
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{source}: unknown model keys {', '.join(unknown)}")
    return ModelConfig(**data)


def state_dict_for_save(cfg: ModelConfig, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # A tied unembedding is stored once, under tok_embeddings (as Hugging Face does).
    sd = {k: v.detach().contiguous() for k, v in state_dict.items()}
    if cfg.tie_embeddings:
        sd.pop("output.weight", None)
    return sd


def _apply_umask(folder: Path) -> None:
    """Give folder and everything in it the permissions a plain mkdir/open would: mkdtemp makes 0700 and
    safetensors writes 0600, which would keep a shared run folder's model from the rest of the team."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def check_output_folder(out_dir: str | Path, marker: str = PARAMS_FILE) -> Path:
    """What atomic_folder will refuse, for a tool to check before its slow part."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"output {out_dir}: is an existing file, not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / marker).is_file():
        raise ValueError(f"output {out_dir}: an existing folder that is not an earlier output of this kind (no "
                         f"{marker}); refusing to replace it: choose a new or empty folder")
    return out_dir


@contextmanager
def atomic_folder(out_dir: str | Path, marker: str = PARAMS_FILE):
    """Yield a temporary folder beside out_dir; on success it replaces out_dir, on error it is removed,
    so a folder at out_dir is always complete. The result has the umask's permissions, like any other output.

    An existing out_dir is replaced only when it is empty or holds `marker` (an earlier output of the same kind,
    e.g. a re-run): a mistyped output path must not delete a run folder or anything else the user keeps there."""
    out_dir = check_output_folder(out_dir, marker)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"output {out_dir}: cannot create its parent folder ({e.strerror})") from None
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
        _apply_umask(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def save_model(model: MTPTransformer, out_dir: str | Path, extra_files: dict[str, str | Path] | None = None) -> Path:
    """Write params.json + model.safetensors (+ copies of extra_files, e.g. the tokenizer) atomically."""
    return save_weights(model.cfg, model.state_dict(), out_dir, extra_files)


def save_weights(cfg: ModelConfig, state_dict: dict[str, torch.Tensor], out_dir: str | Path,
                 extra_files: dict[str, str | Path] | None = None) -> Path:
    """save_model for a state dict assembled elsewhere (e.g. gathered from tensor-parallel shards)."""
    with atomic_folder(out_dir) as tmp:
        (tmp / PARAMS_FILE).write_text(json.dumps(model_config_to_json(cfg), indent=2) + "\n")
        save_file(state_dict_for_save(cfg, state_dict), str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        for name, src in (extra_files or {}).items():
            shutil.copyfile(src, tmp / name)
    return Path(out_dir)


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               **model_kwargs) -> MTPTransformer:
    path = Path(path)
    params = path / PARAMS_FILE
    weights = path / WEIGHTS_FILE
    for f in (params, weights):
        if not f.is_file():
            raise FileNotFoundError(f"{f}: missing; expected a folder written by save_model ({PARAMS_FILE}, {WEIGHTS_FILE})")
    cfg = model_config_from_json(json.loads(params.read_text()), str(params))
    try:
        model = model_from_state_dict(cfg, load_file(str(weights)), **model_kwargs)
    except ValueError as e:
        raise ValueError(f"{weights}: does not match {params}: {e}") from None
    return model.to(device=device, dtype=dtype) if dtype else model.to(device)


def model_from_state_dict(cfg: ModelConfig, sd: dict[str, torch.Tensor], **model_kwargs) -> MTPTransformer:
    """The model with exactly these weights (Meta's names; a tied unembedding may be left out)."""
    model = MTPTransformer(cfg, **model_kwargs)
    if cfg.tie_embeddings:
        sd.setdefault("output.weight", sd["tok_embeddings.weight"])
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"missing {missing}, unexpected {unexpected}")
    return model
