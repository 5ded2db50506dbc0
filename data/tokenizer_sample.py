"""The text a tokenizer is trained on: a bounded sample spread over every input, whatever the corpus size.

A corpus that fits the budget is read whole. A larger one is laid end to end (inputs in order, by file size) and
cut into `windows` equal spans; from the middle of each span one window of about budget/windows bytes is read,
starting at the next record boundary. An uncompressed JSONL or text-lines file is entered at that byte (the
partial line before it skipped); a gzip member cannot be entered midway and a Parquet or plain text file is read
by record, so those are read from their start, each for the bytes of all its windows together. Time and memory
are those of reading the budget (plus one record per window), not of the corpus, and the sample is a pure
function of the inputs' bytes and the budget, so the trained tokenizer stays byte-reproducible. The windows read
are returned for dataset.json.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from .readers import BadRecord, read_documents

WINDOW_BYTES = 1 << 20  # text per window: enough whole records of code that a window is not one file's header
TOKENIZER_SAMPLE = "tokenizer_sample.json"  # beside tokenizer.model: the sample it was trained on


def _seekable(path: Path, fmt: str) -> bool:
    return fmt == "jsonl" and not path.name.endswith(".gz")


def _jsonl_from(path: Path, offset: int, key: str) -> Iterator[str]:
    """Texts of the JSONL records that start after byte `offset` (the first whole line after it). Bad records are
    skipped silently here: the tokenizing pass reports them with their line numbers."""
    with open(path, "rb") as f:
        f.seek(max(0, offset - 1))
        if offset > 0:
            f.readline()  # the rest of the line holding byte offset-1: a record starting at offset is kept
        for raw in f:
            try:
                record = json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                continue
            if isinstance(record, dict) and isinstance(record.get(key), str):
                yield record[key]


def _texts(path: Path, fmt: str, key: str) -> Iterator[str]:
    for doc in read_documents(path, fmt, key):
        if not isinstance(doc, BadRecord):
            yield doc.text


def sample_texts(files: list[Path], formats: list[str], key: str, budget: int,
                 windows: int | None = None) -> tuple[Iterator[str], dict]:
    """(texts, description): the texts to train on, lazily read, and what the sample is. `description` is filled
    as the texts are consumed (bytes and documents taken per window)."""
    sizes = [f.stat().st_size for f in files]
    total = sum(sizes)
    description: dict = {"budget_bytes": budget, "corpus_bytes": total}
    if total <= budget:
        description.update(method="whole corpus", documents=0, text_bytes=0)

        def whole() -> Iterator[str]:
            for path, fmt in zip(files, formats):
                for text in _texts(path, fmt, key):
                    if text.strip():
                        description["documents"] += 1
                        description["text_bytes"] += len(text.encode("utf-8"))
                        yield text
        return whole(), description

    n = windows or max(1, budget // WINDOW_BYTES)
    per_window = budget // n
    starts = [(2 * i + 1) * total // (2 * n) for i in range(n)]  # the middle of each of n equal spans
    plan: list[list] = []  # [file index, offset, byte quota, windows], one per window or per unseekable file
    ends, acc = [], 0
    for s in sizes:
        acc += s
        ends.append(acc)
    k = 0
    for pos in starts:
        while ends[k] <= pos:
            k += 1
        offset = pos - (ends[k] - sizes[k])
        if _seekable(files[k], formats[k]) or not plan or plan[-1][0] != k:
            plan.append([k, offset if _seekable(files[k], formats[k]) else 0, per_window, 1])
        else:  # another window in a file read from its start: read on for it
            plan[-1][2] += per_window
            plan[-1][3] += 1
    description.update(method=f"{n} windows of {per_window} bytes of text, evenly spaced over the inputs",
                       windows=[{"file": str(files[k]), "offset": off, "windows": w, "documents": 0, "text_bytes": 0}
                                for k, off, _, w in plan])

    def sampled() -> Iterator[str]:
        for (k, offset, quota, _), rec in zip(plan, description["windows"]):
            path, fmt = files[k], formats[k]
            texts = _jsonl_from(path, offset, key) if _seekable(path, fmt) else _texts(path, fmt, key)
            for text in texts:
                if rec["text_bytes"] >= quota:
                    break
                if text.strip():
                    rec["documents"] += 1
                    rec["text_bytes"] += len(text.encode("utf-8"))
                    yield text
    return sampled(), description
