"""How the ranks are arranged: pipeline x data x tensor, on DeepSpeed's own topology.

DeepSpeed's PipelineParallelGrid is the `mpu` handed to deepspeed.initialize: ZeRO reduces gradients over its
data-parallel group and counts replicated parameters once (on tensor rank 0) in the gradient norm; the pipeline
engine sends activations along its pipe groups. Tensor-parallel layers use its model ("slice") groups. One grid
serves both layouts, which is why tensor parallelism is ours rather than DeepSpeed's AutoTP: AutoTP builds its
own groups, which know nothing of pipeline stages. Imports DeepSpeed's topology and grid classes for that.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..config import ConfigError, TrainConfig
from .tensor_parallel import TensorParallel


def check_world_size(cfg: TrainConfig, world_size: int | None = None) -> int:
    """Reject a world that the layout cannot tile, before any process group exists; returns the
    data-parallel size. A train.global_batch_size becomes train.grad_accum_steps for that size here, the one
    place that knows it before the DeepSpeed config, the data loader or a resume decision read the accumulation."""
    world = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
    model_parallel = cfg.parallel.tensor * cfg.parallel.pipeline
    if world % model_parallel:
        raise ConfigError(f"parallel: {world} processes cannot be split into groups of {model_parallel} "
                          f"(tensor {cfg.parallel.tensor} x pipeline {cfg.parallel.pipeline}); the world size "
                          f"must be a multiple of it")
    dp_world = world // model_parallel
    t = cfg.train
    if t.global_batch_size:
        per_step = t.micro_batch_size * dp_world
        if t.global_batch_size % per_step:
            raise ConfigError(f"train.global_batch_size: {t.global_batch_size} sequences cannot be made of "
                              f"micro-batches of {t.micro_batch_size} on {dp_world} data-parallel rank(s); it must "
                              f"be a multiple of {per_step} (train.micro_batch_size x data-parallel size)")
        derived = t.global_batch_size // per_step
        if t.grad_accum_steps not in (1, derived):
            raise ConfigError(f"train.global_batch_size ({t.global_batch_size}) and train.grad_accum_steps "
                              f"({t.grad_accum_steps}) disagree on {dp_world} data-parallel rank(s) (it gives "
                              f"{derived}); set one of them")
        t.grad_accum_steps = derived
    return dp_world


@dataclass
class ParallelLayout:
    tensor: TensorParallel
    dp_rank: int
    dp_world: int
    dp_group: object  # None: the whole world
    model_parallel_group: object  # the pipe x tensor ranks of one replica; None without model parallelism
    grid: object  # DeepSpeed's PipelineParallelGrid, or None without model parallelism

    @property
    def pipeline(self) -> bool:
        return self.grid is not None and self.grid.pipe_parallel_size > 1

    @property
    def gathers_weights(self) -> bool:
        """This rank receives its stage's full weights when they are gathered (tensor rank 0 of data-parallel
        rank 0); with one stage, global rank 0 is such a rank."""
        return self.tensor.rank == 0 and self.dp_rank == 0


def build_layout(cfg: TrainConfig, rank: int, world_size: int) -> ParallelLayout:
    """Collective: creates the process groups of the layout (none for plain data parallelism)."""
    dp_world = check_world_size(cfg, world_size)
    tp, pp = cfg.parallel.tensor, cfg.parallel.pipeline
    if tp == 1 and pp == 1:
        return ParallelLayout(TensorParallel(None, 0, 1), rank, dp_world, None, None, None)
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology, PipelineParallelGrid

    grid = PipelineParallelGrid(PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp_world))
    tensor = TensorParallel(grid.get_slice_parallel_group(), grid.get_tensor_model_parallel_rank(), tp)
    return ParallelLayout(tensor, grid.get_data_parallel_rank(), dp_world, grid.get_data_parallel_group(),
                          grid.get_model_parallel_group(), grid)
