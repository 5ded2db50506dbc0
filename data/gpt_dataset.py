"""Fixed-length MTP samples from memory-mapped shards, packed across documents GPT-style.

A sample is seq_len + n_future_tokens tokens: seq_len inputs, and for every head its targets. Within an epoch
the split's documents are shuffled (seeded by seed and epoch) and laid end to end; sample k starts at token
k * seq_len of that stream, so every token is an input exactly once per epoch. The sample index (which
document and offset each sample starts at) and the shuffle index are built with vectorised numpy (seconds for
a billion tokens) and cached as .npy; the local rank 0 of each node builds them and the other ranks wait for
the files, so it works whether or not nodes share a filesystem. Everything is a pure function of
(data, seq_len, n, seed, split, epoch).
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import numpy as np
import torch

from .indexed_dataset import IndexedDataset

SPLITS = ("train", "valid", "test")


class ShardedDocuments:
    """Many .idx/.bin shards seen as one list of documents."""

    def __init__(self, prefixes: list[Path], shards: list[IndexedDataset] | None = None):
        self.prefixes = [Path(p) for p in prefixes]
        if not self.prefixes:
            raise ValueError("no shards: a dataset needs at least one .idx/.bin pair")
        self.shards = shards if shards is not None else [IndexedDataset(p) for p in self.prefixes]
        self.lengths = np.concatenate([s.document_lengths() for s in self.shards]).astype(np.int64)
        self.offsets = np.concatenate([s.document_offsets() for s in self.shards]).astype(np.int64)
        self.shard_of = np.concatenate([np.full(len(s.doc_indices) - 1, i, np.int32)
                                        for i, s in enumerate(self.shards)])
        self.n_tokens = int(self.lengths.sum())

    def __len__(self) -> int:
        return len(self.lengths)

    def read(self, doc: int, offset: int, length: int) -> np.ndarray:
        start = int(self.offsets[doc]) + offset
        return self.shards[int(self.shard_of[doc])].tokens[start:start + length]

    def identity(self) -> str:
        """Changes whenever the data does (names, sizes, modification times), so caches never go stale."""
        h = hashlib.sha1()
        for p in self.prefixes:
            for f in (Path(f"{p}.idx"), Path(f"{p}.bin")):
                st = f.stat()
                h.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()[:16]


def split_documents(n_docs: int, ratios: list[float], seed: int) -> dict[str, np.ndarray]:
    """Documents assigned to train/valid/test by a seeded permutation, in the given proportions."""
    order = np.random.default_rng(seed).permutation(n_docs)
    fractions = np.asarray(ratios, dtype=np.float64) / sum(ratios)
    bounds = np.round(np.cumsum(fractions) * n_docs).astype(np.int64)
    bounds[-1] = n_docs
    starts = np.concatenate([[0], bounds[:-1]])
    return {name: np.sort(order[a:b]) for name, a, b in zip(SPLITS, starts, bounds)}


def _wait_or_build(path: Path, build, timeout_s: float = 3600):
    """Local rank 0 builds and publishes atomically; other local ranks wait for the file."""
    if path.is_file():
        return np.load(path, mmap_mode="r")
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        arr = build()
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.npy")
        np.save(tmp, arr)
        os.replace(tmp, path)
        return np.load(path, mmap_mode="r")
    deadline = time.time() + timeout_s
    while not path.is_file():
        if time.time() > deadline:
            raise TimeoutError(f"waited {timeout_s:.0f}s for local rank 0 to build {path}")
        time.sleep(0.2)
    return np.load(path, mmap_mode="r")


class GPTSampleDataset(torch.utils.data.Dataset):
    """Sample i of an endless sequence of epochs (i // samples_per_epoch is the epoch)."""

    def __init__(self, docs: ShardedDocuments, doc_ids: np.ndarray, seq_len: int, n_future: int, seed: int,
                 cache_dir: Path, name: str, shuffle: bool = True):
        self.docs, self.doc_ids = docs, np.asarray(doc_ids, dtype=np.int64)
        self.seq_len, self.sample_len, self.seed, self.shuffle = seq_len, seq_len + n_future, seed, shuffle
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        n_tok = int(docs.lengths[self.doc_ids].sum())
        self.samples_per_epoch = max(0, (n_tok - n_future) // seq_len)
        if self.samples_per_epoch == 0:
            raise ValueError(f"dataset {name}: {n_tok} tokens in this split, fewer than one sample of "
                             f"{self.sample_len} tokens")
        key = f"{docs.identity()}-{hashlib.sha1(self.doc_ids.tobytes()).hexdigest()[:8]}"
        self.stem = f"{name}-{key}-s{seq_len}-n{n_future}-seed{seed}{'' if shuffle else '-ordered'}"
        self._epoch, self._index = None, None

    def __len__(self) -> int:
        return self.samples_per_epoch

    def epoch_index(self, epoch: int):
        """(doc_order, sample_starts (S, 2) = [position in doc_order, offset], shuffle) for one epoch."""
        if self._epoch != epoch:
            rng_seed = [self.seed, epoch]
            stem = self.cache_dir / f"{self.stem}-e{epoch}"

            def order():
                if not self.shuffle:
                    return self.doc_ids
                return self.doc_ids[np.random.default_rng(rng_seed).permutation(len(self.doc_ids))]

            doc_order = _wait_or_build(Path(f"{stem}-docs.npy"), order)

            def starts():
                cum = np.cumsum(self.docs.lengths[doc_order])
                pos = np.arange(self.samples_per_epoch, dtype=np.int64) * self.seq_len
                d = np.searchsorted(cum, pos, side="right")
                before = np.where(d > 0, cum[np.maximum(d - 1, 0)], 0)
                return np.stack([d, pos - before], axis=1).astype(np.int64)

            sample_starts = _wait_or_build(Path(f"{stem}-samples.npy"), starts)

            def shuffled():
                if not self.shuffle:
                    return np.arange(self.samples_per_epoch, dtype=np.int64)
                return np.random.default_rng(rng_seed + [1]).permutation(self.samples_per_epoch).astype(np.int64)

            shuffle = _wait_or_build(Path(f"{stem}-shuffle.npy"), shuffled)
            self._epoch, self._index = epoch, (doc_order, sample_starts, shuffle)
        return self._index

    def sample(self, i: int) -> np.ndarray:
        epoch, j = divmod(int(i), self.samples_per_epoch)
        doc_order, starts, shuffle = self.epoch_index(epoch)
        pos, offset = starts[shuffle[j]]
        out = np.empty(self.sample_len, dtype=np.int64)
        filled = 0
        while filled < self.sample_len:  # packed across document boundaries
            doc = int(doc_order[pos])
            piece = self.docs.read(doc, int(offset), min(self.sample_len - filled, int(self.docs.lengths[doc]) - int(offset)))
            out[filled:filled + len(piece)] = piece
            filled += len(piece)
            pos, offset = pos + 1, 0
        return out

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.sample(i))
