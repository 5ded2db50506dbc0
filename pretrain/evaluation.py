"""Evaluation during training.

Validation (train.eval_interval): the loss per head on train.eval_iters micro-batches of the validation split, and
with more than one head the teacher-forced draft acceptance, in every layout (the engine's step strategy computes
both).

Task accuracy (train.eval_tasks): every eval_tasks_interval steps, the model's current weights are gathered
(collective, as for final/), and rank 0 completes each task file's prompts greedily and scores them exactly as
`mtp-eval --tasks` does (inference/task_eval.py); the other ranks wait. Each figure is logged as
`<file stem>/accuracy` and `<file stem>/<field>=<value>/accuracy` for each grouping field."""

from __future__ import annotations

import itertools
from pathlib import Path

import torch
import torch.distributed as dist

from mtplm.data.tokenizer import load_tokenizer
from mtplm.inference.acceptance import AcceptanceCounts
from mtplm.inference.task_eval import evaluate_tasks, read_tasks
from mtplm.model.weights import model_from_state_dict

from .config import TrainConfig


@torch.no_grad()
def validate(cfg: TrainConfig, steps, valid_loader) -> dict | None:
    """Collective: the validation figures, or None without a validation split."""
    if valid_loader is None or cfg.train.eval_iters == 0:
        return None
    # The validation split may hold fewer than eval_iters micro-batches (the pipeline engine must be told).
    batches = list(itertools.islice(iter(valid_loader), cfg.train.eval_iters))
    if not batches:
        return None
    with_acceptance = cfg.model.n_future_tokens > 1
    head_losses, acceptance = steps.evaluate(batches, with_acceptance)
    weights = torch.tensor(cfg.model.loss_weights)
    result = {"loss": float((weights * head_losses).sum()), "head_losses": [float(x) for x in head_losses]}
    if acceptance is not None:  # a mean of counts over replicas: the same ratios as their sum
        result.update(AcceptanceCounts.from_tensor(acceptance).metrics())
    return result


class TaskAccuracy:
    def __init__(self, cfg: TrainConfig, steps, keep: bool, is_rank0: bool):
        """keep: this rank receives the full weights (one replica's tensor rank 0 of the first stage); is_rank0:
        the rank that evaluates (global rank 0, which is such a rank)."""
        t = cfg.train
        self.cfg, self.steps, self.keep, self.is_rank0 = cfg, steps, keep, is_rank0
        self.every = t.eval_tasks_interval or t.eval_interval
        self.tasks = {Path(p).stem: read_tasks(p) for p in t.eval_tasks}
        self.tokenizer = load_tokenizer(cfg.data.tokenizer) if self.tasks and is_rank0 else None

    def due(self, step: int) -> bool:
        return bool(self.tasks) and ((self.every and step % self.every == 0) or step == self.cfg.train.steps)

    def evaluate(self) -> dict:
        """Collective. {figure: accuracy} on rank 0, {} elsewhere."""
        state = self.steps.full_state_dict(keep=self.keep)
        metrics = {}
        if self.is_rank0:
            model = model_from_state_dict(self.cfg.model, state).to(self.steps.engine.device).eval()
            for name, records in self.tasks.items():
                score, _ = evaluate_tasks(model, self.tokenizer, records, self.cfg.train.eval_tasks_max_new_tokens,
                                          batch_size=self.cfg.train.micro_batch_size, progress=False)
                metrics[f"{name}/accuracy"] = score["accuracy"]
                for field, values in score["by"].items():
                    for value, s in values.items():
                        metrics[f"{name}/{field}={value}/accuracy"] = s["accuracy"]
            del model
        dist.barrier()
        return metrics
