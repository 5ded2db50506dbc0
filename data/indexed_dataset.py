"""Megatron-LM's indexed dataset format (.idx + .bin), so Megatron/GPT-NeoX data and ours are interchangeable.

.idx, little-endian:
    b"MMIDIDX\\x00\\x00"        magic (9 bytes)
    u64 version = 1
    u8  dtype code              1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16
    u64 sequence count S
    u64 document count D + 1
    i32[S] sequence lengths (tokens)
    i64[S] sequence pointers (byte offsets into .bin)
    i64[D + 1] document indices (sequence index where each document starts, then S)
.bin: the tokens of every sequence, back to back, in that dtype.

We write one sequence per document. Both files are written under temporary names and renamed when complete
(.bin first, .idx last), so an interrupted write never leaves a pair that looks finished.
"""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16}
CODES = {np.dtype(v): k for k, v in DTYPES.items()}
_HEADER = len(MAGIC) + 8 + 1 + 8 + 8


class DatasetFormatError(ValueError):
    """A .idx/.bin pair that is not a valid indexed dataset; the message names the file."""


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.int32)


def idx_path(prefix) -> Path:
    return Path(f"{prefix}.idx")


def bin_path(prefix) -> Path:
    return Path(f"{prefix}.bin")


CHUNK = 16 << 20  # bytes per read or index step of a scan or a merge: memory bounded whatever the data size


def _write_header(f, dtype: np.dtype, n_seq: int, n_doc_idx: int) -> None:
    f.write(MAGIC)
    f.write(struct.pack("<Q", VERSION))
    f.write(struct.pack("<B", CODES[np.dtype(dtype)]))
    f.write(struct.pack("<Q", n_seq))
    f.write(struct.pack("<Q", n_doc_idx))


def write_index(path: Path, dtype: np.dtype, lengths: np.ndarray, doc_indices: np.ndarray | None = None) -> None:
    lengths = np.asarray(lengths, dtype=np.int32)
    pointers = np.zeros(len(lengths), dtype=np.int64)
    if len(lengths) > 1:
        np.cumsum(lengths[:-1].astype(np.int64) * np.dtype(dtype).itemsize, out=pointers[1:])
    if doc_indices is None:
        doc_indices = np.arange(len(lengths) + 1, dtype=np.int64)
    with open(path, "wb") as f:
        _write_header(f, dtype, len(lengths), len(doc_indices))
        f.write(lengths.tobytes(order="C"))
        f.write(pointers.tobytes(order="C"))
        f.write(np.asarray(doc_indices, dtype=np.int64).tobytes(order="C"))


