"""Resume on another layout: a different data-parallel size, tensor or pipeline size, ZeRO stage or precision.

DeepSpeed's own load_checkpoint reads a checkpoint only into the layout that wrote it. DeepSpeed's Universal
Checkpointing (ds_to_universal) does not fit ours: it names parameters by the engine's module, which differs
between our layouts (pipeline layers "3.block.attention.wq.weight" against "layers.2.attention.wq.weight"), takes
tensor-parallel split dimensions from Megatron-DeepSpeed's patterns rather than our partition_dim, and has no
ZeRO-0 or ZeRO-3-with-pipeline forms. So a checkpoint is turned into a layout-free form of our own, by Meta's
parameter names, once (rank 0, into <step folder>/universal/, written under a temporary name then renamed):

    fp32.safetensors, exp_avg.safetensors, exp_avg_sq.safetensors   full tensors, one entry per parameter
    state.pt    the optimizer step, LR schedule state, DeepSpeed's step counters, our client state

The ZeRO partitions are merged with DeepSpeed's own zero_to_fp32 merger (fed the Adam moments in place of the
fp32 masters: they are partitioned alike), tensor-parallel shards joined along each weight's partition_dim,
pipeline layer names mapped to Meta's. Every rank of the resuming run then reads it one tensor at a time, cuts
its tensor-parallel shard, and hands the fp32 master and the moments to the engine's optimizer through
DeepSpeed's fragment API (safe_set_full_fp32_param / safe_set_full_optimizer_state under ZeRO-1/2 and the bf16
optimizer; ZeRO-3's own partition of each parameter; the torch optimizer's state under ZeRO-0).

The global batch (micro-batch x accumulation x data-parallel size) is kept: with another data-parallel size the
accumulation steps are adjusted, and a resume that cannot keep it is refused, so every optimizer step sees the
same samples in the same global order as the run that wrote the checkpoint.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mtplm.model.weights import model_config_from_json

from ..parallel.pipeline import meta_name
from ..parallel.tensor_parallel import merge_tensor_parallel_shards

UNIVERSAL = "universal"
KEYS = ("fp32", "exp_avg", "exp_avg_sq")
STATE_FILE = "state.pt"
CHANGES_KEY = "layout_changes"  # in the client state load_checkpoint returns: lines for the log
_DS_KEYS = ("lr_scheduler", "global_steps", "global_samples", "skipped_steps")
_DS_OWN = {"module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes", "shared_params",
           "frozen_param_fragments", "lr_scheduler", "data_sampler", "random_ltd", "sparse_tensor_module_names",
           "skipped_steps", "global_steps", "global_samples", "dp_world_size", "mp_world_size",
           "checkpoint_parallel_dimensions", "ds_config", "ds_version"}
_DP_RANK = re.compile(r"zero_pp_rank_(\d+)_")
LAYER_FILE = re.compile(r"^layer_(\d+)-model_(\d+)-model_states\.pt$")  # a pipeline layer's weights, per tensor rank
ZERO_FILES = "*zero_pp_rank_*"  # the optimizer partitions; DeepSpeed's bf16 optimizer prefixes them with bf16_


class ReshardError(ValueError):
    """A checkpoint that cannot be carried into this layout; the message is one line."""


def _model_states_file(folder: Path) -> Path:
    files = sorted(folder.glob("*mp_rank_00_model_states.pt"))
    if not files:
        raise ReshardError(f"{folder}: no DeepSpeed model states (mp_rank_00_model_states.pt)")
    return files[0]


def load_states(path: Path) -> dict:
    """One of DeepSpeed's checkpoint files. Besides tensors they hold its loss scaler, ZeRO stage enum and fragment
    addresses; only those classes are allowed. A damaged or truncated file is a ReshardError naming it."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    try:
        with torch.serialization.safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as e:
        reason = ("empty" if path.stat().st_size == 0 else "not in torch.save's zip format" if "mmap" in str(e)
                  else str(e).split(". ")[0].strip())
        raise ReshardError(f"{path}: not a readable checkpoint file ({reason}); it is damaged or was not written "
                           f"completely") from None


