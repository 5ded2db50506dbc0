"""Peak memory and step time of one training step: naive vs sequential vs sequential+chunked MTP heads.

    python bench/bench_mtp_memory.py                      # the issue's setting: V=32000, d=1024, 8192 tokens
    python bench/bench_mtp_memory.py --tokens 2048 --n 1 4 --steps 2   # quicker on a laptop CPU

Each (path, n) runs in a fresh subprocess so peaks do not mask each other. On GPU the peak is
torch.cuda.max_memory_allocated() during the step minus what was allocated before it; on CPU it is the
growth of the process's peak resident set (ru_maxrss) over the resident set just before the step.
The model is a head-dominated one: two trunk blocks plus n heads, one shared unembedding.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

PATHS = {"naive": ("naive", None), "sequential": ("sequential", "all"), "sequential+chunked": ("sequential", None)}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure(path: str, n: int, args) -> dict:
    import torch

    from mtplm.model.config import ModelConfig
    from mtplm.model.transformer import MTPTransformer

    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    torch.manual_seed(0)
    cfg = ModelConfig(dim=args.dim, n_layers=args.trunk_layers + n, n_heads=args.dim // 128, vocab_size=args.vocab,
                      n_future_tokens=n, max_seq_len=args.seq_len)
    impl, chunk = PATHS[path]
    batch = args.tokens // args.seq_len
    model = MTPTransformer(cfg, loss_impl=impl, ce_chunk_tokens=(batch * args.seq_len if chunk == "all" else None))
    dtype = torch.bfloat16 if (device == "cuda" and args.bf16) else torch.float32
    model = model.to(device=device, dtype=dtype)
    x = torch.randint(0, args.vocab, (batch, args.seq_len + n), device=device)

    def step():
        out = model(x[:, : args.seq_len], x[:, 1:])
        out.loss.backward()
        return out

    step()  # warm-up: allocates gradients, so the measured step's growth is activations and logits only
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = rss_bytes()
        # ru_maxrss cannot be reset; the warm-up step set it, so a later step shows only growth beyond it
        peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, peak_before) - base
    return {"path": path, "n": n, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "peak_bytes": peak, "step_s": statistics.median(times)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--tokens", type=int, default=8192, help="tokens per micro-batch")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--trunk-layers", type=int, default=2)
    p.add_argument("--n", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    p.add_argument("--bf16", action="store_true", help="bf16 weights and activations (GPU)")
    p.add_argument("--cpu", action="store_true", help="stay on the CPU even if a GPU is present")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--_one", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args._one:
        print(json.dumps(measure(args._one[0], int(args._one[1]), args)))
        return

    passthrough = [a for a in sys.argv[1:] if a != "--json" and not a.endswith(".json")]
    results = {}
    for n in args.n:
        for path in args.paths:
            # glibc otherwise keeps freed memory resident, and RSS would remember the largest past tensor.
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
            out = subprocess.run([sys.executable, __file__, *passthrough, "--_one", path, str(n)],
                                 capture_output=True, text=True, env=env)
            if out.returncode != 0:
                print(f"{path} n={n} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            results[(path, n)] = r
            print(f"{path:>20} n={n}: peak {r['peak_bytes'] / 2**30:7.2f} GiB  step {r['step_s']:7.3f} s", flush=True)

    device = next(iter(results.values()))["device"] if results else "?"
    print(f"\nV={args.vocab} d={args.dim} tokens/micro-batch={args.tokens} trunk={args.trunk_layers} blocks, "
          f"device={device}")
    print(f"{'path':>20} " + " ".join(f"{'n=' + str(n):>18}" for n in args.n))
    for path in args.paths:
        cells = []
        for n in args.n:
            r = results.get((path, n))
            cells.append(f"{r['peak_bytes'] / 2**30:6.2f}G {r['step_s']:7.3f}s" if r else f"{'-':>18}")
        print(f"{path:>20} " + " ".join(f"{c:>18}" for c in cells))

    def ratio(a, b, key):
        return results[a][key] / results[b][key] if a in results and b in results and results[b][key] else float("nan")

    n_hi = 4 if 4 in args.n else max(args.n)
    n_lo = 1 if 1 in args.n else min(args.n)
    print()
    for path in args.paths:
        print(f"peak(n={n_hi}) / peak(n={n_lo}), {path}: {ratio((path, n_hi), (path, n_lo), 'peak_bytes'):.2f}")
    print(f"peak(naive, n={n_hi}) / peak(sequential+chunked, n={n_hi}): "
          f"{ratio(('naive', n_hi), ('sequential+chunked', n_hi), 'peak_bytes'):.2f}")
    for n in args.n:
        print(f"time(sequential+chunked) / time(naive), n={n}: "
              f"{ratio(('sequential+chunked', n), ('naive', n), 'step_s'):.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([v for v in results.values()], f, indent=1)


if __name__ == "__main__":
    main()
