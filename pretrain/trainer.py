"""The training loop on a DeepSpeed engine: build, (resume,) train, validate, log, checkpoint."""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from mtplm.data.fingerprint import describe, digest
from mtplm.inference.acceptance import AcceptanceCounts, acceptance_counts
from mtplm.model.flops import count_params, flops_per_token

from .build_model import build_model, local_parameter_count
from .checkpoint import (DATA_KEY, CheckpointSaveError, checkpoint_dir, decide_resume, load_checkpoint,
                         save_checkpoint)
from .config import TrainConfig
from .consistency import agree_on_data, check_shared_folder
from .distributed import DistInfo, init_distributed
from .ds_config import build_ds_config, precision, zero_stage
from .lr_schedule import scheduler_factory
from .metrics_log import MetricsLogger
from .parallel_layout import build_layout, check_world_size
from .pipeline import build_pipeline_module, gather_pipeline_state_dict
from .preemption import StopSignal
from .tensor_parallel import gather_full_state_dict

# Dense bf16 peak of common accelerators, for MFU; override with train.peak_tflops.
_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


@dataclass
class TrainResult:
    step: int
    train_log: list[dict] = field(default_factory=list)  # one record per optimizer step (rank 0's view)
    eval_log: list[dict] = field(default_factory=list)
    stopped_by_signal: bool = False
    stop_signal: int | None = None  # the signal this rank received (None: another rank's stop was agreed)


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


def peak_flops(cfg: TrainConfig) -> float | None:
    if cfg.train.peak_tflops > 0:
        return cfg.train.peak_tflops * 1e12
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, tflops in _PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
    return None


