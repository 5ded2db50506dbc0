"""Preprocessing throughput on a real corpus (the Python standard library's source): 1 worker vs all cores.

    python bench/bench_preprocess.py [--workers N] [--vocab-size 4096]

Trains one SentencePiece tokenizer first (not timed), then tokenizes the same inputs with 1 worker and with
N workers (default: all cores) into fresh folders, and prints tokens/s, MB/s and the scaling ratio.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from mtplm.data.preprocess import PreprocessConfig, run_preprocess

SKIP = ["*/test/*", "*/tests/*", "*/idlelib/*", "*/site-packages/*", "*/__pycache__/*"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--vocab-size", type=int, default=4096)
    args = p.parse_args()
    stdlib = str(Path(os.__file__).resolve().parent)
    with tempfile.TemporaryDirectory() as tmp:
        base = dict(inputs=[stdlib], include=["*.py"], exclude=SKIP)
        tok_run = run_preprocess(PreprocessConfig(output=f"{tmp}/tok", train_tokenizer=True,
                                                  vocab_size=args.vocab_size, tokenizer_sample_mb=20, workers=1,
                                                  **base), log=lambda m: None)
        tok = tok_run["tokenizer"]
        results = {}
        for workers in (1, args.workers):
            r = run_preprocess(PreprocessConfig(output=f"{tmp}/w{workers}", tokenizer=tok, workers=workers, **base),
                               log=lambda m: None)["run"]
            results[workers] = r
            print(f"workers={workers:>2}: {r['documents']} docs, {r['tokens']} tokens, {r['bytes'] / 2**20:.1f} MB in "
                  f"{r['seconds']:.1f}s -> {r['tokens_per_s']:,.0f} tokens/s, {r['mb_per_s']:.2f} MB/s")
        one, many = results[1], results[args.workers]
        print(f"scaling {args.workers} workers / 1 worker: {many['tokens_per_s'] / one['tokens_per_s']:.2f}x "
              f"(tokens/s; {os.cpu_count()} cores on this machine)")


if __name__ == "__main__":
    main()
