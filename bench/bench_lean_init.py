"""Start-up memory of a ZeRO-0/1/2 rank with model parallelism: the whole fp32 model built on every rank and then
cut (the build before lean_init.py), against the lean build (pretrain/build_model.py: only the rank's pipeline
stage and tensor shards are materialised, one full tensor at a time).

    python bench/bench_lean_init.py                      # configs/125m.yaml, 8 ranks, ZeRO-1 fp32
    python bench/bench_lean_init.py --world 4 --config configs/1b.yaml --deepspeed_config ds_configs/zero1_bf16.json

Two layouts of --world ranks: pipeline 2 x tensor 2 (x data world/4), and tensor 2 (x data world/2). Each arm runs
as --world fresh processes (gloo on a CPU, NCCL on GPUs); every rank reports the bytes of parameters it holds
once built, and the growth of its peak resident set (ru_maxrss) over its resident set just before construction:
once the model is built, and once the engine is (the pipeline module, then deepspeed.initialize with its
optimizer states and buffers). Printed per layout and arm: median and largest over ranks, beside the target for
the build, 1/(tensor x pipeline) of the fp32 model plus its largest tensor; then the ratios lean / whole.
"""

from __future__ import annotations

import argparse
import json
import statistics

from bench_zero3_init import peak_rss_bytes, rss_bytes, run_arm

ARMS = ("whole", "lean")
LAYOUTS = {"pp2xtp2": ("--parallel.pipeline", "2", "--parallel.tensor", "2"), "tp2": ("--parallel.tensor", "2")}


def rank_main(args) -> dict:
    from mtplm.pretrain.distributed import init_distributed

    info = init_distributed()
    import torch

    from mtplm.model.transformer import MTPTransformer
    from mtplm.pretrain.build_model import build_model
    from mtplm.pretrain.config import TrainConfig, load_config
    from mtplm.pretrain.ds_config import build_ds_config
    from mtplm.pretrain.engine import build_engine
    from mtplm.pretrain.parallel.layout import build_layout
    from mtplm.pretrain.parallel.tensor_parallel import apply_tensor_parallel

    cfg = load_config(TrainConfig, args.config, ["--train.micro_batch_size", "1", "--train.grad_accum_steps", "1",
                                                 "--parallel.pipeline", "1", "--parallel.tensor", "1",
                                                 *LAYOUTS[args.layout]])
    layout = build_layout(cfg, info.rank, info.world_size)
    ds_cfg = build_ds_config(cfg, args.deepspeed_config, layout.dp_world, info.on_cpu)
    with torch.device("meta"):
        shape = MTPTransformer(cfg.model)
    fp32 = [p.numel() * 4 for p in shape.parameters()]
    torch.manual_seed(0)
    base = rss_bytes()
    if args.arm == "lean":
        model, _ = build_model(cfg, ds_cfg, layout)
    else:  # every rank builds the whole model from the seed and keeps its shards (and, later, its stage)
        model = apply_tensor_parallel(MTPTransformer(cfg.model), layout.tensor)
    built = peak_rss_bytes() - base
    held = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values() if not p.is_meta)
    build_engine(cfg, ds_cfg, layout, model, layout.dp_world)
    return {"rank": info.rank, "model": sum(fp32), "largest": max(fp32), "held": held, "built": built,
            "started": peak_rss_bytes() - base, "model_parallel": cfg.parallel.tensor * cfg.parallel.pipeline}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/125m.yaml")
    p.add_argument("--deepspeed_config", default="ds_configs/zero1.json")
    p.add_argument("--world", type=int, default=8)
    p.add_argument("--_arm", dest="arm", choices=ARMS, help=argparse.SUPPRESS)
    p.add_argument("--_layout", dest="layout", choices=list(LAYOUTS), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.arm:
        print(json.dumps(rank_main(args)))
        return
    gib = 2**30
    print(f"{args.config}, {args.deepspeed_config}, {args.world} ranks; per rank, median / largest over ranks:")
    for name in LAYOUTS:
        passthrough = ["--config", args.config, "--deepspeed_config", args.deepspeed_config, "--world",
                       str(args.world), "--_layout", name]
        figures = {}
        for arm in ARMS:
            ranks = run_arm(arm, args, passthrough, script=__file__)
            figures[arm] = f = {k: (statistics.median(r[k] for r in ranks), max(r[k] for r in ranks))
                                for k in ("held", "built", "started")}
            r0 = ranks[0]
            print(f"  {name} (data {args.world // r0['model_parallel']}) {arm:>5}: parameters held "
                  f"{f['held'][0] / gib:.3f} / {f['held'][1] / gib:.3f} GiB; peak host memory growth "
                  f"building {f['built'][0] / gib:.3f} / {f['built'][1] / gib:.3f} GiB, through "
                  f"deepspeed.initialize {f['started'][0] / gib:.3f} / {f['started'][1] / gib:.3f} GiB")
        target = r0["model"] / r0["model_parallel"] + r0["largest"]
        a, b = figures["whole"], figures["lean"]
        print(f"  {name}: fp32 model {r0['model'] / gib:.3f} GiB, largest tensor {r0['largest'] / gib:.3f} GiB, "
              f"build target 1/{r0['model_parallel']} + largest = {target / gib:.3f} GiB; largest building peak / "
              f"target: whole {a['built'][1] / target:.2f}, lean {b['built'][1] / target:.2f}")
        print(f"  {name} ratio lean / whole (largest rank): parameters held {b['held'][1] / a['held'][1]:.3f}, "
              f"building peak {b['built'][1] / a['built'][1]:.3f}, start-up peak "
              f"{b['started'][1] / a['started'][1]:.3f}")


if __name__ == "__main__":
    main()
