"""Full fp32 weights (Meta names) and the model config from anything training writes.

Accepted: a consolidated folder (params.json + model.safetensors), a checkpoints folder (its `latest`), or
one step_* folder. Where the optimizer's fp32 masters were saved (in partitions: ZeRO-1/2/3 and DeepSpeed's bf16
optimizer, also under pipeline parallelism; by parameter: its unfused bf16/fp16 wrapper under ZeRO-0) they are
what is exported, read as a resume on another layout reads them (pretrain/checkpointing/reshard.py, with DeepSpeed's
zero_to_fp32 merger), not the bf16 working copy. Otherwise (fp32 ZeRO-0) the weights are the module's own: the
whole module in mp_rank_XX_model_states.pt, or each pipeline layer's in layer_LL-model_TT-model_states.pt. With
tensor parallelism the shards are joined along the dimension each weight was split.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from mtplm.model.config import ModelConfig
from mtplm.model.weights import PARAMS_FILE, WEIGHTS_FILE, load_model, model_config_from_json

from mtplm.pretrain.checkpointing.checkpoint import CONFIG_FILE, LATEST
from mtplm.pretrain.parallel.pipeline import meta_name
from mtplm.pretrain.checkpointing.reshard import (LAYER_FILE, has_zero_partitions, holds_fp32_masters, load_states,
                                   universal_state)
from mtplm.pretrain.parallel.tensor_parallel import merge_tensor_parallel_shards

_MP_RANK = re.compile(r"mp_rank_(\d+)")


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
    layer_files = sorted(tag_dir.glob("layer_*-model_states.pt"))
    if has_zero_partitions(tag_dir) or (not layer_files and holds_fp32_masters(tag_dir)):
        sd = universal_state(tag_dir, keys=("fp32",))[0]["fp32"]
    elif layer_files:
        sd = _pipeline_state_dict(tag_dir, layer_files, cfg.n_trunk_layers)
    else:
        mp_ranks = _mp_ranks(tag_dir)
        if not mp_ranks:
            raise FileNotFoundError(f"{tag_dir}: no DeepSpeed model states (mp_rank_*_model_states.pt)")
        sd = merge_tensor_parallel_shards([_module_state_dict(tag_dir, r) for r in mp_ranks])
    sd = _strip(sd)
    if cfg.tie_embeddings and "output.weight" not in sd:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    return sd, cfg, train_cfg


def _mp_ranks(tag_dir: Path) -> list[int]:
    return sorted({int(m.group(1)) for f in tag_dir.iterdir() if (m := _MP_RANK.search(f.name))})


def _module_state_dict(tag_dir: Path, mp_rank: int) -> dict[str, torch.Tensor]:
    states = tag_dir / f"mp_rank_{mp_rank:02d}_model_states.pt"
    if not states.is_file():
        raise FileNotFoundError(f"{tag_dir}: {states.name} is missing")
    return load_states(states)["module"]


def _pipeline_state_dict(tag_dir: Path, layer_files: list[Path], n_trunk: int) -> dict[str, torch.Tensor]:
    by_rank: dict[int, dict[str, torch.Tensor]] = {}
    for f in layer_files:
        m = LAYER_FILE.match(f.name)
        if m is None:
            raise ValueError(f"{f}: unexpected pipeline layer file name (expected layer_LL-model_TT-model_states.pt)")
        layer, tp_rank = int(m.group(1)), int(m.group(2))
        states = load_states(f)
        by_rank.setdefault(tp_rank, {}).update({meta_name(f"{layer}.{k}", n_trunk): v for k, v in states.items()})
    return merge_tensor_parallel_shards([by_rank[r] for r in sorted(by_rank)])
