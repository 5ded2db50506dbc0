"""Plain vs self-speculative greedy decoding on the same model, in one run.

    mtp-demo                                   # trains the model this uses by default (runs/demo/final)
    python bench/bench_speculative.py [--model runs/demo/final] [--max-new-tokens 64] [--prompts 8]

For k = 0 (plain, head 1 only) .. n-1 draft heads, batch sizes 1 and 8, on code prompts (the standard
library's test files, which the demo never trains on) and text prompts (the English of Python's LICENSE):
tokens/s, tokens per forward (the paper's "average accepted"), the speedup over plain decoding and
speedup / tokens-per-forward (how much of the accepted drafts' gain survives the drafting overhead).
"block bound" is that ratio's ceiling from depth alone: a speculative step runs the trunk and k+1 head blocks
where plain decoding runs the trunk and one, so (trunk + 1) / (trunk + k + 1) blocks. For Meta's 7B n=4
(28 trunk blocks) that is 0.91 at k=3; for the demo's 4-block trunk it is 0.63, whatever the implementation.
Greedy outputs are checked to be identical to plain decoding on every run.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from mtplm.data.tokenizer import load_tokenizer
from mtplm.inference.generate import load_any
from mtplm.inference.speculative import MTPGenerator

PAPER = "paper, Table S2 (7B, n=4, 3 drafts): tokens/forward 3.50 code, 3.12 Wikipedia; speedup 3.05 and 2.74"


def code_prompts(tok, count: int, length: int) -> list[list[int]]:
    root = Path(os.__file__).resolve().parent / "test"
    files = sorted(root.glob("test_*.py"))[:: max(1, len(sorted(root.glob("test_*.py"))) // count)][:count]
    return [tok.encode(f.read_text(errors="replace"))[:length] for f in files]


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
    args = p.parse_args()
    path = Path(args.model)
    if not path.exists():
        sys.exit(f"{path} does not exist: run `mtp-demo` first (it writes runs/demo/final), or pass --model")
    model = load_any(path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device)
    tok = load_tokenizer(path / "tokenizer.model")
    gen = MTPGenerator(model)
    n = model.cfg.n_future_tokens
    print(f"model {path} (n={n}, {sum(x.numel() for x in model.parameters()) / 1e6:.1f}M params) on "
          f"{torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}; {args.max_new_tokens} new tokens, greedy")
    trunk = model.cfg.n_trunk_layers
    print(f"{'prompts':>7} {'batch':>5} {'k':>2} {'tokens/s':>9} {'tok/fwd':>8} {'speedup':>8} {'speedup/tpf':>11} "
          f"{'block bound':>11}  acceptance by draft position")
    for name, prompts in (("code", code_prompts(tok, args.prompts, args.prompt_tokens)),
                          ("text", text_prompts(tok, args.prompts, args.prompt_tokens))):
        for bs in args.batch_sizes:
            batches = [prompts[i:i + bs] for i in range(0, len(prompts), bs)]
            gen.generate(batches[0], 4, draft_heads=0)  # warm-up
            base_rate, base_out = None, None
            for k in range(n):
                outs, total = [], None
                for batch in batches:
                    o, s = gen.generate(batch, args.max_new_tokens, draft_heads=k)
                    outs += o
                    total = s if total is None else total + s
                rate, tpf = total.tokens_per_second, total.tokens_per_forward
                if k == 0:
                    base_rate, base_out = rate, outs
                elif outs != base_out:
                    sys.exit(f"LOSSLESSNESS VIOLATED: {name} batch {bs} k={k} differs from plain greedy decoding")
                acc_str = " ".join(f"{a:.2f}" for a in total.acceptance) or "-"
                speedup = rate / base_rate
                bound = (trunk + 1) / (trunk + k + 1)
                print(f"{name:>7} {bs:>5} {k:>2} {rate:>9.1f} {tpf:>8.2f} {speedup:>8.2f} {speedup / tpf:>11.2f} "
                      f"{bound:>11.2f}  {acc_str}")
    print(PAPER)


if __name__ == "__main__":
    main()