class Trainer:
    def __init__(self, cfg: TrainConfig, data_loaders=None, dist_info: DistInfo | None = None):
        """data_loaders: for tests, a callable (consumed_samples, dp_rank, dp_world) -> (train, valid); by default
        built from cfg.data."""
        # From the start: a stop signal during start-up (SIGUSR1's default action is to exit) must not kill a
        # rank; it is honoured after the first step. train() restores the previous handlers.
        self.stop = StopSignal()
        try:
            self._build(cfg, data_loaders, dist_info)
        except BaseException:
            self.stop.restore()
            raise

    def _build(self, cfg: TrainConfig, data_loaders, dist_info: DistInfo | None) -> None:
        self.cfg = cfg
        t = cfg.train
        # Everything that can be refused is checked before any process group exists.
        self.dp_world = check_world_size(cfg, dist_info.world_size if dist_info else None)
        on_cpu = dist_info.on_cpu if dist_info else not torch.cuda.is_available()
        ds_cfg = build_ds_config(cfg, t.deepspeed_config, self.dp_world, on_cpu)
        self.dist = dist_info or init_distributed()
        self.layout = build_layout(cfg, self.dist.rank, self.dist.world_size)
        import deepspeed

        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        self.out_dir = Path(cfg.train.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        # Before anything is built: every rank reads the same data, sees one checkpoint folder, and resumes from
        # the checkpoint rank 0 chose; otherwise all ranks stop here together.
        self.data_fingerprint = agree_on_data(cfg.data, cfg.model.n_future_tokens)
        check_shared_folder(checkpoint_dir(t.out_dir))
        resume_from = decide_resume(cfg)
        model, init_notes = build_model(cfg, ds_cfg, self.layout)
        self.local_params, self.total_params = local_parameter_count(model)
        self.zero_stage, self.precision = zero_stage(ds_cfg), precision(ds_cfg)
        # DeepSpeed clips but keeps no gradient norm on this path, so the trainer takes it itself.
        self.own_grad_norm = self.zero_stage == 0 and self.precision == "fp32"
        if self.zero_stage > 0:
            model.grad_ready_hook = ds_grad_ready_hook
        self.pipe_loss = None
        if self.layout.pipeline:
            # The pipeline module takes model's modules; the engine gets its grid from the module.
            model, self.pipe_loss = build_pipeline_module(
                model, self.layout.grid.topology(), cfg.parallel.pipeline_partition, t.loss_impl,
                checkpoint_interval=t.activation_checkpoint_interval if t.activation_checkpointing else 0)
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, cfg.optim.weight_decay), config=ds_cfg,
            lr_scheduler=scheduler_factory(cfg.optim, t.steps),
            mpu=None if self.layout.pipeline else self.layout.grid, dist_init_required=False)
        self.model = model
        self._pipeline_grad_norm = None
        if self.layout.pipeline and self.own_grad_norm:
            self._record_pipeline_grad_norm()
        self.logger = MetricsLogger(self.out_dir, self.dist.rank, t.steps, 0, t.metrics_file,
                                    getattr(self.engine, "monitor", None))
        for note in init_notes:
            self.logger.info(f"init_from {t.init_from}: {note}")

        self.step, self.consumed_samples = 0, 0
        if resume_from is not None:
            state = load_checkpoint(self.engine, cfg, resume_from, self.data_fingerprint)
            self.step, self.consumed_samples = int(state["step"]), int(state["consumed_samples"])
            self.engine.lr_scheduler.apply()  # ZeRO loads its optimizer state (and the saved rate) last
            self.logger.info(f"resumed from {resume_from} at step {self.step} "
                             f"({self.consumed_samples} samples consumed)")
        self.logger.start_at(self.step)  # records past the checkpoint belong to the run being replaced
        build = data_loaders or self._build_loaders
        self.train_loader, self.valid_loader = build(self.consumed_samples, self.layout.dp_rank, self.dp_world)
        self._describe()

    def _build_loaders(self, consumed_samples: int, dp_rank: int, dp_world: int):
        from mtplm.data.loader import build_data_loaders
        from mtplm.data.tokenizer import load_tokenizer

        tok_sha = load_tokenizer(self.cfg.data.tokenizer).sha256 if self.cfg.data.tokenizer else None
        return build_data_loaders(
            self.cfg.data, n_future_tokens=self.cfg.model.n_future_tokens, vocab_size=self.cfg.model.vocab_size,
            micro_batch_size=self.cfg.train.micro_batch_size, dp_rank=dp_rank,
            dp_world_size=dp_world, consumed_train_samples=consumed_samples,
            pin_memory=not self.dist.on_cpu, tokenizer_sha256=tok_sha)

    def _describe(self) -> None:
        if self.data_fingerprint is not None:
            fp = self.data_fingerprint
            self.logger.info(f"data fingerprint {digest(fp)}, the same on all {self.dist.world_size} ranks: "
                             + "; ".join(f"{d['path']} ({describe(d)})" for d in fp["datasets"]))
        c = count_params(self.cfg.model)
        f = flops_per_token(self.cfg.model, self.cfg.data.seq_len)
        self.logger.info(
            f"model: {c.total / 1e6:.2f}M parameters (embedding {c.embedding / 1e6:.2f}M, trunk blocks "
            f"{c.trunk_blocks / 1e6:.2f}M, {self.cfg.model.n_future_tokens} heads {c.heads / 1e6:.2f}M, norm+unembedding "
            f"{c.shared_head / 1e6:.2f}M); {f.training / 1e6:.1f} MFLOP/token per training step "
            f"(trunk fwd {f.trunk_forward / 1e6:.1f}, heads fwd {f.heads_forward / 1e6:.1f})")
        self.logger.info(
            f"world {self.dist.world_size} on {'CPU' if self.dist.on_cpu else 'GPU'}, ZeRO-{self.zero_stage}, "
            f"{self.precision}, micro-batch {self.cfg.train.micro_batch_size} x accumulation "
            f"{self.cfg.train.grad_accum_steps} x data-parallel {self.dp_world}, tensor-parallel "
            f"{self.layout.tensor.world}, pipeline {self.cfg.parallel.pipeline}, loss path {self.cfg.train.loss_impl}")
        if self.zero_stage == 3:
            tp = self.layout.tensor.world
            shard = "the model" if tp == 1 else f"its 1/{tp} tensor-parallel shard of the model"
            self.logger.info(f"built under zero.Init: this rank keeps {self.local_params / 1e6:.2f}M of the "
                             f"{self.total_params / 1e6:.2f}M parameters of {shard}")
        if self.layout.pipeline:
            parts = self.engine.module.parts
            self.logger.info("pipeline stages (layer 0 embedding, last the heads): " + ", ".join(
                f"stage {s} layers {parts[s]}-{parts[s + 1] - 1}" for s in range(len(parts) - 1)))

    def _split(self, batch: torch.Tensor):
        batch = batch.to(self.engine.device, non_blocking=True)
        seq_len = self.cfg.data.seq_len
        return batch[:, :seq_len], batch[:, 1:]

    def _grad_norm(self) -> float:
        """Global L2 norm of the (averaged) gradients: tensor-parallel shards summed over their group,
        replicated parameters counted once."""
        tp = self.layout.tensor
        total = torch.zeros((), dtype=torch.float64)
        for p in {id(p): p for p in self.model.parameters()}.values():
            if p.grad is not None and (tp.rank == 0 or getattr(p, "tensor_model_parallel", False)):
                total += p.grad.detach().double().pow(2).sum().cpu()
        if self.layout.model_parallel_group is not None:  # every stage and tensor shard of this replica
            dist.all_reduce(total, group=self.layout.model_parallel_group)
        return float(total.sqrt())

    def _reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach().float().to(self.engine.device)
        if self.dp_world > 1:
            dist.all_reduce(t, group=self.layout.dp_group)
            t = t / self.dp_world
        return t

    def _pipeline_head_losses(self) -> torch.Tensor:
        """Collective: mean per-head losses of the last train/eval batch, from the last stage to every rank
        of its pipeline, then averaged over data-parallel replicas."""
        loss = self.pipe_loss
        return self._from_last_stage((self.cfg.model.n_future_tokens,), lambda: loss.head_sum.cpu() / loss.count)

    def _from_last_stage(self, shape, value) -> torch.Tensor:
        """Collective: value() computed on the last pipeline stage, sent to every rank of its pipeline, then
        averaged over data-parallel replicas."""
        grid = self.layout.grid
        t = value().float() if grid.is_last_stage else torch.zeros(shape, dtype=torch.float32)
        t = t.to(self.engine.device)
        dist.broadcast(t, src=grid.stage_to_global(grid.pipe_parallel_size - 1), group=grid.get_pipe_parallel_group())
        return self._reduce_mean(t).cpu()

    def _record_pipeline_grad_norm(self) -> None:
        """ZeRO-0 in fp32 keeps no gradient norm, and the pipeline engine steps (and zeroes the gradients)
        inside train_batch, so the norm is taken where DeepSpeed would clip (or, with clipping off, just before
        the optimizer steps). The clipping is ours too: DeepSpeed 0.19.8's clip_grad_norm_ counts replicated
        parameters only where the grid's model-parallel rank is 0, which in the pipeline layout is the first
        stage only, so it would clip with a norm that leaves the other stages out (measured: PP=2 drifted
        from the single-process run). Same formula as DeepSpeed's: scale by min(1, clip / (norm + 1e-6))."""
        def record(*_):
            self._pipeline_grad_norm = self._grad_norm()

        def clip():
            record()
            coef = self.cfg.optim.grad_clip / (self._pipeline_grad_norm + 1e-6)
            if coef < 1.0:
                for p in self.model.parameters():
                    if p.grad is not None:
                        p.grad.mul_(coef)

        if self.cfg.optim.grad_clip > 0:
            self.engine.clip_fp32_gradients = clip
        else:
            self.engine.optimizer.register_step_pre_hook(record)

    def _pipeline_train_step(self, batches, lr: float) -> dict:
        self.pipe_loss.reset()
        self.pipe_loss.grad_scale = loss_grad_scale(self.engine)
        loss = float(self.engine.train_batch(map(self._split, batches)))
        grad_norm = self._pipeline_grad_norm if self.own_grad_norm else self.engine.get_global_grad_norm()
        return self._train_metrics(loss, self._pipeline_head_losses(), grad_norm, lr)

    def _train_metrics(self, loss: float, head_losses: torch.Tensor, grad_norm, lr: float) -> dict:
        return {"loss": loss, "head_losses": [float(x) for x in head_losses], "lr": lr,
                "grad_norm": float(grad_norm) if grad_norm is not None else float("nan")}

    def train_step(self, batches) -> dict:
        lr = float(self.engine.get_lr()[0])  # the rate this step applies: the scheduler moves on inside step()
        if self.layout.pipeline:
            return self._pipeline_train_step(batches, lr)
        head_sum = torch.zeros(self.cfg.model.n_future_tokens)
        loss_sum = 0.0
        gas = self.cfg.train.grad_accum_steps
        grad_norm = None
        for micro in range(gas):
            tokens, labels = self._split(next(batches))
            out = self.engine(tokens, labels, grad_scale=loss_grad_scale(self.engine))
            self.engine.backward(out.loss)
            if micro == gas - 1 and self.own_grad_norm:
                grad_norm = self._grad_norm()  # before engine.step() clips; the gradients are already averaged
            self.engine.step()
            head_sum += out.head_losses.detach().float().cpu()
            loss_sum += float(out.loss.detach())
        head_losses = self._reduce_mean(head_sum / gas).cpu()
        loss = float(self._reduce_mean(torch.tensor(loss_sum / gas)))
        if grad_norm is None:
            grad_norm = self.engine.get_global_grad_norm()
        return self._train_metrics(loss, head_losses, grad_norm, lr)

    @torch.no_grad()
    def evaluate(self) -> dict | None:
        if self.valid_loader is None or self.cfg.train.eval_iters == 0:
            return None
        # The validation split may hold fewer than eval_iters micro-batches (the pipeline engine must be told).
        batches = list(itertools.islice(iter(self.valid_loader), self.cfg.train.eval_iters))
        if not batches:
            return None
        # Draft acceptance needs whole-vocabulary logits: tensor parallelism's are vocabulary shards.
        with_acceptance = self.cfg.model.n_future_tokens > 1 and self.layout.tensor.world == 1
        acceptance = None
        if self.layout.pipeline:
            self.pipe_loss.reset()
            self.pipe_loss.with_acceptance = with_acceptance
            self.engine.eval_batch(map(self._split, batches), num_micro_batches=len(batches))
            self.pipe_loss.with_acceptance = False
            head_losses = self._pipeline_head_losses()
            if with_acceptance:
                n = self.cfg.model.n_future_tokens
                acceptance = self._from_last_stage((4, n - 1), lambda: self.pipe_loss.acceptance.as_tensor())
        else:
            self.engine.eval()
            head_sum = torch.zeros(self.cfg.model.n_future_tokens)
            for tokens, labels in map(self._split, batches):
                out = self.engine(tokens, labels, head_argmax=with_acceptance)
                head_sum += out.head_losses.float().cpu()
                if with_acceptance:
                    counts = acceptance_counts(out.head_argmax).as_tensor()
                    acceptance = counts if acceptance is None else acceptance + counts
            head_losses = self._reduce_mean(head_sum / len(batches)).cpu()
            if acceptance is not None:
                acceptance = self._reduce_mean(acceptance).cpu()
        self.engine.train()
        weights = torch.tensor(self.cfg.model.loss_weights)
        result = {"loss": float((weights * head_losses).sum()), "head_losses": [float(x) for x in head_losses]}
        if acceptance is not None:  # a mean of counts over replicas: the same ratios as their sum
            result.update(AcceptanceCounts.from_tensor(acceptance).metrics())
        return result

    def save(self) -> None:
        try:
            folder = save_checkpoint(self.engine, self.cfg, self.step,
                                     {"step": self.step, "consumed_samples": self.consumed_samples,
                                      DATA_KEY: self.data_fingerprint})
        except CheckpointSaveError as e:
            self.logger.info(f"error: {e}")
            raise
        self.logger.info(f"saved checkpoint {folder}")

    def save_consolidated(self, folder: Path) -> Path:
        """Collective: full weights (gathered under ZeRO-3) written by rank 0 as a consolidated model folder,
        with the tokenizer beside it, for generation and export."""
        from mtplm.model.weights import save_weights

        extra = {}
        if self.cfg.data.tokenizer and Path(self.cfg.data.tokenizer).is_file():
            extra["tokenizer.model"] = self.cfg.data.tokenizer
        # One replica's tensor rank 0 per stage keeps its stage's weights.
        keep = self.layout.tensor.rank == 0 and self.layout.dp_rank == 0
        state = gather_full_state_dict(self.model, self.layout.tensor, keep=keep)
        if self.layout.pipeline:
            grid = self.layout.grid
            if keep:
                state = gather_pipeline_state_dict(state, self.cfg.model.n_trunk_layers, grid,
                                                   keep=self.dist.rank == 0)
        if self.dist.rank == 0:
            save_weights(self.cfg.model, state, folder, extra)
        dist.barrier()
        return folder

    def train(self) -> TrainResult:
        cfg, t = self.cfg, self.cfg.train
        result = TrainResult(step=self.step)
        stop = self.stop
        batches = iter(self.train_loader)
        samples_per_step = t.micro_batch_size * t.grad_accum_steps * self.dp_world
        tokens_per_step = samples_per_step * cfg.data.seq_len
        flops_token = flops_per_token(cfg.model, cfg.data.seq_len).training
        peak = None if self.dist.on_cpu else peak_flops(cfg)
        if not self.dist.on_cpu:
            torch.cuda.reset_peak_memory_stats()
        last_time, last_step = time.perf_counter(), self.step
        try:
            while self.step < t.steps:
                metrics = self.train_step(batches)
                self.step += 1
                self.consumed_samples += samples_per_step
                now = time.perf_counter()
                metrics["tokens_per_s"] = tokens_per_step * (self.step - last_step) / max(now - last_time, 1e-9)
                metrics["tokens_per_s_per_rank"] = metrics["tokens_per_s"] / self.dist.world_size
                metrics["consumed_samples"] = self.consumed_samples
                metrics["consumed_tokens"] = self.consumed_samples * cfg.data.seq_len
                if peak:
                    metrics["mfu"] = metrics["tokens_per_s_per_rank"] * flops_token / peak
                if not self.dist.on_cpu:
                    metrics["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
                last_time, last_step = now, self.step
                if not math.isfinite(metrics["loss"]):
                    raise FloatingPointError(f"loss is {metrics['loss']} at step {self.step}")
                result.train_log.append({"step": self.step, **metrics})
                self.logger.write(self.step, "train", metrics, echo=self.step % t.log_interval == 0
                                  or self.step == t.steps)
                if t.eval_interval and (self.step % t.eval_interval == 0 or self.step == t.steps):
                    ev = self.evaluate()
                    if ev is not None:
                        result.eval_log.append({"step": self.step, **ev})
                        self.logger.write(self.step, "valid", ev, echo=True)
                    last_time = time.perf_counter()  # evaluation is not training throughput
                if stop.agreed(self.engine.device):
                    self.logger.info(f"stop requested ({stop.name}); checkpointing at step {self.step}")
                    self.save()
                    result.stopped_by_signal, result.stop_signal = True, stop.signum
                    break
                if t.save_interval and self.step % t.save_interval == 0 and self.step < t.steps:
                    self.save()
                    last_time = time.perf_counter()
            else:
                if t.save_final:
                    self.save()
                    final = self.save_consolidated(self.out_dir / "final")
                    self.logger.info(f"wrote consolidated model {final}")
        finally:
            stop.restore()
            self.logger.close()
        result.step = self.step
        return result
