"""The sample index at billion-token scale: a synthetic dataset (random tokens, no tokenizer) of --tokens
tokens in --docs documents; reports index build time, cached open time, peak RSS and random-sample reads.

    python bench/bench_dataset.py                        # 1e9 tokens, 1e6 documents (2 GB of uint16 on disk)
    python bench/bench_dataset.py --tokens 1e8 --docs 1e5
"""

from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from mtplm.data.gpt_dataset import GPTSampleDataset, ShardedDocuments, split_documents
from mtplm.data.indexed_dataset import write_index


def write_synthetic(prefix: Path, n_tokens: int, n_docs: int, vocab: int) -> None:
    rng = np.random.default_rng(0)
    cuts = np.unique(rng.integers(1, n_tokens, n_docs - 1))
    lengths = np.diff(np.concatenate([[0], cuts, [n_tokens]])).astype(np.int32)
    with open(f"{prefix}.bin", "wb") as f:
        chunk = 1 << 26
        for start in range(0, n_tokens, chunk):
            f.write(rng.integers(0, vocab, min(chunk, n_tokens - start), dtype=np.uint16).tobytes())
    write_index(Path(f"{prefix}.idx"), np.dtype(np.uint16), lengths)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=float, default=1e9)
    p.add_argument("--docs", type=float, default=1e6)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--n-future", type=int, default=4)
    p.add_argument("--reads", type=int, default=20000)
    p.add_argument("--dir", help="where to write the data (default: a temporary folder, removed after)")
    p.add_argument("--_measure", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    n_tokens, n_docs = int(args.tokens), int(args.docs)
    tmp = Path(args.dir or tempfile.mkdtemp(prefix="mtp-bench-"))
    if not args._measure:
        try:
            t0 = time.perf_counter()
            write_synthetic(tmp / "synth", n_tokens, n_docs, 32000)
            print(f"wrote {n_tokens:,} tokens in {n_docs:,} documents in {time.perf_counter() - t0:.1f}s")
            # Measured in a fresh process, so the peak RSS is the dataset's and not the writer's.
            subprocess.run([sys.executable, __file__, *sys.argv[1:], "--dir", str(tmp), "--_measure"], check=True)
        finally:
            if not args.dir:
                shutil.rmtree(tmp, ignore_errors=True)
        return
    if True:
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

        def open_dataset():
            docs = ShardedDocuments([tmp / "synth"])
            ids = split_documents(len(docs), [0.99, 0.01, 0.0], 1234)["train"]
            ds = GPTSampleDataset(docs, ids, args.seq_len, args.n_future, 1234, tmp / "cache", "synth")
            ds.epoch_index(0)
            return ds

        t0 = time.perf_counter()
        ds = open_dataset()
        build = time.perf_counter() - t0
        t0 = time.perf_counter()
        ds = open_dataset()
        cached = time.perf_counter() - t0
        rng = np.random.default_rng(1)
        idx = rng.integers(0, len(ds), args.reads)
        t0 = time.perf_counter()
        for i in idx:
            ds.sample(i)
        read_s = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(f"samples per epoch: {len(ds):,} of {args.seq_len}+{args.n_future} tokens")
        print(f"index build (document split, shuffle, sample index): {build:.2f}s; cached open: {cached:.3f}s "
              f"(ratio {build / max(cached, 1e-9):.0f}x)")
        print(f"random sample reads: {args.reads / read_s:,.0f} samples/s ({args.reads / read_s * args.seq_len:,.0f} tokens/s)")
        print(f"peak RSS: {peak / 2**10:.0f} MiB (before opening: {rss0 / 2**10:.0f} MiB); data on disk: "
              f"{n_tokens * 2 / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
