"""The real trainer on real data (data.datasets, DataLoader workers) or the synthetic stream, signalled the way a
cluster signals a job; exits as mtp-train does after a requested stop (143 after SIGTERM).

    python tests/workers/train_signalled.py [--group_sigterm_after_step K] [--disk_full_at PATH] --section.key ...

--group_sigterm_after_step K: rank 0 sends SIGTERM to its whole process group (launcher, every rank, DataLoader
workers: what scancel, docker stop or `kill -- -PGID` do) at the start of step K + 1.
--slow_save_s S: every checkpoint save takes S seconds longer, spent between DeepSpeed's files and the marks that
make the checkpoint complete (a large model on a shared filesystem); a kill during it leaves an incomplete save.
--step_delay_ms MS: every step takes MS milliseconds longer (a larger model), so that a signal sent a few steps into the
run reaches it well before its last step on a loaded machine.
--disk_full_at PATH: writing the file PATH fails as on a full disk (tests run as root, so permissions cannot
stop a write, and a save first clears its step folder of what stood there).
"""

import errno
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from train_synthetic import SyntheticLoader, pop_flag

from mtplm.pretrain.checkpointing import checkpoint
from mtplm.pretrain.distributed import init_distributed
from mtplm.pretrain.train import exit_status, parse_args
from mtplm.pretrain.trainer import Trainer


class SignalledTrainer(Trainer):
    group_sigterm_after = None
    step_delay_s = 0.0

    def train_step(self, batches):
        if self.step == self.group_sigterm_after and self.dist.rank == 0:
            os.killpg(os.getpgid(0), signal.SIGTERM)
        time.sleep(self.step_delay_s)
        return super().train_step(batches)


def main():
    argv = sys.argv[1:]
    SignalledTrainer.group_sigterm_after = pop_flag(argv, "--group_sigterm_after_step")
    slow_save_s = pop_flag(argv, "--slow_save_s")
    SignalledTrainer.step_delay_s = (pop_flag(argv, "--step_delay_ms") or 0) / 1000
    if slow_save_s:
        rng_state = checkpoint.rng_state  # taken by each rank after DeepSpeed wrote its files

        def slow_rng_state():
            print(f"checkpoint save: {slow_save_s} s more (--slow_save_s)", flush=True)
            time.sleep(slow_save_s)
            return rng_state()

        checkpoint.rng_state = slow_rng_state
    if "--disk_full_at" in argv:
        i = argv.index("--disk_full_at")
        full = Path(argv.pop(i + 1)).resolve()
        argv.pop(i)
        save = torch.save

        def save_unless_full(obj, f, *args, **kwargs):
            if isinstance(f, (str, os.PathLike)) and Path(f).resolve() == full:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
            return save(obj, f, *args, **kwargs)

        torch.save = save_unless_full
    cfg = parse_args(argv)
    info = init_distributed()
    loaders = None
    if not cfg.data.datasets:
        extra = cfg.model.n_future_tokens
        loaders = lambda consumed, dp_rank, dp_world: (SyntheticLoader(cfg, dp_rank, dp_world, extra, consumed), None)
    result = SignalledTrainer(cfg, data_loaders=loaders, dist_info=info).train()
    if info.rank == 0:
        Path(cfg.train.out_dir, "train_log.json").write_text(json.dumps({"train": result.train_log,
                                                                          "step": result.step}))
    dist.barrier()
    sys.exit(exit_status(result))


if __name__ == "__main__":
    main()
