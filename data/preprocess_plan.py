"""mtp-preprocess's work plan: the inputs cut into units, each tokenized by one worker into one shard.

Inputs are taken in sorted order. Consecutive small inputs are packed into one unit until it holds
--shard-bytes of input; an input larger than that is split, when its format allows, into ranges of about
--shard-bytes: uncompressed JSONL at line boundaries (a range holds the lines that start inside it), Parquet by
row groups. Gzip (not seekable) and plain text (one document per file) are never split. The plan depends only on
the inputs' names and sizes and on --shard-bytes, never on the number of workers or partitions, so the shards and
their order are the same however the work is spread. A unit's id is a hash of what it covers: a re-run finds its
shard again, and a unit whose inputs changed size gets a new id and is redone.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from .readers import input_format

# Ranges are never cut smaller than this, so a tiny --shard-bytes (one shard per input) does not split records
# into a unit each.
MIN_RANGE_BYTES = 64 << 10


@dataclass(frozen=True)
class Unit:
    files: tuple[str, ...]  # whole inputs, or the one input a range belongs to
    sizes: tuple[int, ...]
    start: int = 0  # a range: first byte (JSONL) or row group (Parquet)
    end: int | None = None  # None: the whole input(s)
    nbytes: int = field(default=0, compare=False)  # input bytes it covers (about, for Parquet), for progress

    @property
    def id(self) -> str:
        key = json.dumps([self.files, self.sizes, self.start, self.end])
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    @property
    def shard(self) -> str:
        return f"shard_{self.id}"


def _splits(n: int, parts: int) -> list[int]:
    return [n * k // parts for k in range(parts + 1)]


def _parquet_ranges(path: Path, target: int) -> list[tuple[int, int, int]] | None:
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path).metadata
    except Exception:  # not readable: one unit, whose worker reports the damage
        return None
    ranges, first, acc = [], 0, 0
    for g in range(meta.num_row_groups):
        rg = meta.row_group(g)
        acc += sum(rg.column(c).total_compressed_size for c in range(rg.num_columns))
        if acc >= target:
            ranges.append((first, g + 1, acc))
            first, acc = g + 1, 0
    if first < meta.num_row_groups:
        ranges.append((first, meta.num_row_groups, acc))
    return ranges if len(ranges) > 1 else None


def plan_units(files: list[Path], fmt: str, shard_bytes: int) -> list[Unit]:
    units: list[Unit] = []
    pack: list[tuple[str, int]] = []

    def flush():
        if pack:
            sizes = tuple(s for _, s in pack)
            units.append(Unit(tuple(f for f, _ in pack), sizes, nbytes=sum(sizes)))
            pack.clear()

    for path in files:
        size = path.stat().st_size
        kind, name = input_format(path, fmt), str(path)
        target = max(shard_bytes, MIN_RANGE_BYTES)
        ranges = None
        if size > target and kind == "jsonl" and not path.name.endswith(".gz"):
            cuts = _splits(size, -(-size // target))
            ranges = [(a, b, b - a) for a, b in zip(cuts[:-1], cuts[1:])]
        elif size > target and kind == "parquet":
            ranges = _parquet_ranges(path, target)
        if ranges:
            flush()
            units.extend(Unit((name,), (size,), a, b, n) for a, b, n in ranges)
            continue
        pack.append((name, size))
        if sum(s for _, s in pack) >= shard_bytes:
            flush()
    flush()
    return units


def partition_units(units: list[Unit], num_partitions: int, index: int) -> list[Unit]:
    """Partition `index`'s units: every num_partitions-th, so each partition gets a share of every region of the
    inputs (big split files included) and the assignment depends only on the plan."""
    return units[index::num_partitions]


def plan_digest(units: list[Unit]) -> str:
    return hashlib.sha256(" ".join(u.id for u in units).encode()).hexdigest()[:16]
