"""mtp-preprocess on a real corpus: the Python standard library's source, as JSONL, repeated to --mb.

    python bench/bench_preprocess.py [--mb 100] [--small-mb 30] [--vocab-size 32000] [--shard-mb 4]

Trains one SentencePiece BPE tokenizer on the code first (not timed). Then, each run a fresh process into a fresh
folder: the corpus with 1 worker, 2 workers and all cores (tokens/s and the scaling ratios), and a smaller corpus
with 2 workers, for peak memory (resident set: VmHWM, see preprocess_pool.peak_rss_mb) of the main process and of
each worker at two input sizes. Last, a cProfile of one worker doing one unit (--shard-mb of input), its time split
into reading (file, JSON, UTF-8), tokenizing (SentencePiece) and writing (token arrays, .bin/.idx, manifest).
The machine's load matters: on a shared machine the scaling says more about the other jobs than about this code.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import subprocess
import sys
import tempfile
from pathlib import Path

from mtplm.data.preprocess_plan import plan_units
from mtplm.data.preprocess_pool import init_worker, process_unit
from mtplm.data.tokenizer import load_tokenizer, train_sentencepiece

SKIP = ("/test/", "/tests/", "/idlelib/", "/site-packages/", "/__pycache__/")
RUN = """import json, sys
from mtplm.data.preprocess import PreprocessConfig, run_preprocess
cfg = PreprocessConfig(**json.loads(sys.argv[1]))
print(json.dumps(run_preprocess(cfg, log=lambda m: None)["run"]))"""


def build_corpus(folder: Path, mb: int) -> tuple[list[Path], list[str]]:
    """The stdlib's .py files (tests excluded) as one JSONL file, copied until the copies hold `mb` MiB."""
    stdlib = Path(os.__file__).resolve().parent
    texts = [f.read_text(errors="replace") for f in sorted(stdlib.rglob("*.py")) if not any(s in str(f) for s in SKIP)]
    data = "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
    folder.mkdir()
    copies = []
    while len(copies) * len(data) < mb * 2**20:
        copies.append(folder / f"stdlib_{len(copies):03d}.jsonl")
        copies[-1].write_bytes(data)
    return copies, texts


def run(inputs, out, tok, workers, shard_bytes) -> dict:
    cfg = dict(inputs=[str(p) for p in inputs], output=str(out), tokenizer=str(tok), workers=workers,
               shard_bytes=shard_bytes)
    proc = subprocess.run([sys.executable, "-c", RUN, json.dumps(cfg)], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


CATEGORIES = (  # (category, substrings of pstats' "file:line(function)" that belong to it), first match wins
    ("tokenizing", ("sentencepiece", "tokenizer.py")),
    ("writing", ("indexed_dataset.py", "numpy", "BufferedWriter", "tobytes", "manifest.py", "json/encoder",
                 "'dump", "os.replace", "truncate")),
    ("reading", ("readers.py", "json/decoder", "json/__init__", "'decode' of 'bytes'", "'encode' of 'str'",
                 "readline", "BufferedReader", "_io.open", "scanner")),
)


def profile_unit(unit, task) -> dict:
    prof = cProfile.Profile()
    prof.runcall(process_unit, unit, task)
    st = pstats.Stats(prof)
    split = {c: 0.0 for c, _ in CATEGORIES} | {"other": 0.0}
    for (file, line, func), (_, _, tottime, _, _) in st.stats.items():
        where = f"{file}:{line}({func})"
        split[next((c for c, keys in CATEGORIES if any(k in where for k in keys)), "other")] += tottime
    return split


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=int, default=100, help="corpus size for the scaling runs (MiB)")
    p.add_argument("--small-mb", type=int, default=30, help="the second input size for peak memory (MiB)")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--shard-mb", type=int, default=4, help="--shard-bytes, in MiB: the unit a worker does at once")
    args = p.parse_args()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        copies, texts = build_corpus(tmp / "in", args.mb)
        mb = sum(c.stat().st_size for c in copies) / 2**20
        sample, n = [], 0
        for t in texts:  # the tokenizer learns from the first 8 MiB of code
            sample.append(t)
            n += len(t)
            if n >= 8 << 20:
                break
        tok = train_sentencepiece(sample, tmp / "sp", args.vocab_size)
        print(f"corpus: stdlib source as JSONL, {len(copies)} copies, {mb:.0f} MiB; SentencePiece BPE "
              f"{args.vocab_size} pieces trained on {n / 2**20:.1f} MiB of it; {cores} cores; "
              f"units of {args.shard_mb} MiB")
        shard_bytes = args.shard_mb << 20
        results = {}
        for workers in dict.fromkeys((1, 2, cores)):
            r = results[workers] = run(copies, tmp / f"w{workers}", tok, workers, shard_bytes)
            rss = r["max_rss_mb"]
            print(f"{mb:.0f} MiB, workers={workers:>2}: {r['documents']} docs, {r['tokens']} tokens in "
                  f"{r['seconds']:.1f}s "
                  f"-> {r['tokens_per_s']:,.0f} tokens/s ({r['tokens_per_s'] / workers:,.0f} per worker), "
                  f"{r['mb_per_s']:.2f} MB/s; peak RSS main {rss['main']:.0f} MiB, "
                  + (f"workers {', '.join(f'{w:.0f}' for w in rss['workers'])} MiB" if rss["workers"]
                     else "(the worker is the main process)"))
        for workers in results:
            if workers > 1:
                ratio = results[workers]["tokens_per_s"] / results[1]["tokens_per_s"]
                print(f"scaling 1 -> {workers} workers: {ratio:.2f}x tokens/s")
        small = copies[:max(1, round(len(copies) * args.small_mb / mb))]
        r = run(small, tmp / "small", tok, 2, shard_bytes)
        rss = r["max_rss_mb"]
        print(f"{sum(c.stat().st_size for c in small) / 2**20:.0f} MiB, workers= 2: {r['tokens_per_s']:,.0f} tokens/s; "
              f"peak RSS main {rss['main']:.0f} MiB, workers {', '.join(f'{w:.0f}' for w in rss['workers'])} MiB")

        unit = plan_units(copies[:1], "auto", shard_bytes)[0]
        tk = load_tokenizer(tok)
        init_worker(str(tok))
        task = dict(out=str(tmp / "w1"), format="auto", text_key="text", on_error="skip", eod=tk.eod_id,
                    dtype="uint16", tokenizer_sha256=tk.sha256, vocab_size=tk.vocab_size)
        split = profile_unit(unit, task)
        total = sum(split.values())
        print(f"one worker, one unit ({unit.nbytes / 2**20:.1f} MiB), cProfile {total:.1f}s: " +
              ", ".join(f"{c} {t / total:.0%}" for c, t in split.items()))


if __name__ == "__main__":
    main()