def saved_layout(folder: Path) -> dict:
    """How the checkpoint's run was laid out: {data_parallel, tensor, pipeline, zero_stage, precision,
    micro_batch_size, grad_accum_steps}."""
    cfg = json.loads((folder / "mtp_config.json").read_text())
    states = load_states(_model_states_file(folder))
    ds = states.get("ds_config") or {}
    precision = "bf16" if ds.get("bf16", {}).get("enabled") else "fp16" if ds.get("fp16", {}).get("enabled") else "fp32"
    return {"data_parallel": int(states["dp_world_size"]), "tensor": cfg.get("parallel", {}).get("tensor", 1),
            "pipeline": cfg.get("parallel", {}).get("pipeline", 1),
            "zero_stage": int(ds.get("zero_optimization", {}).get("stage", 0)), "precision": precision,
            "micro_batch_size": cfg["train"]["micro_batch_size"], "grad_accum_steps": cfg["train"]["grad_accum_steps"]}


def plan_batch(saved: dict, micro_batch: int, grad_accum: int, dp_world: int, tensor: int, pipeline: int
               ) -> tuple[int | None, str | None]:
    """(the accumulation steps that keep the checkpoint's global batch, or None; why it cannot be kept, or None).
    The data order is a function of the global batch alone (data/loader.py), so keeping it keeps the order. On
    another parallel layout the accumulation steps follow from the global batch; on the same layout a different
    micro-batch x accumulation is a different global batch, and refused."""
    batch = saved["micro_batch_size"] * saved["grad_accum_steps"] * saved["data_parallel"]
    if micro_batch * grad_accum * dp_world == batch:
        return grad_accum, None
    moved = (dp_world, tensor, pipeline) != (saved["data_parallel"], saved["tensor"], saved["pipeline"])
    if moved and batch % (micro_batch * dp_world) == 0:
        return batch // (micro_batch * dp_world), None
    return None, (f"the checkpoint's global batch is {batch} samples (micro-batch {saved['micro_batch_size']} x "
                  f"accumulation {saved['grad_accum_steps']} x data-parallel {saved['data_parallel']}); this run's "
                  f"micro-batch {micro_batch} x accumulation {grad_accum} x data-parallel {dp_world} = "
                  f"{micro_batch * grad_accum * dp_world}" + ("" if not moved else
                  f", and no whole number of accumulation steps gives {batch} with micro-batch {micro_batch} x "
                  f"data-parallel {dp_world}") + "; a resume keeps the global batch (and so the data order): "
                  "change train.micro_batch_size or the number of ranks")


_NAMES = {"data_parallel": "data-parallel size", "tensor": "parallel.tensor", "pipeline": "parallel.pipeline",
          "zero_stage": "ZeRO stage", "precision": "precision", "micro_batch_size": "train.micro_batch_size",
          "grad_accum_steps": "train.grad_accum_steps"}
RESHARDED = ("data_parallel", "tensor", "pipeline", "zero_stage", "precision")  # what DeepSpeed cannot reload


def layout_changes(saved: dict, now: dict) -> list[str]:
    return [f"{_NAMES[k]} {saved[k]} -> {now[k]}" for k in _NAMES if saved[k] != now[k]]


def needs_reshard(saved: dict, now: dict) -> bool:
    return any(saved[k] != now[k] for k in RESHARDED)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint -> layout-free form (offline, one process)

def _dp_sorted(files) -> list[Path]:
    return sorted(files, key=lambda f: int(_DP_RANK.search(f.name).group(1)))


