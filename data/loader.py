"""Training and validation loaders: blending several datasets by weight, data-parallel sharding, exact resume.

The global sample sequence is a pure function of the data config. Each micro-step takes the next
micro_batch_size * dp_world_size samples of it, and rank r takes its slice (as Megatron's pretraining sampler
does), starting at `consumed_train_samples`; so a resumed run, or a run with another data-parallel size but
the same global batch, sees exactly the same samples per optimizer step.

Blending is stride scheduling: dataset d's k-th sample sits at time (k + 0.5) / w_d, and samples are taken in
time order (ties by dataset index). Every prefix then holds each dataset within about one sample of its
weight, so any window of 10,000 samples matches the weights to within 0.03%.
"""

from __future__ import annotations

import math
import signal
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from .config import DataConfig
from .gpt_dataset import GPTSampleDataset, ShardedDocuments, split_documents
from .manifest import check_manifest, read_manifest, shard_manifest_path
from .verify import check_token_ids, open_dataset

BLOCK = 1 << 16


def blend_block(weights: np.ndarray, counts: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The next `size` dataset choices after `counts` samples of each; returns (dataset ids, new counts)."""
    ids, times = [], []
    for d, w in enumerate(weights):
        if w <= 0:
            continue
        k = np.arange(counts[d], counts[d] + math.ceil(w * size) + 2, dtype=np.float64)
        times.append((k + 0.5) / w)
        ids.append(np.full(len(k), d, dtype=np.int64))
    times, ids = np.concatenate(times), np.concatenate(ids)
    order = np.lexsort((ids, times))[:size]
    chosen = ids[order]
    return chosen, counts + np.bincount(chosen, minlength=len(weights))


class BlendedDataset(torch.utils.data.Dataset):
    def __init__(self, datasets: list[GPTSampleDataset], weights: list[float], length: int | None = None):
        self.datasets = datasets
        w = np.asarray(weights, dtype=np.float64)
        self.weights = w / w.sum()
        self.length = length
        self._block, self._block_ids, self._block_within = -1, None, None
        self._starts = {}  # block -> counts at its start, computed forward as training proceeds

    def __len__(self) -> int:
        return self.length if self.length is not None else 2**62

    def _load_block(self, b: int) -> None:
        # Counts at a block's start depend on every earlier block; walk forward from the nearest known one.
        k = max((k for k in self._starts if k <= b), default=0)
        counts = self._starts.get(k, np.zeros(len(self.datasets), dtype=np.int64))
        while True:
            self._starts[k] = counts
            ids, after = blend_block(self.weights, counts, BLOCK)
            if k == b:
                break
            counts, k = after, k + 1
        within = np.empty(BLOCK, dtype=np.int64)
        for d in range(len(self.datasets)):
            mask = ids == d
            within[mask] = counts[d] + np.arange(int(mask.sum()))
        self._block, self._block_ids, self._block_within = b, ids, within

    def locate(self, i: int) -> tuple[int, int]:
        b, j = divmod(int(i), BLOCK)
        if b != self._block:
            self._load_block(b)
        return int(self._block_ids[j]), int(self._block_within[j])

    def __getitem__(self, i: int) -> torch.Tensor:
        d, j = self.locate(i)
        return self.datasets[d][j]


class DistributedBatchSampler:
    """Micro-batches of global sample indices for one data-parallel rank, from `start` on."""

    def __init__(self, micro_batch: int, rank: int, world: int, start: int = 0, total: int | None = None):
        self.mb, self.rank, self.world, self.start, self.total = micro_batch, rank, world, start, total

    def __iter__(self):
        i = self.start
        while self.total is None or i + self.mb * self.world <= self.total:
            first = i + self.rank * self.mb
            yield list(range(first, first + self.mb))
            i += self.mb * self.world


def ignore_stop_signals(_worker_id: int) -> None:
    """DataLoader workers leave stopping to the trainer (mtplm.pretrain.preemption). Schedulers signal every process
    of a job at once (scancel, docker stop, kill -- -PGID); a worker that died of it would fail the trainer's next
    batch before the trainer could checkpoint. A worker whose trainer is gone still exits (DataLoader's watchdog)."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def _stack(samples):
    return torch.stack(samples)


def check_dataset(cfg: DataConfig, k: int, vocab_size: int, tokenizer_sha256: str | None, scan: bool = True):
    """Open data.datasets[k] and refuse what training could not use: a manifest against the model and tokenizer,
    ids beyond the vocabulary, a split that leaves it no documents. `scan`: False leaves the token scan of data
    without a manifest to the open at training (mtp-train checks the rest at config load)."""
    spec = cfg.datasets[k]
    opened = open_dataset(spec)
    prefixes, manifest = opened.prefixes, opened.manifest
    check_manifest(manifest, str(opened.manifest_file if manifest is not None else spec), vocab_size,
                   tokenizer_sha256)
    for p in prefixes:  # per-shard manifests record each shard's max id
        if shard_manifest_path(p).is_file():
            check_manifest(read_manifest(shard_manifest_path(p)), str(shard_manifest_path(p)), vocab_size,
                           tokenizer_sha256)
    check_token_ids(opened, vocab_size, Path(cfg.cache_dir) if cfg.cache_dir else None, scan)
    docs = ShardedDocuments(prefixes, opened.shards)
    splits = split_documents(len(docs), cfg.split, cfg.seed)
    for split in ("train", "valid") if cfg.split[1] > 0 else ("train",):
        if len(splits[split]) == 0:  # dropping it would silently change the blend
            raise ValueError(f"dataset {spec}: its {split} split is empty (data.split {cfg.split} of its "
                             f"{len(docs)} documents); give that split a larger ratio, or 0")
    return opened, docs, splits


def build_datasets(cfg: DataConfig, n_future_tokens: int, vocab_size: int, tokenizer_sha256: str | None,
                   split: str):
    parts, weights = [], []
    for k, spec in enumerate(cfg.datasets):
        opened, docs, splits = check_dataset(cfg, k, vocab_size, tokenizer_sha256)
        prefixes, ids = opened.prefixes, splits[split]
        cache = Path(cfg.cache_dir) if cfg.cache_dir else Path(prefixes[0]).parent / "index_cache"
        name = f"{Path(spec).name}-{split}"
        parts.append(GPTSampleDataset(docs, ids, cfg.seq_len, n_future_tokens, cfg.seed, cache, name,
                                      shuffle=split == "train"))
        weights.append(cfg.weights[k] if cfg.weights else docs.lengths[ids].sum())
    return parts, weights


def build_data_loaders(cfg: DataConfig, *, n_future_tokens: int, vocab_size: int, micro_batch_size: int,
                       dp_rank: int, dp_world_size: int, consumed_train_samples: int = 0,
                       pin_memory: bool = False, tokenizer_sha256: str | None = None):
    if not cfg.datasets:
        raise ValueError("data.datasets is empty: give dataset folders or prefixes written by mtp-preprocess")
    train_parts, train_w = build_datasets(cfg, n_future_tokens, vocab_size, tokenizer_sha256, "train")
    if not train_parts:
        raise ValueError(f"data.split {cfg.split} leaves no training documents")
    train = BlendedDataset(train_parts, train_w)
    loader_kw = dict(num_workers=cfg.num_workers, pin_memory=pin_memory, collate_fn=_stack,
                     persistent_workers=cfg.num_workers > 0, worker_init_fn=ignore_stop_signals)
    train_loader = DataLoader(train, batch_sampler=DistributedBatchSampler(
        micro_batch_size, dp_rank, dp_world_size, consumed_train_samples), **loader_kw)
    valid_loader = None
    if cfg.split[1] > 0:
        parts, w = build_datasets(cfg, n_future_tokens, vocab_size, tokenizer_sha256, "valid")
        if parts:
            total = sum(len(p) for p in parts)
            valid = BlendedDataset(parts, w, length=total)
            valid_loader = DataLoader(valid, batch_sampler=DistributedBatchSampler(
                micro_batch_size, dp_rank, dp_world_size, 0, total), num_workers=0, collate_fn=_stack)
    return train_loader, valid_loader
