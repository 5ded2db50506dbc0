"""The one seam between the trainer and DeepSpeed: the engine, and how a step runs on it for each layout.

Imports deepspeed because this module is where `deepspeed.initialize` is called. It owns what the engine must
be told or asked about: the parameter groups, the grad-ready hook on the model's MTPLoss (ZeRO reduces a
gradient as soon as its hook fires, and the sequential heads write the shared norm's and unembedding's gradient
once per head), the factor the sequential heads must apply before the engine's backward (its loss scale over
the accumulation steps), and one step strategy per layout:

    DataParallelSteps  forward/backward/step per micro-batch on a DeepSpeedEngine (ZeRO-0..3, tensor parallel)
    PipelineSteps      train_batch/eval_batch on a PipelineEngine, the heads and loss on the last stage

Both give the trainer the same three things (a train step's loss, head losses and gradient norm; an evaluation's
head losses and draft-acceptance counts; the full weights), so the trainer has no layout branches. A train step's
figures are device tensors: nothing in the step waits for the device; the trainer reads them at its log steps.
"""

from __future__ import annotations

import deepspeed
import torch
import torch.distributed as dist

from mtplm.inference.acceptance import acceptance_counts

from .checkpointing.reshard import wrapper_masters
from .config import TrainConfig
from .ds_config import precision, zero_stage
from .lr_schedule import scheduler_factory
from .parallel.layout import ParallelLayout
from .parallel.pipeline import build_pipeline_module, gather_pipeline_state_dict
from .parallel.tensor_parallel import gather_full_state_dict


def ds_grad_ready_hook(params, ready: bool) -> None:
    """ZeRO reduces a gradient as soon as its hook fires; the sequential heads produce the shared norm's and
    unembedding's gradient once per head, so they are held back until the last head (DeepSpeed's own
    TiledFusedLogitsLoss uses the same flag)."""
    for p in params:
        p.ds_grad_is_ready = ready


