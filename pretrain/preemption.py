"""Stop signals become a request to checkpoint and stop after the current step, agreed by every rank.

What arrives, and how often:
- SIGTERM from schedulers and service managers (scancel, a Slurm time limit, docker stop, systemd), usually sent
  to every process of the job at once; the deepspeed launcher and torchrun then send it to their ranks again.
- SIGUSR1, the warning launch/slurm_train.sh forwards to the ranks before the time limit.
- SIGINT, Ctrl-C in a terminal.
Repeated SIGTERM/SIGUSR1 only repeat the request: the scheduler's SIGKILL after its grace period is what ends a
stuck run. A second SIGINT restores the default handler, so a stuck interactive run can still be interrupted.
DataLoader workers ignore all three (mtplm.data.loader.ignore_stop_signals): the trainer decides when to stop.
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StopSignal:
    def __init__(self):
        self.requested = False
        self.signum = None
        self._group = None  # connect()
        self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}

    def _handle(self, signum, frame):
        if self.signum is None:
            self.signum = signum
        self.requested = True
        if signum == signal.SIGINT:
            signal.signal(signum, self._previous[signum])

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "none"

    def connect(self) -> None:
        """Collective, once the default process group exists: the group the stop flag is reduced over."""
        if dist.get_world_size() > 1:
            # gloo, on the host: over the default NCCL group, reading the flag would make the host wait for the
            # device's queue after every step, which the training step itself never does (trainer._flush).
            self._group = dist.new_group(backend="gloo")

    def agreed(self) -> bool:
        """Collective: True on every rank if any rank was signalled (ranks must stop at the same step to save
        together)."""
        if dist.get_world_size() == 1:
            return self.requested
        flag = torch.tensor([1 if self.requested else 0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return bool(flag.item())

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
