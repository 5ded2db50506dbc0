"""mtp-preprocess's tokenization workers: a spawn pool whose processes each load the tokenizer once, started so
that Ctrl-C and SIGTERM are decided by the main process, and stopped without hanging on a worker the signal
killed."""

from __future__ import annotations

import signal
import threading
from multiprocessing import get_context

import numpy as np

from .tokenizer import load_tokenizer

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


def tokenize_batch(texts: list[str], eod: int | None, dtype) -> list[np.ndarray]:
    out = []
    for text in texts:
        ids = _TOKENIZER.encode(text)
        if eod is not None:
            ids.append(eod)
        out.append(np.asarray(ids, dtype=dtype))
    return out


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
