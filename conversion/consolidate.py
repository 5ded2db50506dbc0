"""Full fp32 weights (Meta names) and the model config from anything training writes.

Accepted: a consolidated folder (params.json + model.safetensors), a checkpoints folder (its `latest`), or
one step_* folder. ZeRO-1/2/3 shards are merged by DeepSpeed's own zero_to_fp32; ZeRO-0 checkpoints hold
the whole module in mp_rank_00_model_states.pt. With tensor parallelism each tensor rank's files (mp_rank_XX)
are consolidated on their own and the shards then joined along the dimension each weight was split.
Pipeline checkpoints keep each layer's module weights in layer_LL-model_TT-model_states.pt, in bf16 training the
bf16 working copy; where the optimizer's fp32 partitions were saved (ZeRO-1, DeepSpeed's bf16 optimizer) those
are read instead, one pipeline-and-tensor rank (mp_rank_XX = stage * tensor + tensor rank) at a time. Imports
DeepSpeed's zero_to_fp32 for the ZeRO shards.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import torch

from mtplm.model.config import ModelConfig
from mtplm.model.weights import PARAMS_FILE, WEIGHTS_FILE, load_model, model_config_from_json

from mtplm.pretrain.checkpoint import CONFIG_FILE, LATEST
from mtplm.pretrain.pipeline import meta_name
from mtplm.pretrain.tensor_parallel import merge_tensor_parallel_shards

_MP_RANK = re.compile(r"mp_rank_(\d+)")
_LAYER_FILE = re.compile(r"^layer_(\d+)-model_(\d+)-model_states\.pt$")
_ZERO_OPTIM = re.compile(r"^(bf16_)?zero_pp_rank_\d+_mp_rank_\d+_optim_states\.pt$")


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
    if layer_files:
        sd = _pipeline_state_dict(tag_dir, layer_files, cfg.n_trunk_layers,
                                  train_cfg.get("parallel", {}).get("tensor", 1))
    else:
        mp_ranks = _mp_ranks(tag_dir)
        if not mp_ranks:
            raise FileNotFoundError(f"{tag_dir}: no DeepSpeed model states (mp_rank_*_model_states.pt)")
        sd = merge_tensor_parallel_shards([_tensor_rank_state_dict(tag_dir, r) for r in mp_ranks])
    sd = _strip(sd)
    if cfg.tie_embeddings and "output.weight" not in sd:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    return sd, cfg, train_cfg


def _mp_ranks(tag_dir: Path) -> list[int]:
    return sorted({int(m.group(1)) for f in tag_dir.iterdir() if (m := _MP_RANK.search(f.name))})


def _has_zero_partitions(tag_dir: Path) -> bool:
    return any(_ZERO_OPTIM.match(f.name) for f in tag_dir.iterdir())


def _tensor_rank_state_dict(tag_dir: Path, mp_rank: int) -> dict[str, torch.Tensor]:
    """One model-parallel rank's fp32 weights. zero_to_fp32 reads every rank's files of a folder as one model,
    so this rank's files are presented to it, under rank 0's names, in a folder of their own."""
    mine = f"mp_rank_{mp_rank:02d}"
    files = [f for f in tag_dir.iterdir() if mine in f.name]
    if any(_ZERO_OPTIM.match(f.name) for f in files):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with tempfile.TemporaryDirectory() as tmp:
            view = Path(tmp) / tag_dir.name
            view.mkdir()
            for f in files:
                target = view / f.name.replace(mine, "mp_rank_00")
                if f.name == f"{mine}_model_states.pt":
                    states = torch.load(f, map_location="cpu", weights_only=True)
                    if states.get("module") is None:
                        # the pipeline engine writes its module weights to layer files; zero_to_fp32 reads the
                        # buffers (the pipeline keeps none here) from this file's module entry
                        torch.save({**states, "module": {}}, target)
                        continue
                target.symlink_to(f.resolve())
            return get_fp32_state_dict_from_zero_checkpoint(tmp, tag=tag_dir.name)
    states = tag_dir / f"{mine}_model_states.pt"
    if not states.is_file():
        raise FileNotFoundError(f"{tag_dir}: {states.name} is missing")
    return torch.load(states, map_location="cpu", weights_only=True)["module"]


def _pipeline_state_dict(tag_dir: Path, layer_files: list[Path], n_trunk: int, tensor: int
                         ) -> dict[str, torch.Tensor]:
    by_rank: dict[int, dict[str, torch.Tensor]] = {}
    if _has_zero_partitions(tag_dir):  # the fp32 masters, not the (bf16) working weights of the layer files
        for mp_rank in _mp_ranks(tag_dir):
            states = _tensor_rank_state_dict(tag_dir, mp_rank)
            by_rank.setdefault(mp_rank % tensor, {}).update({meta_name(k, n_trunk): v for k, v in states.items()})
        return merge_tensor_parallel_shards([by_rank[r] for r in sorted(by_rank)])
    for f in layer_files:
        m = _LAYER_FILE.match(f.name)
        if m is None:
            raise ValueError(f"{f}: unexpected pipeline layer file name (expected layer_LL-model_TT-model_states.pt)")
        layer, tp_rank = int(m.group(1)), int(m.group(2))
        states = torch.load(f, map_location="cpu", weights_only=True)
        by_rank.setdefault(tp_rank, {}).update({meta_name(f"{layer}.{k}", n_trunk): v for k, v in states.items()})
    return merge_tensor_parallel_shards([by_rank[r] for r in sorted(by_rank)])
