"""A real training run (mtplm.pretrain.trainer) on a synthetic, deterministic token stream.

Samples are a pure function of their global index; each optimizer step's micro-batches are split across
data-parallel ranks the way the real loader does, so a DP=2 run and a DP=1 run with twice the gradient
accumulation see the same samples per optimizer step. Rank 0 writes train_log.json beside the checkpoints.

    python tests/workers/train_synthetic.py [--sample_extra K] [--kill_after_step K] [--sigterm_after_step K]
        --section.key value ...

--kill_after_step K: SIGKILL every rank once step K is done (a crash between checkpoints);
--sigterm_after_step K: send SIGTERM to itself after step K (a cluster pre-empting the job).
"""

import json
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from mtplm.pretrain.train import parse_args
from mtplm.pretrain.trainer import Trainer


def sample(i: int, length: int, vocab: int) -> torch.Tensor:
    # A learnable stream: an arithmetic progression mod vocab with a per-sample stride, plus noise.
    g = torch.Generator().manual_seed(1000 + i)
    stride = 1 + i % 7
    base = (torch.arange(length) * stride + int(torch.randint(0, vocab, (1,), generator=g))) % vocab
    noise = torch.randint(0, vocab, (length,), generator=g)
    return torch.where(torch.rand(length, generator=g) < 0.1, noise, base)


class SyntheticLoader:
    def __init__(self, cfg, rank, world, extra, offset=0):
        self.mb, self.rank, self.world, self.offset = cfg.train.micro_batch_size, rank, world, offset
        self.length = cfg.data.seq_len + extra
        self.vocab = cfg.model.vocab_size

    def __iter__(self):
        i = self.offset
        while True:
            start = i + self.rank * self.mb
            yield torch.stack([sample(j, self.length, self.vocab) for j in range(start, start + self.mb)])
            i += self.mb * self.world


def pop_flag(argv, name):
    if name not in argv:
        return None
    k = argv.index(name)
    value = int(argv[k + 1])
    del argv[k:k + 2]
    return value


class FaultyTrainer(Trainer):
    kill_after = sigterm_after = None

    def train_step(self, batches):
        if self.step == self.kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.step == self.sigterm_after:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().train_step(batches)


def main():
    argv = sys.argv[1:]
    extra = pop_flag(argv, "--sample_extra")
    FaultyTrainer.kill_after = pop_flag(argv, "--kill_after_step")
    FaultyTrainer.sigterm_after = pop_flag(argv, "--sigterm_after_step")
    cfg = parse_args(argv)
    extra = cfg.model.n_future_tokens if extra is None else extra
    from mtplm.pretrain.distributed import init_distributed

    info = init_distributed()
    # Resume support: the loader starts at the checkpoint's consumed samples.
    loaders = lambda consumed, dp_rank, dp_world: (SyntheticLoader(cfg, dp_rank, dp_world, extra, consumed),
                                                   SyntheticLoader(cfg, 0, 1, extra, 10**6))
    trainer = FaultyTrainer(cfg, data_loaders=loaders, dist_info=info)
    result = trainer.train()
    if info.rank == 0:
        Path(cfg.train.out_dir, "train_log.json").write_text(json.dumps(
            {"train": result.train_log, "eval": result.eval_log, "step": result.step,
             "params_held": [trainer.local_params, trainer.total_params]}))
    dist.barrier()


if __name__ == "__main__":
    main()
