"""Full fp32 weights (Meta names) and the model config from anything training writes.

Accepted: a consolidated folder (params.json + model.safetensors), a checkpoints folder (its `latest`), or
one step_* folder. ZeRO-1/2/3 shards are merged by DeepSpeed's own zero_to_fp32; ZeRO-0 checkpoints hold
the whole module in mp_rank_00_model_states.pt. Pipeline and tensor-parallel shards are not produced by
the trainer yet, so they are not read here either.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mtplm.model.config import ModelConfig
from mtplm.model.weights import PARAMS_FILE, WEIGHTS_FILE, load_model, model_config_from_json

from .checkpoint import CONFIG_FILE, LATEST


def _strip(sd: dict) -> dict:
    return {(k[len("module."):] if k.startswith("module.") else k): v.float() for k, v in sd.items()}


def resolve_checkpoint(path: str | Path) -> Path:
    path = Path(path)
    if (path / LATEST).is_file():
        path = path / (path / LATEST).read_text().strip()
    if not (path / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{path}: not a training checkpoint (no {CONFIG_FILE}); expected a consolidated "
                                f"folder ({PARAMS_FILE} + {WEIGHTS_FILE}), a checkpoints folder with '{LATEST}', "
                                f"or a step_* folder")
    return path


def consolidated_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], ModelConfig, dict]:
    """(state dict in fp32 with Meta names, model config, full training config or {})."""
    path = Path(path)
    if (path / PARAMS_FILE).is_file():
        model = load_model(path)
        return {k: v.float() for k, v in model.state_dict().items()}, model.cfg, {}
    tag_dir = resolve_checkpoint(path)
    train_cfg = json.loads((tag_dir / CONFIG_FILE).read_text())
    cfg = model_config_from_json(train_cfg["model"], str(tag_dir / CONFIG_FILE))
    if list(tag_dir.glob("*optim_states.pt")) and list(tag_dir.glob("zero_pp_rank_*")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    else:
        states = tag_dir / "mp_rank_00_model_states.pt"
        if not states.is_file():
            raise FileNotFoundError(f"{tag_dir}: no DeepSpeed model states (mp_rank_00_model_states.pt)")
        sd = torch.load(states, map_location="cpu", weights_only=True)["module"]
    sd = _strip(sd)
    if cfg.tie_embeddings and "output.weight" not in sd:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    return sd, cfg, train_cfg
