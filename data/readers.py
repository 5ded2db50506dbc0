"""Documents from raw inputs: plain text (one document per file), JSONL (optionally .gz) and Parquet.

Readers yield Document or BadRecord items, never raise on bad data: the caller decides to skip or stop,
and a BadRecord always names the file and the line (or Parquet row) and says what was expected. An input
that cannot be read to its end (not gzip, truncated, damaged, unreadable) yields a BadInput last.
"""

from __future__ import annotations

import fnmatch
import glob
import gzip
import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

TEXT_SUFFIXES = {".txt", ".text", ".md", ".py", ".rst"}


@dataclass
class Document:
    text: str
    source: str
    line: int  # 1-based line (JSONL), row (Parquet) or 1 (a text file)


@dataclass
class BadRecord:
    source: str
    line: int
    reason: str
    byte: int | None = None  # where the record starts, for a byte range read without counting the lines before it

    def __str__(self) -> str:
        if self.byte is not None:
            return f"{self.source}: record at byte {self.byte}: {self.reason}"
        return f"{self.source}:{self.line}: {self.reason}"


class BadInput(BadRecord):
    """The whole input is unusable from `line` on; the caller drops all of it or stops."""

    def __str__(self) -> str:
        return f"{self.source}: {self.reason}"


def _damage(path: Path, e: BaseException, line: int) -> BadInput:
    where = f"after line {line}" if line else "at its start"
    if isinstance(e, gzip.BadGzipFile):
        reason = f"not a gzip file ({e})"
    elif isinstance(e, EOFError):
        reason = f"truncated: the compressed data ends {where}, before its end-of-stream marker"
    elif isinstance(e, zlib.error):
        reason = f"damaged compressed data {where} ({e})"
    elif isinstance(e, OSError) and e.strerror:
        reason = f"cannot read: {e.strerror}"
    else:
        reason = f"cannot read {where} ({e})"
    return BadInput(str(path), line, reason)


def input_format(path: Path, forced: str = "auto") -> str:
    if forced != "auto":
        return forced
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz", ".ndjson", ".ndjson.gz")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return "text"


def discover(inputs: list[str], include: list[str], exclude: list[str]) -> list[Path]:
    """Files named directly, found under directories, or matched by globs; sorted, de-duplicated."""
    found: list[Path] = []
    for spec in inputs:
        p = Path(spec)
        if p.is_file():
            candidates = [p]
        elif p.is_dir():
            candidates = [f for f in p.rglob("*") if f.is_file()]
        else:
            candidates = [Path(m) for m in glob.glob(spec, recursive=True) if Path(m).is_file()]
            if not candidates:
                raise FileNotFoundError(f"input {spec!r}: no such file or directory, and no file matches it as a glob")
        for f in candidates:
            s = str(f)
            if include and not any(fnmatch.fnmatch(s, pat) or fnmatch.fnmatch(f.name, pat) for pat in include):
                continue
            if any(fnmatch.fnmatch(s, pat) for pat in exclude):
                continue
            found.append(f)
    return sorted(set(found))


def _read_text(path: Path) -> Iterator[Document | BadRecord]:
    try:
        data = path.read_bytes()
    except OSError as e:
        yield _damage(path, e, 0)
        return
    try:
        yield Document(data.decode("utf-8"), str(path), 1)
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        yield BadRecord(str(path), line, f"not valid UTF-8 (byte {e.start})")


def _lines(f, start: int, end: int | None):
    """(line number, byte offset, line) of the lines that start in [start, end): a range begins at the first
    line starting at or after `start`, so ranges cut anywhere split a file into whole records exactly once."""
    pos = 0
    if start:
        f.seek(start - 1)
        pos = start - 1 + len(f.readline())  # the rest of the line holding byte start-1 belongs to the range before
    for n, raw in enumerate(f, start=1):
        if end is not None and pos >= end:
            return
        yield n, pos, raw
        pos += len(raw)


def _read_jsonl(path: Path, key: str, start: int = 0, end: int | None = None) -> Iterator[Document | BadRecord]:
    opener = gzip.open if path.name.endswith(".gz") else open
    n = 0
    try:
        with opener(path, "rb") as f:
            for n, pos, raw in _lines(f, start, end):
                if not raw.strip():
                    continue
                at = pos if start else None  # lines are counted from a range's start: name the record by byte
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield BadRecord(str(path), n, f"not valid UTF-8 (byte {e.start} of the line)", at)
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    yield BadRecord(str(path), n, f"not valid JSON ({e.msg} at column {e.colno})", at)
                    continue
                if not isinstance(record, dict) or key not in record:
                    yield BadRecord(str(path), n, f"no {key!r} field (expected a JSON object with a string {key!r}; "
                                                  f"choose the field with --text-key)", at)
                    continue
                text = record[key]
                if not isinstance(text, str):
                    yield BadRecord(str(path), n, f"field {key!r} is {type(text).__name__}, expected a string", at)
                    continue
                yield Document(text, str(path), n)
    except (OSError, EOFError, zlib.error) as e:  # gzip's errors for a file that is not, or no longer, whole
        yield _damage(path, e, n)


def _read_parquet(path: Path, key: str, start: int = 0, end: int | None = None,
                  batch_rows: int = 1024) -> Iterator[Document | BadRecord]:
    """Rows of row groups [start, end) (all when end is None), numbered from the file's first row."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a file that is not Parquet
        yield BadInput(str(path), 0, f"not a readable Parquet file ({e})")
        return
    if key not in pf.schema_arrow.names:
        yield BadInput(str(path), 0, f"no column {key!r}; columns are {pf.schema_arrow.names} (choose with --text-key)")
        return
    groups = range(start, pf.num_row_groups if end is None else end)
    row = sum(pf.metadata.row_group(g).num_rows for g in range(start))
    batches = pf.iter_batches(columns=[key], batch_size=batch_rows, row_groups=groups)
    while True:
        # Record batches keep memory bounded by batch_rows, whatever the file's size.
        try:
            batch = next(batches, None)
        except Exception as e:  # a damaged row group: pyarrow's ArrowInvalid, OSError, ...
            yield BadInput(str(path), row, f"damaged after row {row} ({e})")
            return
        if batch is None:
            return
        for text in batch.column(0).to_pylist():
            row += 1
            if text is None:
                yield BadRecord(str(path), row, f"column {key!r} is null")
            elif not isinstance(text, str):
                yield BadRecord(str(path), row, f"column {key!r} is {type(text).__name__}, expected a string")
            else:
                yield Document(text, str(path), row)


def read_documents(path: Path, fmt: str, key: str, start: int = 0,
                   end: int | None = None) -> Iterator[Document | BadRecord]:
    """A whole input, or part of one (end not None): lines starting in bytes [start, end) of an uncompressed
    JSONL file, or row groups [start, end) of a Parquet file."""
    if fmt == "jsonl":
        return _read_jsonl(path, key, start, end)
    if fmt == "parquet":
        return _read_parquet(path, key, start, end)
    return _read_text(path)