def _mp_rank_states(folder: Path, mp_rank: int, keys: tuple[str, ...]
                    ) -> tuple[dict[str, dict[str, torch.Tensor]], torch.Tensor]:
    """One model-parallel rank's {key: {name: full tensor}} for the fp32 masters and both Adam moments, merged
    over its data-parallel ZeRO partitions by DeepSpeed's zero_to_fp32; and the optimizer step."""
    from deepspeed.checkpoint.constants import (BASE_OPTIMIZER_STATE, FP32_FLAT_GROUPS, PARAM_ALIGNMENT_PADDINGS,
                                                PARAM_SHAPES, SINGLE_PARTITION_OF_FP32_GROUPS)
    from deepspeed.utils import zero_to_fp32 as z

    mine = f"mp_rank_{mp_rank:02d}"
    model_file = sorted(folder.glob(f"*{mine}_model_states.pt"))[0]
    optim_files = _dp_sorted(folder.glob(f"{ZERO_FILES}_{mine}_optim_states.pt"))
    states = load_states(model_file)
    optims = [load_states(f)["optimizer_state_dict"] for f in optim_files]
    # DeepSpeed's bf16 optimizer under ZeRO-0 (pipeline layouts) saves neither the parameter shapes nor a ZeRO
    # stage; it partitions as ZeRO-1 does, and its fragment map orders the parameters.
    shapes = states[PARAM_SHAPES] or _shapes_from_fragments(folder, mp_rank, optims)
    model_state = z.zero_model_state(buffers={}, param_shapes=shapes,
                                     shared_params=[[k, v] for k, v in (states["shared_params"] or {}).items()],
                                     ds_version=states.get("ds_version"), frozen_param_shapes=None,
                                     frozen_param_fragments=None)
    stage, world = int(optims[0].get("zero_stage", 1)), optims[0]["partition_count"]
    world = max(world) if isinstance(world, list) else world
    if world != len(optims):
        raise ReshardError(f"{folder}: {len(optims)} optimizer files for {mine}, DeepSpeed's partition count is "
                           f"{world}")
    out = {}
    for key in keys:
        groups = []
        for o in optims:
            if stage <= 2:
                lean = o[SINGLE_PARTITION_OF_FP32_GROUPS]  # saved without DeepSpeed's trailing alignment padding
                base = o[BASE_OPTIMIZER_STATE]
                per_group = [base["state"][i] for i in range(len(lean))] if isinstance(base, dict) else base
                groups.append(lean if key == "fp32" else [s[key][:t.numel()] for s, t in zip(per_group, lean)])
            else:
                flats = o[FP32_FLAT_GROUPS]
                groups.append(flats if key == "fp32" else
                              [o["optimizer_state_dict"]["state"][i][key] for i in range(len(flats))])
        if stage <= 2:
            merged = z._get_fp32_state_dict_from_zero2_checkpoint(world, groups, [model_state], True,
                                                                  optims[0].get(PARAM_ALIGNMENT_PADDINGS))
        else:
            merged = z._get_fp32_state_dict_from_zero3_checkpoint(world, groups, [model_state], True)
        out[key] = z.to_torch_tensor(merged)
    base = optims[0][BASE_OPTIMIZER_STATE] if stage <= 2 else optims[0]["optimizer_state_dict"]
    step = (base["state"][0] if isinstance(base, dict) else base[0])["step"]
    return out, torch.as_tensor(step, dtype=torch.float32).clone()


def _shapes_from_fragments(folder: Path, mp_rank: int, optims: list[dict]) -> list[dict[str, torch.Size]]:
    """Per parameter group, {engine name: shape} in the order of the flat fp32 groups: the names from each
    data-parallel rank's fragment map (its slice of every group, in rank order), the shapes from the pipeline
    layer files of this tensor rank."""
    tensor = json.loads((folder / "mtp_config.json").read_text()).get("parallel", {}).get("tensor", 1)
    sizes = {}
    for f in folder.glob(f"layer_*-model_{mp_rank % tensor:02d}-model_states.pt"):
        layer = int(LAYER_FILE.match(f.name).group(1))
        sizes.update({f"{layer}.{k}": v.shape for k, v in load_states(f).items()})
    if not sizes or any(o.get("param_slice_mappings") is None for o in optims):
        raise ReshardError(f"{folder}: DeepSpeed saved no parameter shapes for mp_rank_{mp_rank:02d}")
    groups = []
    for g in range(len(optims[0]["param_slice_mappings"])):
        names = {}
        for o in optims:
            fragments = o["param_slice_mappings"][g]
            names.update(dict.fromkeys(sorted(fragments, key=lambda n: fragments[n].start)))
        missing = [n for n in names if n not in sizes]
        if missing:
            raise ReshardError(f"{folder}: no layer file holds {missing[0]}, which the optimizer partitions name")
        groups.append({n: sizes[n] for n in names})
    return groups


