"""mtp-preprocess: raw text, JSONL or Parquet in; pretokenized shards in Megatron's indexed format out.

    mtp-preprocess data/raw/ --output data/code --train-tokenizer --vocab-size 32000 --include "*.jsonl.gz"
    mtp-preprocess corpus.parquet --output data/web --tokenizer tok.model --text-key content --workers 16
    mtp-preprocess books/ --output data/bytes --tokenizer bytes        # byte-level (vocab 256)

Output folder: shard_00000.{idx,bin,json}, ..., tokenizer.model and tokenizer_sample.json (when trained
here: the tokenizer and the sample of the inputs it learned from) and dataset.json, which is written last.
Inputs are read in order by this process (so a bad record is reported with its file and line), tokenized
by a pool of workers, and written to shards that close at input boundaries once they hold
--max-shard-tokens. A shard becomes visible only when complete; re-running the same command skips inputs
already in complete shards and finishes the rest.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from mtplm.config import ConfigError, config_error_exit, from_dict, merge, parse_overrides, read_config_file

from .indexed_dataset import IndexedDatasetWriter, token_dtype
from .manifest import DATASET_MANIFEST, TOOL_VERSION, read_manifest, shard_manifest_path, write_json_atomic
from .preprocess_job import JOB_FILE, PreprocessError, check_job, job_settings, recorded_job
from .preprocess_pool import init_worker, start_pool, stop_pool, tokenize_batch
from .readers import BadInput, BadRecord, discover, input_format, read_documents
from .tokenizer import BYTE_TOKENIZER, load_tokenizer, train_sentencepiece
from .tokenizer_sample import TOKENIZER_SAMPLE, sample_texts


@dataclass
class PreprocessConfig:
    inputs: list[str] = field(default_factory=list)  # files, folders, globs
    output: str = ""
    include: list[str] = field(default_factory=list)  # fnmatch patterns a file must match (path or name)
    exclude: list[str] = field(default_factory=list)
    format: str = "auto"  # auto (by extension), text, jsonl, parquet
    text_key: str = "text"
    tokenizer: str | None = None  # a SentencePiece .model, or "bytes"
    train_tokenizer: bool = False
    vocab_size: int = 32000
    tokenizer_type: str = "bpe"  # bpe or unigram
    tokenizer_sample_mb: int = 200  # text read to train the tokenizer
    append_eod: bool = True
    max_shard_tokens: int = 500_000_000
    workers: int = 0  # 0: all cores
    on_error: str = "skip"  # skip (report and count) or fail
    batch_docs: int = 256  # documents per tokenization task

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ConfigError("inputs: give at least one input file, folder or glob")
        if not self.output:
            raise ConfigError("output: give the output folder (--output DIR)")
        if self.format not in ("auto", "text", "jsonl", "parquet"):
            raise ConfigError(f"format: expected auto, text, jsonl or parquet, got {self.format!r}")
        if self.on_error not in ("skip", "fail"):
            raise ConfigError(f"on_error: expected skip or fail, got {self.on_error!r}")
        if self.train_tokenizer == (self.tokenizer is not None):
            raise ConfigError("tokenizer: give exactly one of --tokenizer PATH|bytes and --train-tokenizer")
        if self.tokenizer_type not in ("bpe", "unigram"):
            raise ConfigError(f"tokenizer_type: expected bpe or unigram, got {self.tokenizer_type!r}")
        for key in ("vocab_size", "max_shard_tokens", "batch_docs", "tokenizer_sample_mb"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if self.workers < 0:
            raise ConfigError(f"workers: must be >= 0, got {self.workers}")


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the run; the message says what was completed."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class _Terminated(KeyboardInterrupt):
    pass


# -- the run --------------------------------------------------------------------------------------------
class ShardSet:
    """Shards in the output folder: which inputs are done, and the next shard to write."""

    def __init__(self, out: Path):
        self.out = out
        self.done_inputs: set[str] = set()
        self.shards: list[str] = []
        for m in sorted(out.glob("shard_*.json")):
            prefix = out / m.stem
            if Path(f"{prefix}.idx").is_file() and Path(f"{prefix}.bin").is_file():
                self.shards.append(m.stem)
                self.done_inputs.update(read_manifest(m)["inputs"])

    def remove_leftovers(self) -> None:
        for stale in list(self.out.glob("*.tmp")) + list(self.out.glob(".*.tmp-*")):
            stale.unlink()  # leftovers of an interrupted run; their inputs are redone

    def next_prefix(self) -> Path:
        return self.out / f"shard_{len(self.shards):05d}"


def _train_tokenizer(cfg: PreprocessConfig, files: list[Path], out: Path, log) -> None:
    texts, sample = sample_texts(files, [input_format(f, cfg.format) for f in files], cfg.text_key,
                                 cfg.tokenizer_sample_mb * 2**20)
    t0 = time.time()
    train_sentencepiece(texts, out / "tokenizer", cfg.vocab_size, cfg.tokenizer_type)
    write_json_atomic(out / TOKENIZER_SAMPLE, sample)  # what was read, for dataset.json
    log(f"trained a {cfg.vocab_size}-piece SentencePiece {cfg.tokenizer_type} tokenizer in {time.time() - t0:.1f}s "
        f"on a sample of the inputs ({sample['method']})")


def _prepare_output(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise PreprocessError(f"output {out}: is an existing file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PreprocessError(f"output {out}: cannot create the folder ({_os_error(e)})") from None


def _os_error(e: OSError) -> str:
    return f"{e.filename}: {e.strerror}" if e.filename and e.strerror else str(e)


def run_preprocess(cfg: PreprocessConfig, log=print) -> dict:
    """Tokenize cfg.inputs into shards under cfg.output; returns the summary (also in dataset.json).

    A folder holds one job: a re-run with the same tokenizer and settings continues it (or does nothing when
    it is complete); one with any setting that changes the tokens is refused before anything is written."""
    out = Path(cfg.output)
    files = discover(cfg.inputs, cfg.include, cfg.exclude)
    if not files:
        raise PreprocessError(f"no input files found in {cfg.inputs} (include={cfg.include}, exclude={cfg.exclude})")
    tok = load_tokenizer(cfg.tokenizer) if cfg.tokenizer is not None else None
    _prepare_output(out)
    shards = ShardSet(out)
    job = job_settings(cfg, tok)
    recorded = recorded_job(out, shards.shards, cfg.train_tokenizer)
    check_job(out, recorded, job)
    if not (out / JOB_FILE).is_file():  # first run, or a folder from before job.json
        try:
            write_json_atomic(out / JOB_FILE, {**(recorded or {}), **job})
        except OSError as e:
            raise PreprocessError(f"output {out}: cannot write there ({e.strerror or e})") from None
    if cfg.train_tokenizer:
        model = out / "tokenizer.model"
        if not model.is_file():  # a re-run must reuse the tokenizer its shards were made with
            _train_tokenizer(cfg, files, out, log)
        tok = load_tokenizer(model)
        job["tokenizer_sha256"] = tok.sha256
        recorded = read_manifest(out / JOB_FILE)
        check_job(out, recorded, job)
        if recorded != job:
            write_json_atomic(out / JOB_FILE, job)
    tok_spec = BYTE_TOKENIZER if tok.path is None else str(tok.path.resolve())
    dtype = token_dtype(tok.vocab_size)
    eod = tok.eod_id if cfg.append_eod else None
    shards.remove_leftovers()
    todo = [f for f in files if str(f) not in shards.done_inputs]
    if len(todo) < len(files):
        log(f"resuming: {len(files) - len(todo)} of {len(files)} inputs are already in complete shards")

    stats = dict(documents=0, tokens=0, bytes=0, empty=0, errors=0)
    workers = cfg.workers or os.cpu_count() or 1
    pool = start_pool(workers, tok_spec) if workers > 1 and todo else None
    if pool is None and todo:
        init_worker(tok_spec)
    bar = tqdm(total=sum(f.stat().st_size for f in todo), unit="B", unit_scale=True, desc="preprocess",
               disable=None, file=sys.stderr)
    t0 = time.time()
    writer, shard_inputs, mark = None, [], None
    pending: deque = deque()
    in_flight = 2 * workers if pool else 0  # bounded work in flight: memory stays flat on huge inputs

    def write(arrays):
        nonlocal writer
        if writer is None:
            writer = IndexedDatasetWriter(shards.next_prefix(), dtype)
        for a in arrays:
            writer.add(a)
            stats["documents"] += 1
            stats["tokens"] += len(a)

    def drain(limit):
        # Results are written in input order; an input's end marker closes the shard once it is full, so
        # shards end only between inputs while tokenization of later inputs continues in the pool.
        nonlocal mark
        while len(pending) > limit:
            kind, item = pending.popleft()
            if kind == "batch":
                write(item.get() if pool else item)
            elif kind == "start":  # where to roll back to if this input turns out to be damaged
                mark = (stats["documents"], stats["tokens"], None if writer is None else writer.position())
            else:
                path, size = item
                shard_inputs.append(str(path))
                bar.update(size)
                elapsed = max(time.time() - t0, 1e-9)
                bar.set_postfix_str(f"{stats['documents'] / elapsed:.0f} docs/s {stats['tokens'] / elapsed:.0f} tok/s")
                if writer is not None and writer.n_tokens >= cfg.max_shard_tokens:
                    finish_shard()

    def drop_input():
        # Forget a damaged input's documents: those still queued, then those already written (all in the
        # current shard, which closes only between inputs).
        nonlocal writer
        while pending and pending[-1][0] != "start":
            pending.pop()
        if pending:
            pending.pop()
            return
        stats["documents"], stats["tokens"], kept = mark
        if kept is None:
            if writer is not None:
                writer.abort()
            writer = None
        else:
            writer.rollback(kept)

    def finish_shard():
        nonlocal writer, shard_inputs
        prefix = writer.finish()
        # The shard manifest is what marks its inputs done, so it is written after the pair is in place.
        write_json_atomic(shard_manifest_path(prefix), {
            "inputs": shard_inputs, "documents": len(writer.lengths), "tokens": writer.n_tokens,
            "max_token_id": writer.max_id, "dtype": str(dtype), "tokenizer_sha256": tok.sha256,
            "vocab_size": tok.vocab_size, "eod_id": eod, "tool_version": TOOL_VERSION})
        shards.shards.append(prefix.name)
        shards.done_inputs.update(shard_inputs)
        writer, shard_inputs = None, []

    def submit(batch):
        pending.append(("batch", pool.apply_async(tokenize_batch, (batch, eod, dtype)) if pool else tokenize_batch(batch, eod, dtype)))
        drain(in_flight)

    try:
        for path in todo:
            batch: list[str] = []
            pending.append(("start", path))
            input_bytes, damaged = 0, None
            for doc in read_documents(path, input_format(path, cfg.format), cfg.text_key):
                if isinstance(doc, BadRecord):
                    stats["errors"] += 1
                    if cfg.on_error == "fail":
                        raise PreprocessError(f"{doc} (use --on-error skip to skip and count such "
                                              f"{'inputs' if isinstance(doc, BadInput) else 'records'})")
                    if isinstance(doc, BadInput):
                        damaged = doc
                        break
                    tqdm.write(f"skipped {doc}", file=sys.stderr)
                    continue
                if not doc.text.strip():
                    stats["empty"] += 1
                    continue
                input_bytes += len(doc.text.encode("utf-8", errors="ignore"))
                batch.append(doc.text)
                if len(batch) >= cfg.batch_docs:
                    submit(batch)
                    batch = []
            if damaged is not None:
                # Not marked done: a re-run after the file is replaced adds it.
                tqdm.write(f"skipped {damaged} (the whole input; none of its documents are kept)", file=sys.stderr)
                drop_input()
                bar.update(path.stat().st_size)
                continue
            stats["bytes"] += input_bytes
            if batch:
                submit(batch)
            pending.append(("end", (path, path.stat().st_size)))
            drain(in_flight)
        drain(0)
        if writer is not None:
            finish_shard()
    except KeyboardInterrupt as e:
        if writer is not None:
            writer.abort()
        signum = signal.SIGTERM if isinstance(e, _Terminated) else signal.SIGINT
        done = sum(str(f) in shards.done_inputs for f in files)
        raise Interrupted(f"stopped by {signal.Signals(signum).name}: {out} has {len(shards.shards)} complete shards "
                          f"holding {done} of {len(files)} inputs; re-run the same command to continue", signum) from None
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        bar.close()
        if pool is not None:
            stop_pool(pool, stopped=sys.exc_info()[0] is not None)

    elapsed = max(time.time() - t0, 1e-9)
    totals = {"documents": 0, "tokens": 0, "max_token_id": -1}
    for name in shards.shards:
        m = read_manifest(out / f"{name}.json")
        totals["documents"] += m["documents"]
        totals["tokens"] += m["tokens"]
        totals["max_token_id"] = max(totals["max_token_id"], m["max_token_id"])
    summary = {
        "shards": shards.shards, "tokenizer": tok_spec, "tokenizer_sha256": tok.sha256,
        "vocab_size": tok.vocab_size, "eod_id": eod, "dtype": str(dtype), **totals,
        "sources": [str(f) for f in files], "tool_version": TOOL_VERSION,
    }
    if cfg.train_tokenizer and (out / TOKENIZER_SAMPLE).is_file():
        summary["tokenizer_sample"] = read_manifest(out / TOKENIZER_SAMPLE)
    run = {**stats, "seconds": elapsed, "tokens_per_s": stats["tokens"] / elapsed,
           "mb_per_s": stats["bytes"] / 2**20 / elapsed, "workers": workers}
    manifest = out / DATASET_MANIFEST
    if not todo and manifest.is_file() and read_manifest(manifest) == summary:
        log(f"nothing to do: dataset {out} is complete ({len(shards.shards)} shards, {totals['tokens']} tokens)")
        return {**summary, "run": run}
    write_json_atomic(manifest, summary)
    log(f"preprocessed {stats['documents']} documents, {stats['tokens']} tokens, {stats['bytes'] / 2**20:.1f} MB "
        f"in {elapsed:.1f}s ({run['tokens_per_s']:.0f} tokens/s, {run['mb_per_s']:.2f} MB/s, {workers} workers); "
        f"skipped {stats['empty']} empty documents and {stats['errors']} bad records; dataset {out} now has "
        f"{len(shards.shards)} shards, {totals['tokens']} tokens")
    return {**summary, "run": run}


def _ignore(signum, frame):
    pass


def _stop(signum, frame):
    # The first signal stops the run; later ones would only interrupt the clean-up with a traceback. Not
    # SIG_IGN: workers the pool starts meanwhile would inherit it and outlive pool.terminate()'s SIGTERM.
    signal.signal(signal.SIGINT, _ignore)
    signal.signal(signal.SIGTERM, _ignore)
    raise _Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mtp-preprocess", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Options: --output DIR, --tokenizer PATH|bytes or --train-tokenizer "
                                            "--vocab-size N [--tokenizer-type bpe|unigram], --text-key KEY, "
                                            "--format auto|text|jsonl|parquet, --include PAT, --exclude PAT, "
                                            "--max-shard-tokens N, --workers N, --on-error skip|fail, "
                                            "--no-eod, --config FILE (YAML/JSON of these keys)")
    parser.add_argument("inputs", nargs="*")
    parser.add_argument("--config")
    parser.add_argument("--include", action="append", default=None)
    parser.add_argument("--exclude", action="append", default=None)
    parser.add_argument("--no-eod", action="store_true")
    args, rest = parser.parse_known_args(argv)
    try:
        data = read_config_file(args.config) if args.config else {}
        data = merge(data, parse_overrides(rest))
        if args.inputs:
            data["inputs"] = args.inputs
        for key in ("include", "exclude"):
            if getattr(args, key):
                data[key] = getattr(args, key)
        if args.no_eod:
            data["append_eod"] = False
        cfg = from_dict(PreprocessConfig, data)
    except ConfigError as e:
        config_error_exit(e, "mtp-preprocess")
    in_main = threading.current_thread() is threading.main_thread()
    if in_main:  # a cluster stops a job with SIGTERM to its process group: handled as Ctrl-C is
        previous = {s: signal.signal(s, _stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        run_preprocess(cfg)
    except Interrupted as e:
        print(f"mtp-preprocess: {e}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt as e:  # stopped before the first input (tokenizer training, start-up)
        signum = signal.SIGTERM if isinstance(e, _Terminated) else signal.SIGINT
        print(f"mtp-preprocess: stopped by {signum.name} before any input was tokenized; re-run the same command "
              f"to continue", file=sys.stderr)
        return 128 + signum
    except (PreprocessError, FileNotFoundError, ValueError) as e:
        print(f"mtp-preprocess: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # disk full, permission, a path that is not a folder: the file and the reason
        print(f"mtp-preprocess: {_os_error(e)}", file=sys.stderr)
        return 1
    finally:
        if in_main:
            for s, handler in previous.items():
                signal.signal(s, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
