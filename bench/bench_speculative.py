"""Plain vs self-speculative greedy decoding on the same model, in one run.

    mtp-demo                                   # trains the model this uses by default (runs/demo/final)
    python bench/bench_speculative.py [--model runs/demo/final] [--max-new-tokens 64] [--prompts 8] [--repeats 3]
    python bench/bench_speculative.py --compile --dtype bfloat16     # on a GPU: compiled steps, CUDA graphs

For k = 0 (plain, head 1 only) .. n-1 draft heads, batch sizes 1 and 8, on code prompts (this repository's
own sources, which the demo never trains on) and text prompts (the English of Python's LICENSE): tokens/s,
tokens per forward (the paper's "average accepted"), the speedup over plain decoding and
speedup / tokens-per-forward (how much of the accepted drafts' gain survives the cost of verifying k+1 tokens
and drafting). A batch runs until its slowest sequence is done, so beyond batch 1 the forwards saved fall
short of the tokens per forward: "fwd ratio" is plain decoding's forwards over speculative decoding's, and
"step cost" = speedup / fwd ratio is the time of a plain step over that of a speculative one, the per-step
overhead alone (at batch 1 it equals speedup/tpf; beyond, finished sequences leave the batch, so the last
steps of a speculative batch are narrower).
The heads run side by side as one batched block (inference/stacked_heads.py), so a speculative step takes
about the operations of a plain one; but it reads the weights of k+1 heads where plain decoding reads one.
"weight bound" is that ratio's ceiling where decoding is bound by weight reads (small batches of large models
on a GPU, and this CPU): weights read by a plain step / by a speculative one, (trunk + head + unembedding) /
(trunk + (k+1) heads + unembedding). For Meta's 7B n=4 it is 0.91 at k=3; for the demo's 4-block trunk 0.67.
Each configuration runs --repeats times, interleaved, and the fastest run counts (CPU timings are noisy).
Greedy outputs are compared with plain decoding on every run; any sequence that differs is counted and reported
(in float32 on the CPU none may; on a GPU, and in bfloat16, verifying k+1 positions in one forward rounds
differently from one position at a time, so a near-tie in head 1's logits can flip: --dtype shows how often).
--compile: every k runs the compiled static-shape step (inference/static_decode.py; one compilation per batch
size and k, in the warm-up), and eager plain decoding runs beside it: its tokens/s and the compiled/eager ratio
are printed after each table block, and the 'differ' column counts outputs unlike eager plain decoding's.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from mtplm.data.tokenizer import load_tokenizer
from mtplm.inference.generate import load_any
from mtplm.inference.speculative import GenerationStats, MTPGenerator

PAPER = "paper, Table S2 (7B, n=4, 3 drafts): tokens/forward 3.50 code, 3.12 Wikipedia; speedup 3.05 and 2.74"


def code_prompts(tok, count: int, length: int) -> list[list[int]]:
    """The openings of this repository's own sources: code the demo never trains on (it trains on the standard
    library), and the same on every machine (the standard library's files differ between Python versions)."""
    root = Path(__file__).resolve().parent.parent
    files = sorted(f for d in ("model", "data", "pretrain", "inference") for f in (root / d).glob("*.py")
                   if f.name != "__init__.py")
    return [tok.encode(f.read_text())[:length] for f in files[:: max(1, len(files) // count)][:count]]


def text_prompts(tok, count: int, length: int) -> list[list[int]]:
    license_file = Path(os.__file__).resolve().parent / "LICENSE.txt"
    paragraphs = [p.strip() for p in license_file.read_text().split("\n\n") if len(p.strip()) > 300]
    return [tok.encode(p)[:length] for p in paragraphs[:count]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="runs/demo/final")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--compile", action="store_true",
                   help="compiled static-shape decoding steps (CUDA graphs on a GPU), beside eager plain decoding")
    args = p.parse_args()
    path = Path(args.model)
    if not path.exists():
        sys.exit(f"{path} does not exist: run `mtp-demo` first (it writes runs/demo/final), or pass --model")
    model = load_any(path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device=device, dtype=getattr(torch, args.dtype))
    tok_file = path / "tokenizer.model"
    if not tok_file.is_file() and model.cfg.vocab_size != 256:
        sys.exit(f"{path} has no tokenizer.model (only a 256-token vocabulary is taken as bytes without one)")
    tok = load_tokenizer(tok_file if tok_file.is_file() else "bytes")
    gen = MTPGenerator(model)
    n = model.cfg.n_future_tokens
    print(f"model {path} (n={n}, {sum(x.numel() for x in model.parameters()) / 1e6:.1f}M params) on "
          f"{torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}, {args.dtype}; {args.max_new_tokens} new tokens, "
          f"greedy{', compiled decoding steps' if args.compile else ''}")
    numel = lambda module: sum(x.numel() for x in module.parameters())  # noqa: E731
    trunk, head, unembed = sum(numel(b) for b in model.layers[:-1]), numel(model.layers[-1]), model.output.weight.numel()
    print(f"{'prompts':>7} {'batch':>5} {'k':>2} {'tokens/s':>9} {'tok/fwd':>8} {'speedup':>8} {'speedup/tpf':>11} "
          f"{'fwd ratio':>9} {'step cost':>9} {'weight bound':>12} {'differ':>6}  acceptance by draft position")
    mismatched = 0
    # With --compile every k runs compiled, and eager plain decoding beside them: the baseline and the reference
    # the outputs are compared with.
    runs = [(k, args.compile) for k in range(n)] + [(0, False)] * args.compile
    for name, prompts in (("code", code_prompts(tok, args.prompts, args.prompt_tokens)),
                          ("text", text_prompts(tok, args.prompts, args.prompt_tokens))):
        for bs in args.batch_sizes:
            batches = [prompts[i:i + bs] for i in range(0, len(prompts), bs)]
            for k, compiled in runs:  # warm-up; compiling: each (batch size, k) compiles its own step here
                for batch in batches:
                    gen.generate(batch, args.max_new_tokens if compiled else 4, draft_heads=k, compile=compiled)
            best: dict[tuple[int, bool], GenerationStats] = {}
            outputs = {}
            differ = dict.fromkeys(runs, 0)  # sequences unlike plain (eager) decoding's, worst run
            for _ in range(args.repeats):
                for run in reversed(runs):  # eager plain first: the reference
                    outs, total = [], None
                    for batch in batches:
                        o, s = gen.generate(batch, args.max_new_tokens, draft_heads=run[0], compile=run[1])
                        outs += o
                        total = s if total is None else total + s
                    outputs[run] = outs
                    differ[run] = max(differ[run], sum(a != b for a, b in zip(outs, outputs[(0, False)])))
                    if run not in best or total.seconds < best[run].seconds:
                        best[run] = total
            mismatched += sum(differ.values())
            base = best[(0, args.compile)]
            base_rate, base_forwards = base.tokens_per_second, base.forwards
            for k in range(n):
                total = best[(k, args.compile)]
                rate, tpf = total.tokens_per_second, total.tokens_per_forward
                acc_str = " ".join(f"{a:.2f}" for a in total.acceptance) or "-"
                speedup = rate / base_rate
                bound = (trunk + head + unembed) / (trunk + (k + 1) * head + unembed)
                fwd_ratio = base_forwards / total.forwards
                print(f"{name:>7} {bs:>5} {k:>2} {rate:>9.1f} {tpf:>8.2f} {speedup:>8.2f} {speedup / tpf:>11.2f} "
                      f"{fwd_ratio:>9.2f} {speedup / fwd_ratio:>9.2f} {bound:>12.2f} "
                      f"{differ[(k, args.compile)]:>6}  {acc_str}")
            if args.compile:
                eager = best[(0, False)].tokens_per_second
                print(f"{name:>7} {bs:>5}  plain decoding: eager {eager:.1f} tokens/s, compiled {base_rate:.1f} "
                      f"tokens/s ({base_rate / eager:.2f}x)")
    print(PAPER)
    if mismatched:
        print(f"WARNING: speculative output differed from plain greedy decoding in {mismatched} sequences (worst run "
              f"of each k); see the 'differ' column")
        if args.dtype == "float32" and device == "cpu" and not args.compile:  # compiled kernels round differently
            sys.exit("LOSSLESSNESS VIOLATED in float32 on the CPU: that is a bug")


if __name__ == "__main__":
    main()