def _torch_optimizer_states(folder: Path, mp_rank: int, keys: tuple[str, ...]
                            ) -> tuple[dict[str, dict[str, torch.Tensor]], torch.Tensor]:
    """The same from a ZeRO-0 checkpoint: the whole module and the torch optimizer's state, whose entries are
    numbered in the order of the engine's parameter groups (engine.param_groups: matrices, then the rest). In
    bf16/fp16, DeepSpeed's unfused mixed-precision wrapper saves the fp32 masters beside them, in the same order."""
    states = load_states(folder / f"mp_rank_{mp_rank:02d}_model_states.pt")
    module, optim = states.get("module"), states.get("optimizer")
    masters = None
    if optim and "fp32_groups_flat" in optim:
        raise ReshardError(f"{folder}: the fp32 masters are saved flattened (DeepSpeed's fused mixed-precision "
                           f"optimizer under ZeRO-0), which the layout-free form does not read; resume it with the "
                           f"layout that wrote it")
    if optim and "fp32_groups" in optim:
        masters = [t for group in optim["fp32_groups"] for t in group]
        optim = optim["optimizer_state_dict"]
    if module is None or not optim or not optim.get("state"):
        raise ReshardError(f"{folder}: no optimizer state by parameter (a ZeRO-0 fp32 pipeline checkpoint keeps "
                           f"it by position in each stage's optimizer); resume it with the layout that wrote it")
    buffers, seen, names = set(states.get("buffer_names") or []), set(), []
    for k, v in module.items():
        if k not in buffers and v.untyped_storage().data_ptr() not in seen:  # a tied weight is one parameter
            seen.add(v.untyped_storage().data_ptr())
            names.append(k)
    ordered = [n for n in names if module[n].dim() >= 2] + [n for n in names if module[n].dim() < 2]
    indices = [i for group in optim["param_groups"] for i in group["params"]]
    if len(indices) != len(ordered):
        raise ReshardError(f"{folder}: {len(indices)} optimizer entries for {len(ordered)} parameters")
    if masters is not None and [tuple(t.shape) for t in masters] != [tuple(module[n].shape) for n in ordered]:
        raise ReshardError(f"{folder}: the fp32 masters do not follow the module's parameters")
    out = {"fp32": dict(zip(ordered, masters)) if masters is not None else {n: module[n] for n in ordered}}
    for key in keys[1:]:
        out[key] = {n: optim["state"][i][key] for i, n in zip(indices, ordered)}
    return out, torch.as_tensor(optim["state"][indices[0]]["step"], dtype=torch.float32).clone()


def has_zero_partitions(folder: Path) -> bool:
    """Whether the optimizer's fp32 masters and moments were saved partitioned (ZeRO-1/2/3, DeepSpeed's bf16
    optimizer) rather than by parameter in the model states (ZeRO-0)."""
    return any(folder.glob(f"{ZERO_FILES}_optim_states.pt"))


def holds_fp32_masters(folder: Path) -> bool:
    """Whether a ZeRO-0 checkpoint's optimizer state holds fp32 masters (DeepSpeed's unfused mixed-precision
    wrapper: bf16 without stages, fp16) beside the module's working copy."""
    return "fp32_groups" in (load_states(_model_states_file(folder)).get("optimizer") or {})


def universal_state(folder: Path, keys: tuple[str, ...] = KEYS
                    ) -> tuple[dict[str, dict[str, torch.Tensor]], torch.Tensor]:
    """{key: {Meta name: full fp32 tensor}} for `keys` ("fp32" first) and the optimizer step, from a checkpoint of
    any layout (ZeRO-0 only without pipeline parallelism)."""
    cfg = json.loads((folder / "mtp_config.json").read_text())
    tensor, pipeline = cfg.get("parallel", {}).get("tensor", 1), cfg.get("parallel", {}).get("pipeline", 1)
    n_trunk = model_config_from_json(cfg["model"], str(folder / "mtp_config.json")).n_trunk_layers
    zero = has_zero_partitions(folder)
    by_tensor_rank: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
    step = None
    for mp_rank in range(tensor * pipeline):
        states, step = (_mp_rank_states if zero else _torch_optimizer_states)(folder, mp_rank, keys)
        for key, sd in states.items():
            if pipeline > 1:
                sd = {meta_name(k, n_trunk): v for k, v in sd.items()}
            by_tensor_rank.setdefault(mp_rank % tensor, {}).setdefault(key, {}).update(sd)
    full = {}
    for key in keys:
        merged = merge_tensor_parallel_shards([by_tensor_rank[r][key] for r in range(tensor)])
        merged = {k.removeprefix("module."): v.float() for k, v in merged.items()}
        if cfg["model"].get("tie_embeddings") and "tok_embeddings.weight" in merged:
            merged.pop("output.weight", None)  # one tensor; the loader finds it under the embedding's name
        full[key] = merged
    return full, step


