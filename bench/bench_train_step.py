"""Training throughput of the real trainer (DeepSpeed engine, sequential heads): n=4 heads against n=1 at the
same parameter count (n_layers counts the heads, so both models have the same blocks; n=4 moves three trunk
blocks into heads).

    python bench/bench_train_step.py                                   # CPU: a ~20M model, fp32, ZeRO-0
    python bench/bench_train_step.py --config configs/1b.yaml --deepspeed_config ds_configs/zero1_bf16.json \\
        --micro-batch 4 --seq-len 2048                                 # GPU: tokens/s and MFU of the ~1B model

Each n runs in a fresh process (a world of one; under the deepspeed launcher each rank runs its own copy).
Prints tokens/s, step time and (on GPU) MFU and peak memory per n, and time(n=4)/time(n=1) beside the ratio of
matmul weights a token passes through (n unembeddings instead of one: large for small models with big
vocabularies, ~6% for Meta's 7B n=4).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

SMALL = ["--model.dim", "512", "--model.n_layers", "8", "--model.n_heads", "8", "--model.vocab_size", "32000",
         "--model.max_seq_len", "512"]


def child(args) -> None:
    import torch

    from mtplm.model.flops import count_params
    from mtplm.pretrain.config import TrainConfig, load_config
    from mtplm.pretrain.trainer import Trainer

    (n,) = args.n
    overrides = ([] if args.config else SMALL) + [
        "--model.n_future_tokens", str(n), "--data.seq_len", str(args.seq_len),
        "--train.micro_batch_size", str(args.micro_batch), "--train.grad_accum_steps", "1",
        "--train.steps", str(args.warmup + args.steps), "--train.eval_interval", "0", "--train.save_final", "false",
        "--train.log_interval", str(10**6), "--train.out_dir", args.out, "--optim.warmup_steps", "1"]
    if args.deepspeed_config:
        overrides += ["--train.deepspeed_config", args.deepspeed_config]
    cfg = load_config(TrainConfig, args.config, overrides)
    vocab, length = cfg.model.vocab_size, cfg.data.seq_len + cfg.model.n_future_tokens

    def loaders(consumed, dp_rank, dp_world):
        gen = torch.Generator().manual_seed(dp_rank)
        batches = iter(lambda: torch.randint(0, vocab, (cfg.train.micro_batch_size, length), generator=gen), None)
        return batches, None

    result = Trainer(cfg, data_loaders=loaders).train()
    timed = result.train_log[args.warmup:]
    tps = statistics.median(r["tokens_per_s"] for r in timed)
    c = count_params(cfg.model)
    record = {"n": n,
              # Matmul weights a token passes through (each head reuses the unembedding): the step time's
              # first-order model, for comparing with the measured ratio.
              "matmul_params": c.trunk_blocks + c.heads + n * cfg.model.padded_vocab_size * cfg.model.dim, "tokens_per_s": tps, "step_s": cfg.train.micro_batch_size * cfg.data.seq_len / tps,
              "mfu": statistics.median(r["mfu"] for r in timed) if "mfu" in timed[0] else None,
              "peak_mem_gb": max(r.get("peak_mem_gb", 0.0) for r in timed) or None}
    print("RESULT " + json.dumps(record), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="training config (default: a ~20M-parameter CPU-sized model)")
    ap.add_argument("--deepspeed_config")
    ap.add_argument("--n", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--micro-batch", dest="micro_batch", type=int, default=4)
    ap.add_argument("--seq-len", dest="seq_len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=5, help="timed optimizer steps (after --warmup)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    results = {}
    for n in args.n:
        with tempfile.TemporaryDirectory() as out:
            cmd = [sys.executable, __file__, "--child", "--out", out, "--n", str(n), "--micro-batch",
                   str(args.micro_batch), "--seq-len", str(args.seq_len), "--steps", str(args.steps),
                   "--warmup", str(args.warmup)]
            cmd += ["--config", args.config] if args.config else []
            cmd += ["--deepspeed_config", args.deepspeed_config] if args.deepspeed_config else []
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                sys.exit(f"n={n} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            results[n] = json.loads(lines[-1][len("RESULT "):])
        r = results[n]
        extra = "".join(f", {k} {r[k]:.3f}" for k in ("mfu", "peak_mem_gb") if r[k] is not None)
        print(f"n={n}: {r['tokens_per_s']:.0f} tokens/s, {r['step_s']:.3f} s/step{extra}", flush=True)
    if 1 in results:
        for n in results:
            if n != 1:
                expected = results[n]["matmul_params"] / results[1]["matmul_params"]
                print(f"time(n={n}) / time(n=1) = {results[n]['step_s'] / results[1]['step_s']:.3f} "
                      f"(matmul weights per token: {expected:.3f}x; the unembedding is applied once per head)")


if __name__ == "__main__":
    main()
