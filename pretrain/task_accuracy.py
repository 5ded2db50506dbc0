"""Task accuracy during training (train.eval_tasks): every eval_tasks_interval steps, the model's current weights
are gathered (collective, as for final/), and rank 0 completes each task file's prompts greedily and scores them
exactly as `mtp-eval --tasks` does (inference/task_eval.py); the other ranks wait. Each figure is logged as
`<file stem>/accuracy` and `<file stem>/<field>=<value>/accuracy` for each grouping field."""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist

from mtplm.data.tokenizer import load_tokenizer
from mtplm.inference.task_eval import evaluate_tasks, read_tasks
from mtplm.model.weights import model_from_state_dict

from .config import TrainConfig


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
