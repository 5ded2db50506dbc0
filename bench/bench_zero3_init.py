"""Start-up memory of a ZeRO-3 rank: the model built whole and then partitioned by deepspeed.initialize, against
the model built partitioned under zero.Init (what the trainer does under ZeRO-3).

    python bench/bench_zero3_init.py                                   # configs/125m.yaml, 2 ranks, ZeRO-3 fp32
    python bench/bench_zero3_init.py --config configs/1b.yaml --world 4 --deepspeed_config ds_configs/zero3_bf16.json

Each arm runs as --world fresh processes on this machine (gloo on a CPU, NCCL on GPUs). Every rank reports the
bytes of parameters it holds once the model is built, and the growth of its peak resident set (ru_maxrss) over
its resident set just before construction: once the model is built, and once deepspeed.initialize has returned
(ZeRO-3's fp32 partitions, Adam states and communication buffers included); on a GPU also
torch.cuda.max_memory_allocated. Printed: medians over ranks (a few ranks carry ~150 MB more of the CPU
backend's communication buffers, whatever the model) and the ratios zero.Init / whole.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys

ARMS = ("whole", "zero.Init")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rank_main(args) -> dict:
    from mtplm.pretrain.distributed import init_distributed

    info = init_distributed()
    import deepspeed
    import torch

    from mtplm.model.transformer import MTPTransformer
    from mtplm.pretrain.build_model import build_model, local_parameter_count
    from mtplm.pretrain.config import TrainConfig, load_config
    from mtplm.pretrain.ds_config import build_ds_config
    from mtplm.pretrain.parallel.layout import build_layout
    from mtplm.pretrain.engine import param_groups

    # Data parallelism only: the "whole" arm is plain construction, with nothing cut for tensor parallelism.
    cfg = load_config(TrainConfig, args.config, ["--train.micro_batch_size", "1", "--train.grad_accum_steps", "1",
                                                 "--parallel.tensor", "1", "--parallel.pipeline", "1"])
    ds_cfg = build_ds_config(cfg, args.deepspeed_config, info.world_size, info.on_cpu)
    layout = build_layout(cfg, info.rank, info.world_size)
    torch.manual_seed(0)
    base = rss_bytes()
    if args.arm == "zero.Init":
        model, _ = build_model(cfg, ds_cfg, layout)
    else:
        model = MTPTransformer(cfg.model)
    built, built_gpu = peak_rss_bytes() - base, _gpu_peak()
    held, n_params = local_parameter_count(model)
    held *= next(model.parameters()).element_size()  # one dtype for all: ZeRO-3's or the default fp32
    deepspeed.initialize(model=model, model_parameters=param_groups(model, cfg.optim.weight_decay), config=ds_cfg,
                         dist_init_required=False)
    return {"rank": info.rank, "params": n_params, "held": held, "built": built, "started": peak_rss_bytes() - base,
            "built_gpu": built_gpu, "started_gpu": _gpu_peak()}


def _gpu_peak() -> int | None:
    import torch

    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None


def run_arm(arm: str, args, passthrough: list[str], script: str = __file__) -> list[dict]:
    """`script` as args.world ranks with `--_arm arm`; each prints its figures as the last line of JSON."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(args.world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(args.world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, script, *passthrough, "--_arm", arm], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for rank, p in enumerate(procs):
        out, err = p.communicate()
        if p.returncode != 0:
            sys.exit(f"{arm} rank {rank} failed:\n{err[-3000:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/125m.yaml")
    p.add_argument("--deepspeed_config", default="ds_configs/zero3.json")
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--_arm", dest="arm", choices=ARMS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.arm:
        print(json.dumps(rank_main(args)))
        return
    passthrough = ["--config", args.config, "--deepspeed_config", args.deepspeed_config, "--world", str(args.world)]
    gib = 2**30
    figures = {}
    print(f"{args.config}, {args.deepspeed_config}, {args.world} ranks; per rank (median over ranks):")
    for arm in ARMS:
        ranks = run_arm(arm, args, passthrough)
        f = figures[arm] = {k: statistics.median(r[k] for r in ranks) if ranks[0][k] is not None else None
                            for k in ("held", "built", "started", "built_gpu", "started_gpu")}
        line = (f"  {arm:>9}: parameters held after construction {f['held'] / gib:5.2f} GiB; peak host memory growth "
                f"{f['built'] / gib:5.2f} GiB building, {f['started'] / gib:5.2f} GiB through deepspeed.initialize")
        if f["started_gpu"] is not None:
            line += f"; GPU peak {f['built_gpu'] / gib:.2f} / {f['started_gpu'] / gib:.2f} GiB"
        print(line)
    a, b = figures["whole"], figures["zero.Init"]
    print(f"  ({ranks[0]['params'] / 1e6:.0f}M parameters; ZeRO-3 keeps 16 bytes per parameter / {args.world} ranks of "
          f"fp32 master, Adam states and gradients: {16 * ranks[0]['params'] / args.world / gib:.2f} GiB)")
    print(f"ratio zero.Init / whole: parameters held {b['held'] / a['held']:.3f}, building peak "
          f"{b['built'] / a['built']:.3f}, start-up peak {b['started'] / a['started']:.3f}"
          + (f", GPU start-up peak {b['started_gpu'] / max(a['started_gpu'], 1):.3f}" if a["started_gpu"] is not None else ""))

if __name__ == "__main__":
    main()
