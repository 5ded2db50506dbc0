"""Start training from a consolidated model's weights, possibly with a different number of heads.

The trunk must match exactly. Head k of the new model takes the saved head k when there is one, else a copy
of the saved head 1's block (a new head starts as the block it branches beside). Heads the new model lacks
are dropped: continuing a 4-token model with n'=1 is the paper's best CodeContests fine-tuning recipe.

Imports deepspeed for zero.GatheredParameters: under ZeRO-3 the weights are read into a model already
partitioned by zero.Init (see pretrain/build_model.py), one parameter at a time. Under ZeRO-0/1/2 the lean build
(parallel/lean_init.py) reads only the rank's slices (its pipeline stage, its tensor shards) through
initial_weights_reader, one at a time.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from mtplm.model.weights import PARAMS_FILE, WEIGHTS_FILE, model_config_from_json


def _head_prefix(n_main: int, k: int) -> str:
    return f"layers.{n_main - 1}." if k == 0 else f"extra_heads.{k - 1}."


def load_initial_weights(model, path: str | Path) -> list[str]:
    """Load weights into `model` in place (whole parameters, or ZeRO-3 partitions); returns notes on what was
    adapted. The lean build (parallel/lean_init.py) reads only its local slices instead, through the same checks."""
    read, notes = initial_weights_reader(model, path)
    _copy_parameters(model, read)
    return notes


def initial_weights_reader(model, path: str | Path):
    """(read, notes): saved_weights_reader's read() for `model`'s parameters (whole, before ZeRO-3 or tensor
    parallelism cut them; the model may still be on the meta device), after every check, and notes on what was
    adapted."""
    source, notes = initial_weight_sources(model, path)
    shapes = {name: tuple(getattr(p, "ds_shape", p.shape)) for name, p in model.named_parameters()}
    return saved_weights_reader(Path(path) / WEIGHTS_FILE, source, shapes, model.cfg.tie_embeddings), notes


def initial_weight_sources(model, path: str | Path) -> tuple[dict[str, str], list[str]]:
    """Checks the saved model against `model` (which may still be on the meta device); returns the saved name
    each of its parameters starts from, and notes on what was adapted."""
    path = Path(path)
    if not (path / PARAMS_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"train.init_from: {path} is not a consolidated model folder "
                                f"(needs {PARAMS_FILE} and {WEIGHTS_FILE}; mtp-export or the end of training writes one)")
    src_cfg = model_config_from_json(json.loads((path / PARAMS_FILE).read_text()), str(path / PARAMS_FILE))
    cfg = model.cfg
    shape_keys = ("dim", "n_heads", "kv_heads", "ffn_hidden_dim", "padded_vocab_size", "n_trunk_layers")
    diffs = [f"{k}: saved {getattr(src_cfg, k)}, this run {getattr(cfg, k)}" for k in shape_keys
             if getattr(src_cfg, k) != getattr(cfg, k)]
    if diffs:
        raise ValueError(f"train.init_from: {path} has a different trunk or width:\n  " + "\n  ".join(diffs)
                         + "\n(to change n_future_tokens keep the trunk: n_layers - n_future_tokens must stay "
                           f"{src_cfg.n_trunk_layers})")
    if src_cfg.tie_embeddings != cfg.tie_embeddings:  # which of two matrices one tied weight starts from is no default
        raise ValueError(f"train.init_from: {path} has tie_embeddings {src_cfg.tie_embeddings}, this run "
                         f"{cfg.tie_embeddings} (set model.tie_embeddings to match)")
    src_main, dst_main = src_cfg.n_main_layers, cfg.n_main_layers
    notes, source = [], {}
    for name, _ in model.named_parameters():
        src_name = name
        for k in range(cfg.n_future_tokens):
            prefix = _head_prefix(dst_main, k)
            if name.startswith(prefix):
                src_k = k if k < src_cfg.n_future_tokens else 0
                src_name = _head_prefix(src_main, src_k) + name[len(prefix):]
                if src_k != k and name.endswith("attention_norm.weight"):
                    notes.append(f"head {k + 1} initialised from saved head 1")
                break
        source[name] = src_name
    if src_cfg.n_future_tokens > cfg.n_future_tokens:
        notes.append(f"dropped saved heads {cfg.n_future_tokens + 1}..{src_cfg.n_future_tokens}")
    return source, notes


def saved_weights_reader(weights_file: Path, source: dict[str, str], shapes: dict[str, tuple], tied: bool):
    """Checks that the file holds every source tensor with its parameter's (full) shape, from the file's header
    only; returns read(name, dim=None, start=0, stop=None): the saved tensor of parameter `name`, or only its
    [start:stop] along dim, read alone (safetensors' lazy slices), as a tensor of its own."""
    with safe_open(str(weights_file), framework="pt") as f:
        saved = set(f.keys())
        if tied and "output.weight" not in saved:  # a tied model's file holds the embedding only
            source = {k: "tok_embeddings.weight" if v == "output.weight" else v for k, v in source.items()}
        missing = sorted(set(source.values()) - saved)
        if missing:
            raise ValueError(f"train.init_from: {weights_file} lacks {', '.join(missing[:5])}"
                             + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
        for name, shape in shapes.items():
            saved_shape = tuple(f.get_slice(source[name]).get_shape())
            if tuple(shape) != saved_shape:
                raise ValueError(f"train.init_from: {weights_file}: {source[name]} has shape {saved_shape}, "
                                 f"this run's {name} {tuple(shape)}")

    def read(name: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        # safetensors hands out views of the file's memory map, which stays mapped while the file is open: a
        # column slice touches every page of its tensor, so each read maps the file anew and returns a copy,
        # and what it touched is released with it instead of piling up to the whole file.
        with safe_open(str(weights_file), framework="pt") as g:
            index = () if dim is None else (slice(None),) * dim + (slice(start, stop),)
            return g.get_slice(source[name])[index].clone(memory_format=torch.contiguous_format)

    return read


def _copy_parameters(model, read) -> None:
    """One tensor at a time, read lazily from the file: a ZeRO-3 partitioned parameter is gathered, set on
    data-parallel rank 0 (the only rank that reads it), broadcast and partitioned again; GatheredParameters is a
    no-op on plain parameters, which every rank sets."""
    import deepspeed
    import torch.distributed as dist

    for name, p in model.named_parameters():
        reads = not hasattr(p, "ds_id") or dist.get_rank(group=p.ds_process_group) == 0
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0), torch.no_grad():
            if reads:
                p.copy_(read(name))
