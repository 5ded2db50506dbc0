"""The learning-rate schedule: linear warmup to optim.lr, then cosine decay to optim.lr * optim.min_lr_ratio.

The rate applied at optimizer step s (1-based), for warmup W = optim.warmup_steps, S = train.steps,
peak = optim.lr and m = optim.min_lr_ratio:

    s <= W:       peak * s / W                                                (W = 0: no warmup)
    W < s <= S:   peak * (m + (1 - m) * (1 + cos(pi * (s - W) / (S - W))) / 2)

Warmup reaches the peak at step W and its first step is already above 0 (Megatron-LM's curve evaluated at the
step count *after* the step, as torchtitan does); the decay reaches peak * m at step S. A warmup longer than the
run is not cut short: the run ends part-way up the ramp. DeepSpeed's WarmupCosineLR cannot express this (its
first step runs at warmup_min_ratio, 0 by default, and it refuses W = 0), so it is a LambdaLR handed to
deepspeed.initialize; DeepSpeed steps it after every applied optimizer step (not after fp16 overflow skips) and
stores its state_dict in the checkpoint.
"""

from __future__ import annotations

import math

from torch.optim.lr_scheduler import LambdaLR

from .config import OptimConfig


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Fraction of the peak rate applied at optimizer step `step` (1-based)."""
    if step <= warmup:
        return step / warmup
    # Past the end only when the scheduler computes the rate after the last step (or total <= warmup).
    progress = 1.0 if step >= total else (step - warmup) / (total - warmup)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosine(LambdaLR):
    """Keeps only its position in a checkpoint (as torchtitan does): the curve itself is always the run's config,
    so a resumed run with a changed optim.lr or train.steps follows the new schedule from its first step."""

    def __init__(self, optimizer, optim: OptimConfig, total_steps: int):
        def factor(done: int) -> float:  # LambdaLR counts steps already taken; the next one is done + 1
            return lr_factor(done + 1, optim.warmup_steps, total_steps, optim.min_lr_ratio)

        super().__init__(optimizer, factor)

    def state_dict(self) -> dict:
        return {"last_epoch": self.last_epoch}

    def load_state_dict(self, state: dict) -> None:
        # Checkpoints written before this schedule hold DeepSpeed WarmupCosineLR's state (-1 before the first step).
        self.last_epoch = int(state["last_epoch"] if "last_epoch" in state else state["last_batch_iteration"] + 1)
        self.apply()

    def apply(self) -> None:
        """Write the rate of the next step into the optimizer (an optimizer state loaded after the scheduler's
        would otherwise bring back the rate it was saved with)."""
        lrs = [base * fn(self.last_epoch) for base, fn in zip(self.base_lrs, self.lr_lambdas)]
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self._last_lr = lrs


def scheduler_factory(optim: OptimConfig, total_steps: int):
    """For deepspeed.initialize(lr_scheduler=...): DeepSpeed builds the optimizer, then calls this with it."""
    return lambda optimizer: WarmupCosine(optimizer, optim, total_steps)