def loss_grad_scale(engine) -> float:
    """The factor engine.backward() applies to the loss: 1/GAS, times the fp16 loss scale if any."""
    scale = 1.0
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    if scaler is not None and hasattr(scaler, "cur_scale"):
        scale = float(scaler.cur_scale)
    return scale / engine.gradient_accumulation_steps()


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: norms (1-D) are not decayed, as in Megatron and nanoGPT."""
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        shape = getattr(p, "ds_shape", p.shape)  # a ZeRO-3 partitioned parameter's own tensor is empty
        (decay if len(shape) >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_engine(cfg: TrainConfig, ds_cfg: dict, layout: ParallelLayout, model, dp_world: int):
    """Collective: the DeepSpeed engine over the built model, wrapped in the step strategy of the layout."""
    t = cfg.train
    model.loss.engine_owns_grads = True  # ZeRO reduces and frees head gradients before the backward
    if zero_stage(ds_cfg) > 0:
        model.loss.grad_ready_hook = ds_grad_ready_hook
    pipe_loss = None
    if layout.pipeline:
        # The pipeline module takes the model's modules (its heads stage shares model.loss); the engine gets its
        # grid from the module.
        model, pipe_loss = build_pipeline_module(
            model, layout.grid.topology(), cfg.parallel.pipeline_partition,
            checkpoint_interval=t.activation_checkpoint_interval
            if t.activation_checkpointing and t.activation_checkpoint_policy == "full" else 0)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, cfg.optim.weight_decay), config=ds_cfg,
        lr_scheduler=scheduler_factory(cfg.optim, t.steps),
        mpu=None if layout.pipeline else layout.grid, dist_init_required=False)
    steps = PipelineSteps if layout.pipeline else DataParallelSteps
    return steps(cfg, ds_cfg, layout, engine, model, dp_world, pipe_loss)


class Steps:
    """What both layouts share: the batch split, the gradient norm, averages over data-parallel replicas."""

    def __init__(self, cfg: TrainConfig, ds_cfg: dict, layout: ParallelLayout, engine, model, dp_world: int,
                 pipe_loss=None):
        self.cfg, self.layout, self.engine, self.model, self.dp_world = cfg, layout, engine, model, dp_world
        self.pipe_loss = pipe_loss  # the pipeline's loss function, which collects the per-head losses
        self.n_heads = cfg.model.n_future_tokens
        # DeepSpeed clips but keeps no gradient norm on this path, so the norm is taken here.
        self.own_grad_norm = zero_stage(ds_cfg) == 0 and precision(ds_cfg) == "fp32"

    def describe(self) -> list[str]:
        return []

    def split(self, batch: torch.Tensor):
        batch = batch.to(self.engine.device, non_blocking=True)
        return batch[:, :self.cfg.data.seq_len], batch[:, 1:]

    def grad_norm(self) -> torch.Tensor:
        """Global L2 norm of the (averaged) gradients, on the device: tensor-parallel shards summed over their
        group, replicated parameters counted once."""
        tp = self.layout.tensor
        total = torch.zeros((), dtype=torch.float64, device=self.engine.device)
        for p in {id(p): p for p in self.model.parameters()}.values():
            if getattr(p, "ds_pipe_replicated", False):
                continue  # a tied weight's copy on a later stage (its gradient is the first stage's)
            if p.grad is not None and (tp.rank == 0 or getattr(p, "tensor_model_parallel", False)):
                total += p.grad.detach().double().pow(2).sum()
        if self.layout.model_parallel_group is not None:  # every stage and tensor shard of this replica
            dist.all_reduce(total, group=self.layout.model_parallel_group)
        return total.sqrt()

    def reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach().float().to(self.engine.device)
        if self.dp_world > 1:
            dist.all_reduce(t, group=self.layout.dp_group)
            t = t / self.dp_world
        return t

    def full_state_dict(self, keep: bool) -> dict[str, torch.Tensor]:
        """Collective: this replica's full weights with Meta's names on the rank with keep=True (one replica's
        tensor rank 0 of the first stage); {} elsewhere."""
        # bf16/fp16: the optimizer's fp32 masters, not the rounded working copy the forward uses.
        mixed = self.engine.bfloat16_enabled() or self.engine.fp16_enabled()
        return gather_full_state_dict(self.model, self.layout.tensor, keep=keep,
                                      master=fp32_master(self.engine.optimizer) if mixed else None)


def fp32_master(optimizer):
    """p -> the fp32 master of parameter p (its full tensor, or this rank's tensor shard), or None. DeepSpeed's
    fragment API covers ZeRO-1/2/3 and its bf16 optimizer; its mixed-precision wrappers under ZeRO-0 are read
    directly (reshard.wrapper_masters)."""
    from deepspeed.utils import safe_get_full_fp32_param

    masters = wrapper_masters(optimizer)
    if masters is None:
        return safe_get_full_fp32_param

    def master(p):
        m = masters.get(id(p))
        return None if m is None else m.detach()

    return master


class DataParallelSteps(Steps):
    def train_step(self, batches) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | float | None]:
        """(loss, per-head losses, gradient norm) of one optimizer step, averaged over data-parallel replicas, on
        the device (DeepSpeed's own norm may be a float, or None when it keeps none)."""
        # Summed on the device: no host synchronisation until the step's figures are read.
        head_sum = torch.zeros(self.n_heads, device=self.engine.device)
        loss_sum = torch.zeros((), device=self.engine.device)
        gas = self.cfg.train.grad_accum_steps
        grad_norm = None
        for micro in range(gas):
            tokens, labels = self.split(next(batches))
            out = self.engine(tokens, labels, grad_scale=loss_grad_scale(self.engine))
            self.engine.backward(out.loss)
            if micro == gas - 1 and self.own_grad_norm:
                grad_norm = self.grad_norm()  # before engine.step() clips; the gradients are already averaged
            self.engine.step()
            head_sum += out.head_losses.detach().float()
            loss_sum += out.loss.detach().float()
        head_losses = self.reduce_mean(head_sum / gas)
        loss = self.reduce_mean(loss_sum / gas)
        return loss, head_losses, grad_norm if grad_norm is not None else self.engine.get_global_grad_norm()

    def evaluate(self, batches: list, with_acceptance: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(mean per-head losses, draft-acceptance counts (AcceptanceCounts.as_tensor) or None) over the
        micro-batches (no gradients), averaged over data-parallel replicas."""
        self.engine.eval()
        head_sum, acceptance = torch.zeros(self.n_heads), None
        for tokens, labels in map(self.split, batches):
            out = self.engine(tokens, labels, head_argmax=with_acceptance)
            head_sum += out.head_losses.float().cpu()
            if with_acceptance:
                counts = acceptance_counts(out.head_argmax).as_tensor()
                acceptance = counts if acceptance is None else acceptance + counts
        self.engine.train()
        if acceptance is not None:
            acceptance = self.reduce_mean(acceptance).cpu()
        return self.reduce_mean(head_sum / len(batches)).cpu(), acceptance


class PipelineSteps(Steps):
    def __init__(self, *args):
        super().__init__(*args)
        self._grad_norm = None
        if self.own_grad_norm:
            self._record_grad_norm()

    def describe(self) -> list[str]:
        parts = self.engine.module.parts
        return ["pipeline stages (layer 0 embedding, last the heads): " + ", ".join(
            f"stage {s} layers {parts[s]}-{parts[s + 1] - 1}" for s in range(len(parts) - 1))]

    def _record_grad_norm(self) -> None:
        """ZeRO-0 in fp32 keeps no gradient norm, and the pipeline engine steps (and zeroes the gradients)
        inside train_batch, so the norm is taken where DeepSpeed would clip (or, with clipping off, just before
        the optimizer steps). The clipping is ours too: DeepSpeed 0.19.8's clip_grad_norm_ counts replicated
        parameters only where the grid's model-parallel rank is 0, which in the pipeline layout is the first
        stage only, so it would clip with a norm that leaves the other stages out (measured: PP=2 drifted
        from the single-process run). Same formula as DeepSpeed's: scale by min(1, clip / (norm + 1e-6))."""
        def record(*_):
            self._grad_norm = self.grad_norm()

        def clip():  # on the device, as DeepSpeed's clip_grad_norm_: no host synchronisation
            record()
            coef = torch.clamp(self.cfg.optim.grad_clip / (self._grad_norm + 1e-6), max=1.0)
            for p in self.model.parameters():
                if p.grad is not None:
                    p.grad.mul_(coef.to(p.grad.dtype))

        if self.cfg.optim.grad_clip > 0:
            self.engine.clip_fp32_gradients = clip
        else:
            self.engine.optimizer.register_step_pre_hook(record)

    def _head_losses(self) -> torch.Tensor:
        """Collective: mean per-head losses of the last train/eval batch (see _from_last_stage)."""
        loss = self.pipe_loss
        return self._from_last_stage((self.n_heads,), lambda: loss.head_sum / loss.count)

    def _from_last_stage(self, shape, value) -> torch.Tensor:
        """Collective: value() computed on the last pipeline stage, sent to every rank of its pipeline, then
        averaged over data-parallel replicas, on the device."""
        grid = self.layout.grid
        device = self.engine.device  # made there, not copied from the host: nothing waits
        t = value().float().to(device) if grid.is_last_stage else torch.zeros(shape, device=device)
        dist.broadcast(t, src=grid.stage_to_global(grid.pipe_parallel_size - 1), group=grid.get_pipe_parallel_group())
        return self.reduce_mean(t)

    def train_step(self, batches) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | float | None]:
        self.pipe_loss.reset()
        self.pipe_loss.grad_scale = loss_grad_scale(self.engine)
        loss = self.engine.train_batch(map(self.split, batches))
        grad_norm = self._grad_norm if self.own_grad_norm else self.engine.get_global_grad_norm()
        return loss, self._head_losses(), grad_norm

    def evaluate(self, batches: list, with_acceptance: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        self.pipe_loss.reset()
        self.pipe_loss.with_acceptance = with_acceptance
        # The validation split may hold fewer than eval_iters micro-batches: the engine must be told.
        self.engine.eval_batch(map(self.split, batches), num_micro_batches=len(batches))
        self.pipe_loss.with_acceptance = False
        self.engine.train()
        head_losses, acceptance = self._head_losses().cpu(), None
        if with_acceptance:
            shape = (4, self.n_heads - 1)  # AcceptanceCounts.as_tensor()
            acceptance = self._from_last_stage(shape, lambda: self.pipe_loss.acceptance.as_tensor()).cpu()
        return head_losses, acceptance

    def full_state_dict(self, keep: bool) -> dict[str, torch.Tensor]:
        state = super().full_state_dict(keep)  # this stage's weights, one replica's tensor rank 0
        if not keep:
            return state
        return gather_pipeline_state_dict(state, self.cfg.model.n_trunk_layers, self.layout.grid,
                                          keep=dist.get_rank() == 0)
