"""Training logs: a per-rank log file, rank 0's console (a progress bar in a terminal, plain lines otherwise),
a JSONL metrics file, and TensorBoard through DeepSpeed's monitor when its config enables one."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path

import torch
from tqdm import tqdm


def rank_logger(out_dir: Path, rank: int) -> logging.Logger:
    """Every rank logs to out_dir/logs/rank{r}.log; rank 0 also to stderr."""
    log = logging.getLogger(f"mtplm.rank{rank}")
    log.setLevel(logging.INFO)
    log.propagate = False
    if not log.handlers:
        (out_dir / "logs").mkdir(parents=True, exist_ok=True)
        fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(message)s", "%Y-%m-%d %H:%M:%S")
        fh = logging.FileHandler(out_dir / "logs" / f"rank{rank}.log")
        fh.setFormatter(fmt)
        log.addHandler(fh)
        if rank == 0:
            sh = logging.StreamHandler(sys.stderr)
            sh.setFormatter(fmt)
            log.addHandler(sh)
    return log


def format_metrics(step: int, total_steps: int, m: dict) -> str:
    heads = " ".join(f"{x:.3f}" for x in m["head_losses"])
    parts = [f"step {step}/{total_steps}", f"loss {m['loss']:.4f}", f"heads [{heads}]", f"lr {m['lr']:.2e}",
             f"grad_norm {m['grad_norm']:.3f}", f"tok/s {m['tokens_per_s']:.0f}"]
    if "mfu" in m:
        parts.append(f"mfu {100 * m['mfu']:.1f}%")
    if "peak_mem_gb" in m:
        parts.append(f"mem {m['peak_mem_gb']:.1f}GB")
    return " | ".join(parts)


def read_figures(pending: list[tuple[int, dict]], device) -> None:
    """The buffered steps' figures (device tensors: reading each would make the host wait for the device) replaced
    by their values, read in one copy: the loop's only wait for the device between log steps."""
    keys = ("loss", "head_losses", "grad_norm")
    tensors = [m[k] for _, m in pending for k in keys if isinstance(m[k], torch.Tensor)]
    values = iter(torch.cat([v.detach().to(device, torch.float64).reshape(-1) for v in tensors]).tolist())
    for _, m in pending:
        for k in keys:  # in the copy's order; DeepSpeed's grad norm may be a float already
            if isinstance(m[k], torch.Tensor):
                got = [next(values) for _ in range(m[k].numel())]
                m[k] = got if m[k].dim() else got[0]


def _step_of(line: str) -> float:
    """A record's step; a line cut short by a kill mid-write counts as past every step (dropped)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


class MetricsLogger:
    def __init__(self, out_dir: Path, rank: int, total_steps: int, start_step: int, metrics_file: str, monitor=None):
        self.rank = rank
        self.total_steps = total_steps
        self.log = rank_logger(out_dir, rank)
        self.monitor = monitor if (monitor is not None and getattr(monitor, "enabled", False)) else None
        self.path = out_dir / metrics_file
        self.jsonl = open(self.path, "a") if rank == 0 else None
        self.bar = None
        if rank == 0 and sys.stderr.isatty():
            self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, desc="train")

    def start_at(self, step: int) -> None:
        """The run continues after `step` (0: a fresh run): drop the records of later steps, left by a run that
        went on past the checkpoint resumed from, so the file keeps one record per step and kind, of this run.
        Rewritten under a temporary name and renamed, so a kill meanwhile loses nothing."""
        if self.rank != 0:
            return
        self.jsonl.close()
        kept = [line for line in self.path.read_text().splitlines() if _step_of(line) <= step]
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)
        self.jsonl = open(self.path, "a")
        if self.bar is not None:
            self.bar.n = self.bar.last_print_n = step

    def write_steps(self, pending: list[tuple[int, dict]], window: dict, log_interval: int,
                    records: list[dict]) -> None:
        """The buffered steps' records (figures read: read_figures), one per step, in order, each with the window's
        throughput, also appended to `records`; echoed every log_interval steps and at the last. A non-finite loss
        stops the run after the records before it. Empties `pending`."""
        try:
            for step, m in pending:
                if not math.isfinite(m["loss"]):
                    raise FloatingPointError(f"loss is {m['loss']} at step {step}")
                m.update(window)
                records.append({"step": step, **m})
                self.write(step, "train", m, echo=step % log_interval == 0 or step == self.total_steps)
        finally:
            pending.clear()

    def write(self, step: int, kind: str, metrics: dict, echo: bool) -> None:
        if self.rank != 0:
            return
        record = {"kind": kind, "step": step, **metrics}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.monitor is not None:
            events = [(f"{kind}/{k}", v, step) for k, v in metrics.items() if isinstance(v, (int, float))]
            events += [(f"{kind}/head{i + 1}_loss", v, step) for i, v in enumerate(metrics.get("head_losses", []))]
            events += [(f"{kind}/acceptance_draft{j + 1}", v, step)
                       for j, v in enumerate(metrics.get("acceptance", []))]
            events += [(f"{kind}/tokens_per_forward_{k + 1}_drafts", v, step)
                       for k, v in enumerate(metrics.get("tokens_per_forward", []))]
            self.monitor.write_events(events)
        if kind == "train":
            if self.bar is not None:
                self.bar.n = step
                self.bar.set_postfix_str(f"loss {metrics['loss']:.3f} heads "
                                         + " ".join(f"{x:.2f}" for x in metrics["head_losses"]))
            if echo:
                self.info(format_metrics(step, self.total_steps, metrics))
        elif kind == "tasks":
            self.info(f"tasks step {step} | " + " | ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
        else:
            heads = " ".join(f"{x:.3f}" for x in metrics["head_losses"])
            line = f"{kind} step {step} | loss {metrics['loss']:.4f} | heads [{heads}]"
            if "acceptance" in metrics:
                line += (" | acceptance [" + " ".join(f"{x:.3f}" for x in metrics["acceptance"])
                         + "] | tokens/forward [" + " ".join(f"{x:.2f}" for x in metrics["tokens_per_forward"]) + "]")
            self.info(line)

    def info(self, msg: str) -> None:
        """To the log file, and to the terminal above the progress bar (or through the logger without one)."""
        if self.bar is not None:
            self.bar.write(msg)
            for h in self.log.handlers:
                if isinstance(h, logging.FileHandler):
                    h.emit(self.log.makeRecord(self.log.name, logging.INFO, "", 0, msg, None, None))
        else:
            self.log.info(msg)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.jsonl is not None:
            self.jsonl.close()