def write_universal(folder: Path) -> Path:
    """Rank 0: the layout-free form of `folder` in folder/universal (reused when already there)."""
    target = folder / UNIVERSAL
    if (target / STATE_FILE).is_file():
        return target
    full, step = universal_state(folder)
    states = load_states(_model_states_file(folder))
    tmp = folder / f".{UNIVERSAL}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for key, sd in full.items():
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp / f"{key}.safetensors"))
    torch.save({"step": step, **{k: states[k] for k in _DS_KEYS},
                "client_state": {k: v for k, v in states.items() if k not in _DS_OWN}}, tmp / STATE_FILE)
    os.replace(tmp, target)
    return target


# ---------------------------------------------------------------------------------------------------------------
# Layout-free form -> this run's engine (every rank, its own slices)

def _tensor_parallel(engine) -> tuple[int, int]:
    mpu = getattr(engine, "mpu", None)
    if mpu is None or not hasattr(mpu, "get_slice_parallel_world_size"):
        return 0, 1
    return mpu.get_slice_parallel_rank(), mpu.get_slice_parallel_world_size()


def _step_for(optimizer, step: torch.Tensor):
    """The step as the optimizer keeps it: torch's Adam/AdamW a float tensor on the CPU, DeepSpeed's fused (GPU)
    and CPU Adam a Python int that they hand to their kernels."""
    return step.clone() if type(optimizer).__module__.startswith("torch.optim") else int(step)


def _init_optimizer_states(engine, step: torch.Tensor) -> str:
    """Adam's state is created lazily at the first step; it is created here (zeros, to be overwritten) so that
    DeepSpeed's fragment API has somewhere to write. Returns the kind of optimizer: z3, hp (ZeRO-1/2 and the bf16
    optimizer: DeepSpeed's lp->hp fragment mapping), masters (ZeRO-0 in bf16/fp16: an fp32 master per parameter)
    or torch."""
    opt = engine.optimizer
    if getattr(opt, "swap_optimizer", False):
        raise ReshardError("this run swaps the optimizer state to NVMe (offload_optimizer.device nvme), which the "
                           "layout-free form cannot be written into; resume with the checkpoint's own layout or "
                           "without NVMe offload")

    def fresh(flat):
        return {"step": _step_for(opt.optimizer, step), "exp_avg": torch.zeros_like(flat),
                "exp_avg_sq": torch.zeros_like(flat)}

    if engine.zero_optimization_stage() == 3:
        for flat in opt.fp32_partitioned_groups_flat:
            opt.optimizer.state[flat] = fresh(flat)
        return "z3"
    if hasattr(opt, "fp32_groups_flat"):
        raise ReshardError("this run's optimizer keeps its fp32 masters flattened (DeepSpeed's fused mixed-precision "
                           "optimizer under ZeRO-0), which a checkpoint of another layout cannot be written into; "
                           "use ZeRO-1, or the checkpoint's own layout")
    if hasattr(opt, "fp32_groups") and hasattr(opt, "fp16_groups"):  # the unfused one: a master per parameter
        for group in opt.fp32_groups:
            for master in group:
                opt.optimizer.state[master] = fresh(master)
        return "masters"
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        for group in opt.optimizer.param_groups:
            for flat in group["params"]:
                opt.optimizer.state[flat] = fresh(flat)
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()  # points every parameter's fragments at these states
        return "hp"
    return "torch"