def _spans(n: int, itemsize: int):
    step = max(1, CHUNK // itemsize)
    for start in range(0, n, step):
        yield start, min(n, start + step)


def copy_tokens(shards: list[IndexedDataset], out) -> int:
    """Append each shard's tokens to the open file `out`, exactly the bytes its index describes, one CHUNK at a
    time (never a whole shard in memory). Returns the bytes written."""
    total = 0
    for s in shards:
        want, done = s.n_tokens * s.dtype.itemsize, 0
        with open(bin_path(s.prefix), "rb") as src:
            while done < want:
                block = src.read(min(CHUNK, want - done))
                if not block:
                    raise DatasetFormatError(f"{bin_path(s.prefix)}: ended after {done} bytes, but "
                                             f"{idx_path(s.prefix)} describes {want} (the file changed after it "
                                             f"was opened)")
                out.write(block)
                done += len(block)
        total += want
    return total


def write_concatenated_index(path: Path, shards: list[IndexedDataset]) -> tuple[int, int, int]:
    """The index megatron-core's IndexedDatasetBuilder.add_index writes for `shards` in order (sequence lengths,
    pointers and document indices shifted past the shards before), streamed from the memory-mapped inputs one
    CHUNK at a time. Returns the (sequences, documents, tokens) it describes."""
    dtype = shards[0].dtype
    n_seq = sum(len(s.lengths) for s in shards)
    n_doc = sum(len(s.doc_indices) - 1 for s in shards)
    n_tokens = 0
    with open(path, "wb") as f:
        _write_header(f, dtype, n_seq, n_doc + 1)
        for s in shards:
            for a, b in _spans(len(s.lengths), 4):
                part = s.lengths[a:b]
                n_tokens += int(part.sum(dtype=np.int64))
                f.write(part.tobytes())
        offset = 0
        for s in shards:  # back to back (IndexedDataset checks it), so shifting equals recomputing from lengths
            for a, b in _spans(len(s.pointers), 8):
                f.write((s.pointers[a:b] + offset).tobytes())
            offset += s.n_tokens * dtype.itemsize
        f.write(np.zeros(1, np.int64).tobytes())
        base = 0
        for s in shards:
            for a, b in _spans(len(s.doc_indices) - 1, 8):
                f.write((s.doc_indices[a + 1:b + 1] + base).tobytes())
            base += len(s.lengths)
    return n_seq, n_doc, n_tokens


def read_counts(prefix_idx: Path, prefix_bin: Path, dtype: np.dtype) -> tuple[int, int, int]:
    """(sequences, documents, tokens) as a written pair's header and .bin size state them."""
    with open(prefix_idx, "rb") as f:
        header = f.read(_HEADER)
    n_seq, n_doc_idx = struct.unpack_from("<QQ", header, len(MAGIC) + 9)
    return n_seq, n_doc_idx - 1, prefix_bin.stat().st_size // np.dtype(dtype).itemsize


class IndexedDatasetWriter:
    """Append documents (token arrays); `finish()` makes the pair visible, `abort()` removes the partial one."""

    def __init__(self, prefix: str | Path, dtype: np.dtype):
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype)
        self._tmp_bin = self.prefix.with_name(self.prefix.name + ".bin.tmp")
        self._bin = open(self._tmp_bin, "wb")
        self.lengths: list[int] = []
        self.n_tokens = 0
        self.max_id = -1

    def add(self, tokens) -> None:
        arr = np.asarray(tokens, dtype=self.dtype)
        self._bin.write(arr.tobytes(order="C"))
        self.lengths.append(len(arr))
        self.n_tokens += len(arr)
        if len(arr):
            self.max_id = max(self.max_id, int(arr.max()))

    def position(self) -> tuple[int, int, int]:
        """Where the writer stands (documents, tokens, largest id): a point rollback() can return to."""
        return len(self.lengths), self.n_tokens, self.max_id

    def rollback(self, position: tuple[int, int, int]) -> None:
        """Forget every document added since `position` (from position()), e.g. those of an input found damaged
        part-way through."""
        documents, tokens, max_id = position
        self._bin.flush()
        self._bin.truncate(tokens * self.dtype.itemsize)
        self._bin.seek(tokens * self.dtype.itemsize)
        del self.lengths[documents:]
        self.n_tokens, self.max_id = tokens, max_id

    def finish(self) -> Path:
        self._bin.close()
        tmp_idx = self.prefix.with_name(self.prefix.name + ".idx.tmp")
        write_index(tmp_idx, self.dtype, np.asarray(self.lengths, dtype=np.int32))
        os.replace(self._tmp_bin, bin_path(self.prefix))
        os.replace(tmp_idx, idx_path(self.prefix))
        return self.prefix

    def abort(self) -> None:
        self._bin.close()
        for p in (self._tmp_bin, self.prefix.with_name(self.prefix.name + ".idx.tmp")):
            p.unlink(missing_ok=True)


