"""The training loop: build, (resume,) train, validate, log, checkpoint. How a step runs on DeepSpeed, for each
layout, is engine.py's; what a layout applies to the model is parallel/'s; checkpoints are checkpointing/'s."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from .build_model import build_model, local_parameter_count
from .checkpointing.checkpoint import (CHANGES_KEY, DATA_KEY, CheckpointSaveError, checkpoint_dir, decide_resume,
                                       load_checkpoint, save_checkpoint)
from .config import TrainConfig
from .consistency import agree_on_data, check_shared_folder
from .distributed import DistInfo, init_distributed
from .ds_config import precision, zero_stage
from .engine import build_engine
from .evaluation import TaskAccuracy, validate
from .metrics_log import MetricsLogger, read_figures
from .parallel.layout import build_layout
from .preemption import StopSignal
from .preflight import check_layout
from .run_info import Throughput, startup_lines


@dataclass
class TrainResult:
    step: int
    train_log: list[dict] = field(default_factory=list)  # one record per optimizer step (rank 0's view)
    eval_log: list[dict] = field(default_factory=list)
    task_log: list[dict] = field(default_factory=list)  # train.eval_tasks' accuracies
    stopped_by_signal: bool = False
    stop_signal: int | None = None  # the signal this rank received (None: another rank's stop was agreed)


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
        self.dp_world, ds_cfg = check_layout(cfg, dist_info)  # refused before any process group exists
        self.dist = dist_info or init_distributed()
        self.stop.connect()
        self.layout = build_layout(cfg, self.dist.rank, self.dist.world_size)
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        self.out_dir = Path(cfg.train.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        # Before anything is built: every rank reads the same data, sees one checkpoint folder, and resumes from
        # the checkpoint rank 0 chose; otherwise all ranks stop here together.
        self.data_fingerprint = agree_on_data(cfg.data, cfg.model.n_future_tokens)
        check_shared_folder(checkpoint_dir(t.out_dir))
        resume_from = decide_resume(cfg, ds_cfg)  # may change grad_accum_steps to keep the global batch
        model, init_notes = build_model(cfg, ds_cfg, self.layout)
        self.local_params, self.total_params = local_parameter_count(model)
        self.mtp_loss = model.loss
        self.mtp_loss.defer_scale_check = True  # read at each flush
        self.zero_stage, self.precision = zero_stage(ds_cfg), precision(ds_cfg)
        self.steps = build_engine(cfg, ds_cfg, self.layout, model, self.dp_world)
        self.engine = self.steps.engine
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
            for change in state[CHANGES_KEY]:
                self.logger.info(f"resumed with {change}")
        self.logger.start_at(self.step)  # records past the checkpoint belong to the run being replaced
        self.task_accuracy = TaskAccuracy(cfg, self.steps, self.layout.gathers_weights, self.dist.rank == 0)
        build = data_loaders or self._build_loaders
        self.train_loader, self.valid_loader = build(self.consumed_samples, self.layout.dp_rank, self.dp_world)
        for line in [*startup_lines(cfg, self.dist, self.layout, self.dp_world, self.data_fingerprint,
                                    self.zero_stage, self.precision, self.local_params, self.total_params),
                     *self.steps.describe()]:
            self.logger.info(line)

    def _build_loaders(self, consumed_samples: int, dp_rank: int, dp_world: int):
        from mtplm.data.loader import build_data_loaders
        from mtplm.data.tokenizer import load_tokenizer

        tok_sha = load_tokenizer(self.cfg.data.tokenizer).sha256 if self.cfg.data.tokenizer else None
        return build_data_loaders(
            self.cfg.data, n_future_tokens=self.cfg.model.n_future_tokens, vocab_size=self.cfg.model.vocab_size,
            micro_batch_size=self.cfg.train.micro_batch_size, dp_rank=dp_rank,
            dp_world_size=dp_world, consumed_train_samples=consumed_samples,
            pin_memory=not self.dist.on_cpu, tokenizer_sha256=tok_sha)

    def train_step(self, batches) -> dict:
        """One optimizer step. Its figures stay device tensors (reading them would make the host wait for the
        device) until _flush() reads every buffered step's at once."""
        lr = float(self.engine.get_lr()[0])  # the rate this step applies: the scheduler moves on inside step()
        loss, head_losses, grad_norm = self.steps.train_step(batches)
        return {"loss": loss, "head_losses": head_losses, "lr": lr,
                "grad_norm": grad_norm if grad_norm is not None else float("nan")}

    def _flush(self, pending: list[tuple[int, dict]], throughput: Throughput, result: TrainResult) -> None:
        """The buffered steps' figures to the host in one copy, then their records. tokens/s is the window's:
        single steps are not timed (the host runs ahead of the device)."""
        if not pending:
            return
        read_figures(pending, self.engine.device)
        self.mtp_loss.check_grad_scale()  # the sequential loss's backward checks, read here for the same reason
        window = throughput.measure(pending[-1][0], self.samples_per_step * self.cfg.data.seq_len)
        self.logger.write_steps(pending, window, self.cfg.train.log_interval, result.train_log)

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
        state = self.steps.full_state_dict(keep=self.layout.gathers_weights)
        if self.dist.rank == 0:
            save_weights(self.cfg.model, state, folder, extra)
        dist.barrier()
        return folder

    def train(self) -> TrainResult:
        cfg, t = self.cfg, self.cfg.train
        result = TrainResult(step=self.step)
        stop = self.stop
        batches = iter(self.train_loader)
        self.samples_per_step = t.micro_batch_size * t.grad_accum_steps * self.dp_world
        throughput = Throughput(cfg, self.dist.world_size, self.dist.on_cpu, self.step)
        pending = []  # (step, metrics) not yet read from the device
        try:
            while self.step < t.steps:
                metrics = self.train_step(batches)
                self.step += 1
                self.consumed_samples += self.samples_per_step
                metrics.update(consumed_samples=self.consumed_samples,
                               consumed_tokens=self.consumed_samples * cfg.data.seq_len)
                pending.append((self.step, metrics))
                eval_due = t.eval_interval and (self.step % t.eval_interval == 0 or self.step == t.steps)
                save_due = t.save_interval and self.step % t.save_interval == 0
                if (self.step % t.log_interval == 0 or self.step == t.steps or eval_due or save_due
                        or self.task_accuracy.due(self.step)):
                    self._flush(pending, throughput, result)
                if eval_due:
                    ev = validate(cfg, self.steps, self.valid_loader)
                    if ev is not None:
                        result.eval_log.append({"step": self.step, **ev})
                        self.logger.write(self.step, "valid", ev, echo=True)
                    throughput.restart()  # evaluation is not training throughput
                if self.task_accuracy.due(self.step):
                    tasks = self.task_accuracy.evaluate()
                    if self.dist.rank == 0:
                        result.task_log.append({"step": self.step, **tasks})
                    self.logger.write(self.step, "tasks", tasks, echo=True)
                    throughput.restart()
                if stop.agreed():
                    self._flush(pending, throughput, result)
                    self.logger.info(f"stop requested ({stop.name}); checkpointing at step {self.step}")
                    self.save()
                    result.stopped_by_signal, result.stop_signal = True, stop.signum
                    break
                if save_due and self.step < t.steps:
                    self.save()
                    throughput.restart()
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
