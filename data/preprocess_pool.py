"""mtp-preprocess's workers: a spawn pool whose processes each load the tokenizer once, started so that Ctrl-C and
SIGTERM are decided by the main process, and stopped without hanging on a worker the signal killed. A worker does
a whole unit of the plan: it reads its inputs, tokenizes them and writes the unit's shard; only a small summary
goes back to the main process."""

from __future__ import annotations

import os
import resource
import signal
import threading
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from .indexed_dataset import IndexedDatasetWriter
from .manifest import TOOL_VERSION, write_json_atomic
from .readers import BadInput, BadRecord, input_format, read_documents
from .tokenizer import load_tokenizer

MAX_REPORTED = 100  # bad records reported by name per unit; all are counted

_TOKENIZER = None


def init_worker(spec: str) -> None:
    global _TOKENIZER
    _TOKENIZER = load_tokenizer(spec)


def _init_pool_worker(spec: str) -> None:
    # The main process decides when to stop (Ctrl-C reaches the whole process group); SIGTERM still ends a
    # worker silently, which is how the main process stops the pool.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    init_worker(spec)


def start_pool(workers: int, spec: str):
    # Python keeps an inherited SIG_IGN for SIGINT, so workers started while it is ignored never raise
    # KeyboardInterrupt, not even while still importing, before _init_pool_worker runs.
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if in_main else None
    try:
        return get_context("spawn").Pool(workers, _init_pool_worker, (spec,))
    finally:
        if in_main:
            signal.signal(signal.SIGINT, previous)


def process_unit(unit, task: dict) -> dict:
    """Tokenize one unit into <out>/<unit.shard>.{bin,idx}, then write its manifest <unit.shard>.json, which
    marks it done. A damaged input is left out whole (its documents already written are rolled back) and named
    in the manifest, so a re-run redoes the unit once the input is replaced. With on_error "fail" the first bad
    record stops the unit: nothing is left, and the reason comes back."""
    out = Path(task["out"])
    prefix = out / unit.shard
    dtype, eod = np.dtype(task["dtype"]), task["eod"]
    writer = IndexedDatasetWriter(prefix, dtype)
    stats = dict(documents=0, tokens=0, bytes=0, empty=0, errors=0)
    reported, damaged = [], {}
    try:
        for path in map(Path, unit.files):
            mark = writer.position(), dict(stats)
            docs = read_documents(path, input_format(path, task["format"]), task["text_key"], unit.start, unit.end)
            for doc in docs:
                if isinstance(doc, BadRecord):
                    stats["errors"] += 1
                    if task["on_error"] == "fail":
                        writer.abort()
                        return {"id": unit.id, "fail": str(doc), "input": isinstance(doc, BadInput)}
                    if isinstance(doc, BadInput):
                        writer.rollback(mark[0])
                        stats.update(mark[1], errors=stats["errors"])
                        damaged[str(path)] = str(doc)
                        break
                    if len(reported) < MAX_REPORTED:
                        reported.append(str(doc))
                    continue
                if not doc.text.strip():
                    stats["empty"] += 1
                    continue
                ids = _TOKENIZER.encode(doc.text)
                if eod is not None:
                    ids.append(eod)
                writer.add(ids)
                stats["bytes"] += len(doc.text.encode("utf-8", errors="ignore"))
        stats["documents"], stats["tokens"] = len(writer.lengths), writer.n_tokens
        if writer.lengths:
            writer.finish()
        else:
            writer.abort()
        # The manifest is what marks the unit done, so it is written after the pair is in place.
        write_json_atomic(out / f"{unit.shard}.json", {
            "inputs": list(unit.files), "sizes": list(unit.sizes), "start": unit.start, "end": unit.end,
            **stats, "damaged": damaged, "max_token_id": writer.max_id, "dtype": str(dtype),
            "tokenizer_sha256": task["tokenizer_sha256"], "vocab_size": task["vocab_size"], "eod_id": eod,
            "tool_version": TOOL_VERSION})
    except BaseException:
        writer.abort()
        raise
    return {"id": unit.id, **stats, "reported": reported, "damaged": damaged, "nbytes": unit.nbytes, "pid": os.getpid(),
            "max_rss_mb": peak_rss_mb()}


def peak_rss_mb() -> float:
    """This process's peak resident memory. Linux's VmHWM, not ru_maxrss, which a process started by fork and exec
    inherits from its parent (the kernel keeps the larger of the two across exec)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def stop_pool(pool, stopped: bool) -> None:
    if not stopped:
        pool.terminate()
        return
    # A worker ended by the signal (SIGTERM reaches the whole group) may have died holding one of the pool's
    # queue locks, and terminate() then waits for it forever: give it a bounded time, then kill the workers.
    t = threading.Thread(target=pool.terminate, daemon=True)
    t.start()
    t.join(10)
    if t.is_alive():
        for p in pool._pool:
            p.kill()
