"""The lean build (ZeRO-0/1/2): a rank materialises only what it keeps, its pipeline stage and its tensor shards,
with exactly the values of the whole build, so its peak while building is its own share plus one full tensor
instead of the whole fp32 model (28 GB for Meta's 7B shape, on every rank of a node at once; 280 GB at 70B).

The model is constructed on the meta device (no memory, no random numbers drawn), cut for tensor parallelism
there, and then initialised one parameter at a time: every module that owns parameters redoes its own
initialisation (reset_parameters, see model/transformer.py) on a full-size scratch tensor, in construction
order, and the rank keeps its slice of it. The scratch tensors draw the same random numbers in the same order
as the whole construction does (tied weights and other stages' weights are drawn too, then dropped), so every
rank's slices are those of the single-process model built from the same seed, and the random generator ends in
the same state. With `train.init_from` nothing is drawn: each kept slice is read alone from the safetensors file.

Parameters of other pipeline stages stay on the meta device; the pipeline module drops their layers. ZeRO-3
builds under zero.Init instead (build_model.py), which partitions every module as soon as it exists.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from mtplm.model.weights import WEIGHTS_FILE

from .init_from import initial_weight_sources, saved_weights_reader
from .parallel_layout import ParallelLayout
from .pipeline import stage_parameters
from .tensor_parallel import apply_tensor_parallel


def build_lean(make_model: Callable[[], nn.Module], layout: ParallelLayout, partition_method: str,
               init_from: str | Path | None = None) -> tuple[nn.Module, list[str]]:
    """make_model() constructs the whole model (an MTPTransformer); returns the rank's model, cut for tensor
    parallelism, its kept parameters materialised on the default device and the others on the meta device, and
    init_from's notes (see init_from.py)."""
    with torch.device("meta"):
        model = make_model()
    if any(True for _ in model.buffers()):
        raise TypeError(f"{type(model).__name__} has buffers, which the lean build does not initialise")
    order = _initialisation_order(model)  # taken before tensor parallelism replaces the modules
    full_shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    source, notes = initial_weight_sources(model, init_from) if init_from else (None, [])
    tp = layout.tensor
    apply_tensor_parallel(model, tp)
    if layout.pipeline:
        kept = stage_parameters(model, layout.grid.pipe_parallel_size, layout.grid.get_stage_id(), partition_method)
    else:
        kept = list(model.parameters())
    kept = {id(p) for p in kept}
    owners = defaultdict(list)  # a tied parameter has two
    for module in model.modules():
        for attr, p in module._parameters.items():
            if p is not None:
                owners[id(p)].append((module, attr))

    def materialise(p: nn.Parameter, value: torch.Tensor) -> None:
        new = nn.Parameter(value.to(p.dtype), requires_grad=p.requires_grad)
        new.__dict__.update(p.__dict__)  # tensor_model_parallel, partition_dim
        for module, attr in owners[id(p)]:
            module._parameters[attr] = new

    if init_from:
        read = saved_weights_reader(Path(init_from) / WEIGHTS_FILE, source, full_shapes, model.cfg.tie_embeddings)
        for name, p in list(model.named_parameters()):
            if id(p) not in kept:
                continue
            if getattr(p, "tensor_model_parallel", False):
                dim = p.partition_dim
                start = tp.rank * -(-full_shapes[name][dim] // tp.world)  # torch.chunk's split
                materialise(p, read(name, dim, start, start + p.shape[dim]))
            else:
                materialise(p, read(name))
        return model, notes

    final = dict(model.named_parameters(remove_duplicate=False))
    done = set()
    for prefix, module in order:
        for attr, full in _redraw(module):
            p = final[f"{prefix}.{attr}" if prefix else attr]
            if id(p) in done or id(p) not in kept:
                continue  # drawn all the same: the random stream must advance as in the whole build
            done.add(id(p))
            if getattr(p, "tensor_model_parallel", False):  # the cut tensor_parallel._shard makes
                full = full.chunk(tp.world, dim=p.partition_dim)[tp.rank].clone()
            materialise(p, full)
        del full  # before the next module draws: one scratch tensor at a time
    return model, notes


def _initialisation_order(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules that own parameters, in construction order (each is registered as soon as it is built)."""
    order = [(prefix, m) for prefix, m in model.named_modules() if any(p is not None for p in m._parameters.values())]
    for prefix, m in order:
        if not hasattr(m, "reset_parameters"):
            raise TypeError(f"{type(m).__name__} ({prefix or 'the model'}) owns parameters but has no "
                            f"reset_parameters(), which the lean build needs to initialise them")
    return order


def _redraw(module: nn.Module):
    """(name, full tensor) of each of the module's own parameters, initialised anew by its reset_parameters()
    on scratch tensors of its parameters' shapes, dtypes and the default device, as its construction did."""
    own = {k: p for k, p in module._parameters.items() if p is not None}
    scratch = {k: torch.empty(p.shape, dtype=p.dtype) for k, p in own.items()}
    module._parameters.update(scratch)
    try:
        module.reset_parameters()
    finally:
        module._parameters.update(own)
    return list(scratch.items())
