"""Training throughput of the real trainer (DeepSpeed engine, sequential heads): n=4 heads against n=1 at the
same parameter count (n_layers counts the heads, so both models have the same blocks; n=4 moves three trunk
blocks into heads), eager against compiled blocks (train.compile), for each activation-recomputation policy.

    python bench/bench_train_step.py                                   # CPU: a ~20M model, fp32, ZeRO-0
    python bench/bench_train_step.py --config configs/1b.yaml --deepspeed_config ds_configs/zero1_bf16.json \\
        --micro-batch 8 --seq-len 2048 --modes eager compiled --recompute none selective full   # GPU, ~1B
    python bench/bench_train_step.py --activation-memory --config configs/1b.yaml   # what each policy keeps

Each run is a fresh process (a world of one; under the deepspeed launcher each rank runs its own copy). Prints
tokens/s, step time and (on GPU) MFU and peak memory per run, compiled/eager step time per (n, policy), and
time(n=4)/time(n=1) beside the ratio of matmul weights a token passes through. MFU counts model FLOPs only
(6 x matmul parameters + attention per token): recomputation is not counted, so "full" lowers MFU by what it
recomputes. --profile adds a summary of torch.profiler over the timed steps (top kernels, device idle gaps).
--activation-memory measures (torch's MemTracker, on the CPU, fp32) the activation memory one trunk block keeps
per token under each policy (bf16), and scales it to the micro-batch, sequence and trunk depth.
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
POLICY = {"none": ["--train.activation_checkpointing", "false"],
          "full": ["--train.activation_checkpointing", "true", "--train.activation_checkpoint_policy", "full"],
          "selective": ["--train.activation_checkpointing", "true",
                        "--train.activation_checkpoint_policy", "selective"]}


def load(args, n: int, extra: list[str]):
    from mtplm.pretrain.config import TrainConfig, load_config

    overrides = ([] if args.config else SMALL) + [
        "--model.n_future_tokens", str(n), "--data.seq_len", str(args.seq_len),
        "--train.micro_batch_size", str(args.micro_batch), "--train.grad_accum_steps", "1",
        "--train.steps", str(args.warmup + args.steps), "--train.eval_interval", "0", "--train.save_final", "false",
        # Each step read at its end: its own tokens/s, so the warm-up steps stay out of the timed ones.
        "--train.log_interval", "1", "--optim.warmup_steps", "1", *extra]
    if args.deepspeed_config:
        overrides += ["--train.deepspeed_config", args.deepspeed_config]
    return load_config(TrainConfig, args.config, overrides)


def profile_summary(prof, top: int = 8) -> list[str]:
    """Top kernels by self time, and (on a GPU) how much of the profiled span the device had no kernel running."""
    on_gpu = any(e.device_type.name == "CUDA" for e in prof.events())
    key = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    stats = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in stats) or 1
    lines = [f"profile: top {top} {'GPU kernels' if on_gpu else 'CPU ops'} by self time"]
    lines += [f"  {getattr(e, key) / total:6.1%}  {getattr(e, key) / 1e3:9.1f} ms  {e.count:6d}x  {e.key[:90]}"
              for e in stats[:top]]
    if on_gpu:
        spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                       if e.device_type.name == "CUDA" and e.time_range.end > e.time_range.start)
        busy, end = 0, spans[0][0] if spans else 0
        for s, e in spans:  # union of kernel intervals
            busy += max(0, e - max(s, end))
            end = max(end, e)
        span = (spans[-1][1] - spans[0][0]) if spans else 1
        lines.append(f"  device idle {1 - busy / max(span, 1):.1%} of the profiled span ({span / 1e3:.1f} ms)")
    else:
        lines.append("  (no GPU: idle gaps between device kernels not measured)")
    return lines


def child(args) -> None:
    import contextlib

    import torch

    from mtplm.model.flops import count_params
    from mtplm.pretrain.trainer import Trainer

    (n,) = args.n
    cfg = load(args, n, ["--train.out_dir", args.out, "--train.compile", str(args.mode == "compiled").lower(),
                         *POLICY[args.policy]])
    vocab, length = cfg.model.vocab_size, cfg.data.seq_len + cfg.model.n_future_tokens
    pin = torch.cuda.is_available()

    def loaders(consumed, dp_rank, dp_world):
        gen = torch.Generator().manual_seed(dp_rank)
        def batch():
            b = torch.randint(0, vocab, (cfg.train.micro_batch_size, length), generator=gen)
            return b.pin_memory() if pin else b  # as the real loader: pinned, copied with non_blocking
        return iter(batch, None), None

    prof, summary = None, []
    if args.profile:  # the timed steps only: the warm-up (compilation) is left out
        from torch.profiler import ProfilerActivity, profile, schedule
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        prof = profile(activities=acts, schedule=schedule(wait=args.warmup, warmup=0, active=args.steps, repeat=1),
                       on_trace_ready=lambda p: summary.extend(profile_summary(p)))

    trainer = Trainer(cfg, data_loaders=loaders)
    if prof is not None:  # one profiler step per optimizer step
        step = trainer.train_step
        trainer.train_step = lambda batches: (step(batches), prof.step())[0]
    with prof if prof is not None else contextlib.nullcontext():
        result = trainer.train()
    timed = result.train_log[args.warmup:]
    tps = statistics.median(r["tokens_per_s"] for r in timed)
    c = count_params(cfg.model)
    record = {"n": n, "mode": args.mode, "policy": args.policy,
              # Matmul weights a token passes through (each head reuses the unembedding): the step time's
              # first-order model, for comparing with the measured ratio.
              "matmul_params": c.trunk_blocks + c.heads + n * cfg.model.padded_vocab_size * cfg.model.dim,
              "tokens_per_s": tps, "step_s": cfg.train.micro_batch_size * cfg.data.seq_len / tps,
              "mfu": statistics.median(r["mfu"] for r in timed) if "mfu" in timed[0] else None,
              "peak_mem_gb": max(r.get("peak_mem_gb", 0.0) for r in timed) or None,
              "profile": summary}
    print("RESULT " + json.dumps(record), flush=True)


def activation_memory(args) -> None:
    """Activation bytes one trunk block keeps per token under each policy (bf16, MemTracker on the CPU)."""
    import torch
    from torch.distributed._tools.mem_tracker import MemTracker

    from mtplm.model.transformer import TransformerBlock, rope_for
    from mtplm.pretrain.parallel.recompute import selective_checkpoint

    cfg = load(args, 4, [])
    tokens = min(cfg.data.seq_len, 512)  # activation memory is linear in tokens (SDPA keeps no T x T scores)
    x = torch.randn(1, tokens, cfg.model.dim, dtype=torch.bfloat16, requires_grad=True)
    rope = rope_for(x, cfg.model)
    block = TransformerBlock(cfg.model).to(torch.bfloat16)
    per_token = {}
    for policy in ("none", "selective", "full"):
        block.recompute = {"none": None, "selective": selective_checkpoint,
                           "full": lambda fn, *a: torch.utils.checkpoint.checkpoint(fn, *a, use_reentrant=False)}[policy]
        tracker = MemTracker()
        tracker.track_external(block)
        with tracker:
            out = block(x, rope)
            kept = tracker.get_tracker_snapshot("current")[torch.device("cpu")]
        per_token[policy] = next(v for k, v in kept.items() if getattr(k, "value", None) == "Activation") / tokens
        out.sum().backward()
    scale = cfg.train.micro_batch_size * cfg.data.seq_len * cfg.model.n_trunk_layers
    for policy, b in per_token.items():
        print(f"{policy:9s} {b / cfg.model.dim:5.1f} x dim bytes per token per block; trunk of "
              f"{cfg.model.n_trunk_layers} blocks at micro-batch {cfg.train.micro_batch_size} x {cfg.data.seq_len} "
              f": {b * scale / 2**30:6.1f} GiB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="training config (default: a ~20M-parameter CPU-sized model)")
    ap.add_argument("--deepspeed_config")
    ap.add_argument("--n", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--modes", nargs="+", choices=["eager", "compiled"], default=["eager"])
    ap.add_argument("--recompute", nargs="+", choices=list(POLICY), default=["none"],
                    help="activation recomputation policies to run (none, full, selective)")
    ap.add_argument("--micro-batch", dest="micro_batch", type=int, default=4)
    ap.add_argument("--seq-len", dest="seq_len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=5, help="timed optimizer steps (after --warmup)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation happens here)")
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler summary of the timed steps")
    ap.add_argument("--activation-memory", dest="activation_memory", action="store_true",
                    help="measure what one trunk block keeps per policy instead of timing steps")
    ap.add_argument("--json", help="also write every run's record to this file")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--policy", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.activation_memory:
        return activation_memory(args)
    if args.child:
        return child(args)
    results = {}
    for n in args.n:
        for policy in args.recompute:
            for mode in args.modes:
                with tempfile.TemporaryDirectory() as out:
                    cmd = [sys.executable, __file__, "--child", "--out", out, "--n", str(n), "--mode", mode,
                           "--policy", policy, "--micro-batch", str(args.micro_batch), "--seq-len",
                           str(args.seq_len), "--steps", str(args.steps), "--warmup", str(args.warmup)]
                    cmd += ["--config", args.config] if args.config else []
                    cmd += ["--deepspeed_config", args.deepspeed_config] if args.deepspeed_config else []
                    cmd += ["--profile"] if args.profile else []
                    proc = subprocess.run(cmd, capture_output=True, text=True,
                                          cwd=Path(__file__).resolve().parent.parent)
                    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
                    if proc.returncode != 0 or not lines:
                        sys.exit(f"n={n} {mode} {policy} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
                r = results[n, policy, mode] = json.loads(lines[-1][len("RESULT "):])
                extra = "".join(f", {k} {r[k]:.3f}" for k in ("mfu", "peak_mem_gb") if r[k] is not None)
                print(f"n={n} {mode:8s} recompute {policy:9s}: {r['tokens_per_s']:.0f} tokens/s, "
                      f"{r['step_s']:.3f} s/step{extra}", flush=True)
                for line in r["profile"]:
                    print(line, flush=True)
    if any(r["mfu"] is not None for r in results.values()):
        print("MFU: model FLOPs only; recomputed FLOPs are not counted")
    for (n, policy, mode), r in results.items():
        if mode == "compiled" and (n, policy, "eager") in results:
            print(f"n={n} recompute {policy}: compiled / eager step time = "
                  f"{r['step_s'] / results[n, policy, 'eager']['step_s']:.3f}")
    for (n, policy, mode), r in results.items():
        if n != 1 and (1, policy, mode) in results:
            expected = r["matmul_params"] / results[1, policy, mode]["matmul_params"]
            print(f"{mode} recompute {policy}: time(n={n}) / time(n=1) = "
                  f"{r['step_s'] / results[1, policy, mode]['step_s']:.3f} (matmul weights per token: "
                  f"{expected:.3f}x; the unembedding is applied once per head)")
    if args.json:
        Path(args.json).write_text(json.dumps([r for r in results.values()], indent=1))


if __name__ == "__main__":
    main()
