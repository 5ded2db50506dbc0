"""Loader throughput against what a training step consumes.

    python bench/bench_loader.py --data runs/demo/data [--config configs/demo.yaml] [--workers 2]

Reads batches through the real DataLoader (blending, sharding, workers) for a few seconds, then times
training steps of the configured model on the same batches, and prints samples/s of each and their ratio
(above 1 means the loader keeps up).
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch

from mtplm.data.loader import build_data_loaders
from mtplm.model.transformer import MTPTransformer
from mtplm.pretrain.config import TrainConfig, load_config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="dataset folder written by mtp-preprocess")
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args()
    cfg = load_config(TrainConfig, args.config, ["--data.datasets", f"[{args.data}]",
                                                 "--data.num_workers", str(args.workers)])
    mb = cfg.train.micro_batch_size
    train, _ = build_data_loaders(cfg.data, n_future_tokens=cfg.model.n_future_tokens,
                                  vocab_size=cfg.model.vocab_size, micro_batch_size=mb, dp_rank=0, dp_world_size=1)
    it = iter(train)
    next(it)  # start the workers
    t0 = time.perf_counter()
    batches = list(itertools.islice(it, args.batches))
    load_rate = args.batches * mb / (time.perf_counter() - t0)

    model = MTPTransformer(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    seq = cfg.data.seq_len
    times = []
    for b in batches[: args.steps + 1]:
        t0 = time.perf_counter()
        model(b[:, :seq], b[:, 1:]).loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    step_rate = mb / (sum(times[1:]) / len(times[1:]))
    print(f"loader: {load_rate:,.0f} samples/s ({args.workers} workers, micro-batch {mb}, seq_len {seq})")
    print(f"training step ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, CPU): "
          f"{step_rate:,.1f} samples/s")
    print(f"loader / consumption: {load_rate / step_rate:,.0f}x")


if __name__ == "__main__":
    main()
