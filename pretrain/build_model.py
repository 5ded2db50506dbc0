"""Build the model a rank trains: construction (activation checkpointing is a model option), initial weights,
tensor parallelism.

Under ZeRO-0/1/2 the lean build (parallel/lean_init.py) constructs the model on the meta device and materialises
only what the rank keeps (its pipeline stage, its tensor shards), one full tensor at a time, with the values of
the whole build from the same seed.

Under ZeRO-3 the model is constructed inside DeepSpeed's `zero.Init`, as Megatron-DeepSpeed and Hugging Face do:
every module's parameters are broadcast from data-parallel rank 0 and cut into per-rank partitions as soon as
the module exists, so a rank never holds more than one module's full weights besides its own 1/dp share, instead
of the whole fp32 model (28 GB for a 7B model, on every rank of a node at once). With `offload_param` in the
DeepSpeed config the partitions go straight to CPU memory. The model initialises each weight inside the module
that owns it, so zero.Init keeps the initial values. zero.Init creates them in the training dtype on the
accelerator, though: in bf16/fp16 or on a GPU a ZeRO-3 run starts from other draws of the same distributions
than a ZeRO-0/1/2 run with the same seed (fp32 on a CPU gives the same values, which the tests compare).

Everything done to the weights afterwards (loading `train.init_from`, cutting tensor-parallel shards, which are
partitioned as soon as they are cut) works one module or one parameter at a time inside
`zero.GatheredParameters`, which is a no-op on plain parameters, so the same code serves every ZeRO stage.

Imports deepspeed for zero.Init, the ZeRO-3 construction; deepspeed.initialize is engine.py's.
"""

from __future__ import annotations

import deepspeed

from mtplm.model.transformer import MTPTransformer

from .checkpointing.init_from import initial_weights_reader, load_initial_weights
from .config import TrainConfig
from .ds_config import zero_stage
from .parallel.compile import apply_compile
from .parallel.layout import ParallelLayout
from .parallel.lean_init import build_lean
from .parallel.recompute import apply_selective_recompute
from .parallel.tensor_parallel import apply_tensor_parallel


def build_model(cfg: TrainConfig, ds_cfg: dict, layout: ParallelLayout) -> tuple[MTPTransformer, list[str]]:
    """The rank's model, before deepspeed.initialize (and before the pipeline layout takes its modules);
    returns it and notes on how init_from's weights were adapted. Collective under ZeRO-3."""
    t, stage = cfg.train, zero_stage(ds_cfg)
    # The pipeline layout recomputes with DeepSpeed's own interval instead (same meaning; see parallel/pipeline.py).
    full = t.activation_checkpointing and t.activation_checkpoint_policy == "full"
    interval = t.activation_checkpoint_interval if full and not layout.pipeline else 0

    def make():
        return MTPTransformer(cfg.model, loss_impl=t.loss_impl, ce_chunk_tokens=t.ce_chunk_tokens or None,
                              activation_checkpoint_interval=interval)

    if stage != 3:
        saved = (lambda whole: initial_weights_reader(whole, t.init_from)) if t.init_from else None
        model, notes = build_lean(make, layout, cfg.parallel.pipeline_partition, saved)
    else:  # partitioned over the data-parallel group that the engine will use
        with deepspeed.zero.Init(config_dict_or_path=ds_cfg, data_parallel_group=layout.dp_group, mpu=layout.grid):
            model = make()
        notes = load_initial_weights(model, t.init_from) if t.init_from else []
        apply_tensor_parallel(model, layout.tensor)
    if t.activation_checkpointing and t.activation_checkpoint_policy == "selective":
        apply_selective_recompute(model)
    if t.compile:
        apply_compile(model, fullgraph=stage != 3, backend=t.compile_backend)
    return model, notes


def local_parameter_count(model) -> tuple[int, int]:
    """(elements this rank stores, elements of the model or of this rank's tensor-parallel shard of it): the two
    differ once ZeRO-3 has partitioned it, or when the lean build left other pipeline stages on the meta device."""
    params = {id(p): p for p in model.parameters()}.values()
    local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else 0 if p.is_meta else p.numel() for p in params)
    return local, sum(getattr(p, "ds_numel", p.numel()) for p in params)