def wrapper_masters(optimizer) -> dict[int, torch.Tensor] | None:
    """id(parameter) -> its fp32 master in DeepSpeed's mixed-precision wrappers under ZeRO-0 (bf16 without stages,
    fp16): the unfused one keeps a master per parameter, the fused one (FusedAdam, on GPUs) one flat master per
    group, given here as views into it. None for any other optimizer."""
    from torch._utils import _unflatten_dense_tensors

    if not hasattr(optimizer, "fp16_groups"):
        return None
    if hasattr(optimizer, "fp32_groups_flat"):
        masters = [_unflatten_dense_tensors(flat, group)
                   for flat, group in zip(optimizer.fp32_groups_flat, optimizer.fp16_groups)]
    elif hasattr(optimizer, "fp32_groups"):
        masters = optimizer.fp32_groups
    else:
        return None
    return {id(p): m for group, ms in zip(optimizer.fp16_groups, masters) for p, m in zip(group, ms)}


def _set_z3(opt, p, key: str, full: torch.Tensor) -> None:
    """This rank's ZeRO-3 partition of one parameter's master or moment (the last partition is zero-padded)."""
    part, _ = opt._get_fp32_opt_state_partition(p, release_swap_buffers=False,
                                                optim_state_key=None if key == "fp32" else key)
    n, world, rank = part.numel(), opt._get_param_partition_world_size(p), opt._get_param_partition_rank(p)
    flat = torch.nn.functional.pad(full.flatten(), (0, n * world - full.numel()))
    mine = flat.narrow(0, n * rank, n)
    part.data.copy_(mine)
    if key == "fp32":
        p.ds_tensor.data.copy_(mine.to(p.ds_tensor.dtype))


def load_universal(engine, folder: Path, n_trunk: int) -> dict:
    """Raises ReshardError for a form that does not fit this model (the caller then refuses on every rank
    together). Every parameter of this rank, its master and Adam moments, the optimizer step, the LR schedule
    and DeepSpeed's counters from folder/universal. Returns the checkpoint's client state."""
    from deepspeed.pipe import PipelineModule
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    uni = folder / UNIVERSAL
    state = torch.load(uni / STATE_FILE, map_location="cpu", weights_only=True)
    kind = _init_optimizer_states(engine, state["step"])
    opt = engine.optimizer
    tp_rank, tp_world = _tensor_parallel(engine)
    pipeline = isinstance(engine.module, PipelineModule)
    masters = wrapper_masters(opt) if kind == "masters" else {}
    files = {k: safe_open(str(uni / f"{k}.safetensors"), framework="pt") for k in KEYS}
    names = set(files["fp32"].keys())
    for name, p in engine.module.named_parameters():
        meta = meta_name(name, n_trunk) if pipeline else name
        if meta == "output.weight" and meta not in names:
            meta = "tok_embeddings.weight"  # tied
        if meta not in names:
            raise ReshardError(f"{uni}: has no parameter {meta} (this run's {name}); it was written for another model")
        shape = tuple(getattr(p, "ds_shape", p.shape))
        for key in KEYS:
            full = files[key].get_tensor(meta)
            if tp_world > 1 and getattr(p, "tensor_model_parallel", False):
                full = full.chunk(tp_world, dim=p.partition_dim)[tp_rank]
            if tuple(full.shape) != shape:
                raise ReshardError(f"{uni}: {meta} {key} has shape {tuple(full.shape)}, this run's shard {shape}")
            full = full.to(p.device)
            if kind == "masters":
                master = masters[id(p)]
                (master if key == "fp32" else opt.optimizer.state[master][key]).data.copy_(full)
                if key == "fp32":
                    p.data.copy_(full)
                continue
            if kind == "z3":
                _set_z3(opt, p, key, full)
                continue
            if key == "fp32":
                p.data.copy_(full)
                if kind == "hp":
                    safe_set_full_fp32_param(p, full)
            elif kind == "hp":
                safe_set_full_optimizer_state(p, full, key)
            else:
                opt.state[p][key] = full.clone()
        if kind == "torch":
            opt.state[p]["step"] = _step_for(opt, state["step"])
    engine.lr_scheduler.load_state_dict(state["lr_scheduler"])
    engine.global_steps, engine.global_samples = state["global_steps"], state["global_samples"]
    engine.skipped_steps = state["skipped_steps"]
    return dict(state["client_state"])
