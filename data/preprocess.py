"""mtp-preprocess: raw text, JSONL or Parquet in; pretokenized shards in Megatron's indexed format out.

    mtp-preprocess data/raw/ --output data/code --train-tokenizer --vocab-size 32000 --include "*.jsonl.gz"
    mtp-preprocess corpus.parquet --output data/web --tokenizer tok.model --text-key content --workers 16
    mtp-preprocess books/ --output data/bytes --tokenizer bytes        # byte-level (vocab 256)

Output folder: shard_<id>.{idx,bin,json}, ..., tokenizer.model and tokenizer_sample.json (when trained
here: the tokenizer and the sample of the inputs it learned from), job.json (the settings), partition_<i>.json
(each partition's plan and progress) and dataset.json, which is written last. The inputs are cut into units of
about --shard-bytes (preprocess_plan.py); each worker reads, tokenizes and writes whole units, one shard each.
A shard counts only once its manifest is written; re-running the same command redoes only unfinished units.
Many nodes: run `--num-partitions N --partition-index I` for I = 0..N-1 into one folder (launch/
slurm_preprocess.sh); the last to finish, or `mtp-data finalize OUT`, writes dataset.json.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from mtplm.config import ConfigError, config_error_exit, from_dict, merge, parse_overrides, read_config_file

from .indexed_dataset import token_dtype
from .manifest import DATASET_MANIFEST, read_manifest, write_json_atomic
from .preprocess_finalize import (check_partitions, clear_unit, finalize, pending_partitions, record_partition,
                                  unit_state)
from .preprocess_job import JOB_FILE, PreprocessError, check_job, job_settings, recorded_job
from .preprocess_plan import Unit, partition_units, plan_units
from .preprocess_pool import init_worker, peak_rss_mb, process_unit, start_pool, stop_pool
from .readers import discover, input_format
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
    shard_bytes: int = 128 << 20  # input bytes per shard (and per worker task), about: see preprocess_plan.py
    workers: int = 0  # 0: all cores
    on_error: str = "skip"  # skip (report and count) or fail
    num_partitions: int = 1  # one run per node, each doing its share of the plan into one shared folder
    partition_index: int | None = None  # required with num_partitions > 1: a forgotten index would redo partition 0

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
        for key in ("vocab_size", "shard_bytes", "tokenizer_sample_mb", "num_partitions"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if self.workers < 0:
            raise ConfigError(f"workers: must be >= 0, got {self.workers}")
        if self.partition_index is None:
            if self.num_partitions > 1:
                raise ConfigError(f"partition_index: --num-partitions {self.num_partitions} needs --partition-index "
                                  f"(0..{self.num_partitions - 1}: which share of the inputs this run does)")
            self.partition_index = 0
        if not 0 <= self.partition_index < self.num_partitions:
            raise ConfigError(f"partition_index: must be in [0, {self.num_partitions}) for --num-partitions "
                              f"{self.num_partitions}, got {self.partition_index}")


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the run; the message says what was completed."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class _Terminated(KeyboardInterrupt):
    pass


# -- the run --------------------------------------------------------------------------------------------
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


def _tokenizer_for_job(cfg: PreprocessConfig, files: list[Path], out: Path, log):
    """Check the folder's job.json against this run (writing it on the first run); the tokenizer to use."""
    tok = load_tokenizer(cfg.tokenizer) if cfg.tokenizer is not None else None
    job = job_settings(cfg, tok)
    old_shards = [m.stem for m in sorted(out.glob("shard_*.json"))]
    recorded = recorded_job(out, old_shards, cfg.train_tokenizer)
    earlier = not all(re.fullmatch(r"shard_[0-9a-f]{16}", n) for n in old_shards)
    if earlier or (recorded and "max_shard_tokens" in recorded):
        raise PreprocessError(f"{out}: written by an earlier mtp-preprocess, whose shards were cut by "
                              f"--max-shard-tokens; its shards stay readable as they are, but cannot be continued "
                              f"(choose another --output)")
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
    return tok


def _results(units: list[Unit], task: dict, workers: int, tok_spec: str):
    """process_unit's results as units complete: in a pool of workers, or here with one worker."""
    if workers == 1:
        init_worker(tok_spec)
        for u in units:
            yield process_unit(u, task)
        return
    pool = start_pool(workers, tok_spec)
    try:
        yield from pool.imap_unordered(functools.partial(process_unit, task=task), units)
    finally:
        stop_pool(pool, stopped=sys.exc_info()[0] is not None)