class IndexedDataset:
    """Read-only view of one .idx/.bin pair; tokens stay memory-mapped, so RAM does not grow with the data."""

    def __init__(self, prefix: str | Path):
        self.prefix = Path(prefix)
        ip, bp = idx_path(self.prefix), bin_path(self.prefix)
        for p in (ip, bp):
            if not p.is_file():
                raise FileNotFoundError(f"{p}: missing (a dataset is a .idx/.bin pair with a common prefix)")
        idx_size = ip.stat().st_size
        with open(ip, "rb") as f:
            header = f.read(_HEADER)
        if header[: len(MAGIC)] != MAGIC[: len(header)]:
            raise DatasetFormatError(f"{ip}: not an indexed dataset index (expected magic {MAGIC!r}, "
                                     f"got {header[:len(MAGIC)]!r})")
        if len(header) < _HEADER:  # a short file that starts like an index: cut off, not foreign
            raise DatasetFormatError(f"{ip}: truncated header: the file has {idx_size} bytes, an index header "
                                     f"has {_HEADER}")
        pos = len(MAGIC)
        (version,) = struct.unpack_from("<Q", header, pos)
        if version != VERSION:
            raise DatasetFormatError(f"{ip}: index version {version}, expected {VERSION}")
        (code,) = struct.unpack_from("<B", header, pos + 8)
        if code not in DTYPES:
            raise DatasetFormatError(f"{ip}: unknown dtype code {code}, expected one of {sorted(DTYPES)}")
        self.dtype = np.dtype(DTYPES[code])
        n_seq, n_doc_idx = struct.unpack_from("<QQ", header, pos + 9)
        expected = _HEADER + n_seq * (4 + 8) + n_doc_idx * 8
        # Megatron's multimodal indices append one int8 mode per sequence; nothing else may follow.
        if idx_size not in (expected, expected + n_seq):
            what = "truncated index" if idx_size < expected else "index longer than its header says"
            raise DatasetFormatError(f"{ip}: {what}: {idx_size} bytes, but a header of {n_seq} sequences and "
                                     f"{n_doc_idx} document indices needs {expected}")
        idx = np.memmap(ip, mode="r", dtype=np.uint8)
        self.lengths = np.frombuffer(idx, dtype=np.int32, count=n_seq, offset=_HEADER)
        self.pointers = np.frombuffer(idx, dtype=np.int64, count=n_seq, offset=_HEADER + 4 * n_seq)
        self.doc_indices = np.frombuffer(idx, dtype=np.int64, count=n_doc_idx, offset=_HEADER + 12 * n_seq)
        n_tokens = self._check_index(ip, bp, n_seq)
        self.tokens = np.memmap(bp, mode="r", dtype=self.dtype) if n_tokens else np.zeros(0, self.dtype)
        mm = getattr(self.tokens, "_mmap", None)
        if mm is not None and hasattr(mmap, "MADV_RANDOM"):
            # Samples are read at random offsets: kernel read-ahead would only fill memory with unused pages.
            mm.madvise(mmap.MADV_RANDOM)
        self.n_tokens = n_tokens

    def _check_index(self, ip: Path, bp: Path, n_seq: int) -> int:
        """Every reader trusts lengths, pointers and document indices; a damaged index must fail here, once,
        vectorised one CHUNK at a time (bounded memory whatever the index size), never later as an out-of-bounds
        read or a silently different document."""
        end = 0  # byte where the sequences so far end
        for a, b in _spans(n_seq, 8):
            lengths = self.lengths[a:b]
            if (lengths < 0).any():
                k = a + int(np.argmax(lengths < 0))
                raise DatasetFormatError(f"{ip}: sequence {k} has negative length {int(self.lengths[k])}")
            ends = end + np.cumsum(lengths, dtype=np.int64) * self.dtype.itemsize
            starts = np.concatenate([np.full(1, end, np.int64), ends[:-1]])
            bad = np.flatnonzero(self.pointers[a:b] != starts)
            if len(bad):  # every writer (Megatron's, GPT-NeoX's, ours) lays sequences back to back
                k = int(bad[0])
                raise DatasetFormatError(f"{ip}: sequence {a + k} points to byte {int(self.pointers[a + k])}, but "
                                         f"the lengths before it end at byte {int(starts[k])}")
            end = int(ends[-1])
        d = self.doc_indices
        falls = any((np.diff(d[a:b + 1]) < 0).any() for a, b in _spans(len(d), 8))
        if len(d) == 0 or d[0] != 0 or d[-1] != n_seq or falls:
            got = f"{len(d)} values" + (f" from {d[0]} to {d[-1]}" if len(d) else "")
            raise DatasetFormatError(f"{ip}: document indices must rise from 0 to the sequence count {n_seq} "
                                     f"without going back; got {got}")
        n_bytes = end
        bin_size = bp.stat().st_size
        if bin_size != n_bytes:
            n_tokens = n_bytes // self.dtype.itemsize
            raise DatasetFormatError(f"{bp}: {bin_size} bytes, but {ip} describes {n_tokens} tokens of "
                                     f"{self.dtype} ({n_bytes} bytes)")
        return n_bytes // self.dtype.itemsize

    def __len__(self) -> int:
        return len(self.lengths)

    def document_lengths(self) -> np.ndarray:
        """Tokens per document (a document may span several sequences in Megatron data)."""
        seq_cum = np.concatenate([[0], np.cumsum(self.lengths, dtype=np.int64)])
        return np.diff(seq_cum[self.doc_indices])

    def document_offsets(self) -> np.ndarray:
        """Token offset of each document's first token in .bin (an empty last document starts at the end)."""
        seq_cum = np.concatenate([[0], np.cumsum(self.lengths, dtype=np.int64)])
        return seq_cum[self.doc_indices[:-1]]

    def get(self, seq: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        start = int(self.pointers[seq]) // self.dtype.itemsize + offset
        end = start + (int(self.lengths[seq]) - offset if length is None else length)
        return self.tokens[start:end]
