"""The lean build (ZeRO-0/1/2): a rank materialises only what it keeps, its pipeline stage and its tensor shards,
with exactly the values of the whole build, so its peak while building is about its own share instead of the
whole fp32 model (28 GB for Meta's 7B shape, on every rank of a node at once; 280 GB at 70B).

The model is constructed on the meta device (no memory, no random numbers drawn), cut for tensor parallelism
there, and then initialised one module at a time: every module that owns parameters redoes its own
initialisation (reset_parameters, see model/transformer.py) on full-size scratch tensors, and the rank keeps its
slices of them. A first pass does this in construction order, keeping nothing, only to note the random
generator's state before each module the rank keeps from; tied weights and other stages' weights are drawn and
dropped, so the generator ends where the whole construction leaves it. A second pass redraws the kept modules
from their noted states, largest first, so the model's large tensors (embedding, unembedding) are never drawn
while the rank already holds the rest of its share: the peak is the share plus a small tensor, not plus the
largest. Every rank's slices are those of the single-process model built from the same seed. With
`train.init_from` nothing is drawn: each kept slice is read alone from the safetensors file.

Parameters of other pipeline stages stay on the meta device; the pipeline module drops their layers. ZeRO-3
builds under zero.Init instead (pretrain/build_model.py), which partitions every module as soon as it exists.
Where saved weights come from is the caller's (checkpointing/init_from.py): the build only asks for slices.
"""

from __future__ import annotations

import math
import mmap
from collections import defaultdict
from typing import Callable

import torch
from torch import nn

from .layout import ParallelLayout
from .pipeline import stage_parameters
from .tensor_parallel import apply_tensor_parallel


def build_lean(make_model: Callable[[], nn.Module], layout: ParallelLayout, partition_method: str,
               initial_weights: Callable | None = None) -> tuple[nn.Module, list[str]]:
    """make_model() constructs the whole model (an MTPTransformer); returns the rank's model, cut for tensor
    parallelism, its kept parameters materialised on the default device and the others on the meta device, and
    notes on how saved weights were adapted. initial_weights(model), given the whole model on the meta device,
    returns (read, notes) when the weights are read rather than drawn: read(name, dim, start, stop) is the saved
    parameter, or its [start:stop] along dim."""
    with torch.device("meta"):
        model = make_model()
    if any(True for _ in model.buffers()):
        raise TypeError(f"{type(model).__name__} has buffers, which the lean build does not initialise")
    order = _initialisation_order(model)  # taken before tensor parallelism replaces the modules
    full_shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    read, notes = initial_weights(model) if initial_weights else (None, [])
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

    if read is not None:
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

    # Pass 1, in construction order: draw every module (the random stream must advance as in the whole build)
    # and note the generator's state before each module that owns a parameter this rank keeps. A tied
    # parameter keeps the draw of its first owner, as in the whole build.
    final = dict(model.named_parameters(remove_duplicate=False))
    claimed, redraws = set(), []
    for prefix, module in order:
        state = _rng_state()
        mine = set()
        for attr in (a for a, p in module._parameters.items() if p is not None):
            p = final[f"{prefix}.{attr}" if prefix else attr]
            if id(p) in kept and id(p) not in claimed:
                claimed.add(id(p))
                mine.add(attr)
        if mine:
            redraws.append((prefix, module, state, mine))
        _redraw(module)  # dropped at once: one scratch tensor at a time
    end = _rng_state()
    # Pass 2: redraw the kept modules from their noted states, largest first. A rank then never holds its
    # whole share and a large scratch tensor at once (the last stage's unembedding is drawn last in
    # construction order): its peak is its share plus the largest full tensor drawn after the share is nearly
    # complete, i.e. a small one, rather than its share plus the model's largest tensor.
    redraws.sort(key=lambda r: -sum(p.numel() for p in r[1]._parameters.values() if p is not None))
    for prefix, module, state, mine in redraws:
        _set_rng_state(state)
        for attr, full in _redraw(module):
            if attr not in mine:
                continue
            p = final[f"{prefix}.{attr}" if prefix else attr]
            if getattr(p, "tensor_model_parallel", False):  # the cut tensor_parallel._shard makes
                full = full.chunk(tp.world, dim=p.partition_dim)[tp.rank]
            materialise(p, full.clone())  # out of the scratch map
        del full
    _set_rng_state(end)
    return model, notes


def _rng_state() -> torch.Tensor:
    # The scratch tensors are created on the default device, so its generator draws them.
    device = torch.get_default_device()
    return torch.get_rng_state() if device.type == "cpu" else torch.get_device_module(device).get_rng_state(device)


def _set_rng_state(state: torch.Tensor) -> None:
    device = torch.get_default_device()
    if device.type == "cpu":
        torch.set_rng_state(state)
    else:
        torch.get_device_module(device).set_rng_state(state, device)


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
    scratch = {k: _scratch(p.shape, p.dtype) for k, p in own.items()}
    module._parameters.update(scratch)
    try:
        module.reset_parameters()
    finally:
        module._parameters.update(own)
    return list(scratch.items())


def _scratch(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor on the default device; on a CPU, in its own anonymous memory map, which goes back
    to the system the moment the tensor is freed. From malloc, the freed scratch memory would stay in the process
    (glibc keeps the holes between the kept slices and the generator states), and the resident set would grow
    past the rank's share plus one tensor."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes == 0 or torch.get_default_device().type != "cpu":
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype).view(shape)