def run_preprocess(cfg: PreprocessConfig, log=print) -> dict:
    """Tokenize cfg.inputs (this partition's share) into shards under cfg.output; returns the summary, which is
    also dataset.json once every partition is complete.

    A folder holds one job: a re-run with the same tokenizer and settings continues it (or does nothing when
    it is complete); one with any setting that changes the tokens is refused before anything is written."""
    out = Path(cfg.output)
    files = discover(cfg.inputs, cfg.include, cfg.exclude)
    if not files:
        raise PreprocessError(f"no input files found in {cfg.inputs} (include={cfg.include}, exclude={cfg.exclude})")
    n_parts, part = cfg.num_partitions, cfg.partition_index
    _prepare_output(out)
    units = plan_units(files, cfg.format, cfg.shard_bytes)
    check_partitions(out, units, n_parts, part)
    tok = _tokenizer_for_job(cfg, files, out, log)
    tok_spec = BYTE_TOKENIZER if tok.path is None else str(tok.path.resolve())
    mine = partition_units(units, n_parts, part)
    todo = [u for u in mine if unit_state(out, u) != "done"]
    for u in todo:
        clear_unit(out, u)
    where = f"partition {part} of {n_parts}: " if n_parts > 1 else ""
    if len(todo) < len(mine):
        done_inputs = _done_inputs(out, units)
        log(f"{where}resuming: {len(done_inputs)} of {len(files)} inputs are already in complete shards "
            f"({len(mine) - len(todo)} of {len(mine)} shards done)")
    record_partition(out, units, n_parts, part, complete=False) if todo else None

    task = dict(out=str(out), format=cfg.format, text_key=cfg.text_key, on_error=cfg.on_error,
                eod=tok.eod_id if cfg.append_eod else None, dtype=str(token_dtype(tok.vocab_size)),
                tokenizer_sha256=tok.sha256, vocab_size=tok.vocab_size)
    stats = dict(documents=0, tokens=0, bytes=0, empty=0, errors=0)
    workers = min(cfg.workers or os.cpu_count() or 1, max(len(todo), 1))
    bar = tqdm(total=sum(u.nbytes for u in todo), unit="B", unit_scale=True, desc="preprocess", disable=None,
               file=sys.stderr)
    t0, rss = time.time(), {}
    results = _results(todo, task, workers, tok_spec)
    try:
        for r in results:
            if "fail" in r:
                raise PreprocessError(f"{r['fail']} (use --on-error skip to skip and count such "
                                      f"{'inputs' if r['input'] else 'records'})")
            for line in r["reported"]:
                tqdm.write(f"skipped {line}", file=sys.stderr)
            if r["errors"] > len(r["damaged"]) + len(r["reported"]):
                tqdm.write(f"skipped {r['errors'] - len(r['damaged']) - len(r['reported'])} more bad records in "
                           f"shard_{r['id']} (see its manifest)", file=sys.stderr)
            for why in r["damaged"].values():
                tqdm.write(f"skipped {why} (the whole input; none of its documents are kept)", file=sys.stderr)
            for k in stats:
                stats[k] += r[k]
            rss[r["pid"]] = max(rss.get(r["pid"], 0), r["max_rss_mb"])
            bar.update(r["nbytes"])
            elapsed = max(time.time() - t0, 1e-9)
            bar.set_postfix_str(f"{stats['documents'] / elapsed:.0f} docs/s {stats['tokens'] / elapsed:.0f} tok/s")
    except BaseException as e:
        results.close()  # the workers are stopped before what they leave of unfinished units is removed
        for u in todo:
            if unit_state(out, u) == "todo":
                clear_unit(out, u)
        if not isinstance(e, KeyboardInterrupt):
            raise
        signum = signal.SIGTERM if isinstance(e, _Terminated) else signal.SIGINT
        n_done = sum(unit_state(out, u) == "done" for u in units)
        raise Interrupted(f"stopped by {signal.Signals(signum).name}: {where}{out} has {n_done} complete shards "
                          f"holding {len(_done_inputs(out, units))} of {len(files)} inputs; re-run the same command to "
                          f"continue", signum) from None
    finally:
        bar.close()
    record_partition(out, units, n_parts, part, complete=True)

    elapsed = max(time.time() - t0, 1e-9)
    run = {**stats, "seconds": elapsed, "tokens_per_s": stats["tokens"] / elapsed,
           "mb_per_s": stats["bytes"] / 2**20 / elapsed, "workers": workers,
           "max_rss_mb": {"main": peak_rss_mb(),
                          "workers": [rss[pid] for pid in sorted(rss) if pid != os.getpid()]}}
    if todo:
        log(f"{where}preprocessed {stats['documents']} documents, {stats['tokens']} tokens, "
            f"{stats['bytes'] / 2**20:.1f} MB in {elapsed:.1f}s ({run['tokens_per_s']:.0f} tokens/s, "
            f"{run['mb_per_s']:.2f} MB/s, {workers} workers); skipped {stats['empty']} empty documents and "
            f"{stats['errors']} bad records")
    pending = pending_partitions(out)
    if pending:
        log(f"{where}complete; {DATASET_MANIFEST} is written when the others are ({'; '.join(pending)}): by the last "
            f"to finish, or by mtp-data finalize {out}")
        return {"shards": [u.shard for u in mine], "run": run, "pending": pending}
    had = (out / DATASET_MANIFEST).is_file()
    summary = finalize(out)
    if not todo and had:
        log(f"nothing to do: dataset {out} is complete ({len(summary['shards'])} shards, {summary['tokens']} tokens)")
    else:
        log(f"dataset {out} is complete: {len(summary['shards'])} shards, {summary['documents']} documents, "
            f"{summary['tokens']} tokens")
    return {**summary, "run": run}


def _done_inputs(out: Path, units: list[Unit]) -> set[str]:
    """Inputs all of whose units are done."""
    state: dict[str, bool] = {}
    for u in units:
        ok = unit_state(out, u) == "done"
        for f in u.files:
            state[f] = state.get(f, True) and ok
    return {f for f, ok in state.items() if ok}


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
                                            "--shard-bytes N, --workers N, --on-error skip|fail, "
                                            "--num-partitions N --partition-index I, "
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
