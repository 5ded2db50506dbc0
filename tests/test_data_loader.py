"""Samples, blending, determinism, resume and data-parallel sharding of the training data."""

import itertools

import numpy as np
import pytest
import torch

from mtplm.data.config import DataConfig
from mtplm.data.gpt_dataset import GPTSampleDataset, ShardedDocuments, split_documents
from mtplm.data.loader import BlendedDataset, blend_block, build_data_loaders
from mtplm.data.manifest import resolve_shards
from mtplm.data.synthetic import write_token_dataset

VOCAB = 1000


def make(tmp_path, name="a", n_docs=60, seed=0, docs_per_shard=25, base=0):
    rng = np.random.default_rng(seed)
    docs = [list(base + rng.integers(1, 400, rng.integers(5, 80))) for _ in range(n_docs)]
    return write_token_dataset(tmp_path / name, docs, VOCAB, docs_per_shard=docs_per_shard), docs


def loaders(folder, **kw):
    cfg_kw = dict(datasets=[str(f) for f in (folder if isinstance(folder, list) else [folder])], seq_len=16,
                  split=[0.9, 0.1, 0.0], seed=7, num_workers=0)
    cfg_kw.update({k: kw.pop(k) for k in list(kw) if k in ("weights", "split", "seed", "cache_dir", "num_workers")})
    args = dict(n_future_tokens=4, vocab_size=VOCAB, micro_batch_size=2, dp_rank=0, dp_world_size=1)
    args.update(kw)
    return build_data_loaders(DataConfig(**cfg_kw), **args)


def take(loader, n):
    return torch.cat(list(itertools.islice(iter(loader), n)))


def test_samples_are_windows_of_the_shuffled_document_stream(tmp_path):
    folder, docs = make(tmp_path)
    prefixes, _ = resolve_shards(folder)
    sd = ShardedDocuments(prefixes)
    ids = split_documents(len(sd), [1, 0, 0], 3)["train"]
    ds = GPTSampleDataset(sd, ids, seq_len=16, n_future=4, seed=3, cache_dir=tmp_path / "c", name="t")
    order, starts, shuffle = ds.epoch_index(0)
    stream = np.concatenate([docs[d] for d in order])
    assert len(ds) == (len(stream) - 4) // 16
    for j in range(len(ds)):
        k = shuffle[j]
        assert ds[j].tolist() == stream[k * 16:k * 16 + 20].tolist()  # seq_len + n tokens, packed across docs
    # every token is an input exactly once per epoch
    assert sorted(shuffle.tolist()) == list(range(len(ds)))


def test_deterministic_across_runs_and_epochs_differ(tmp_path):
    folder, _ = make(tmp_path)
    a = take(loaders(folder, cache_dir=str(tmp_path / "c1"))[0], 200)
    b = take(loaders(folder, cache_dir=str(tmp_path / "c2"))[0], 200)  # rebuilt from scratch: same order
    assert torch.equal(a, b)
    c = take(loaders(folder, seed=8)[0], 200)
    assert not torch.equal(a, c)


def test_resume_from_consumed_samples_continues_exactly(tmp_path):
    folder, _ = make(tmp_path)
    full = take(loaders(folder)[0], 30)
    resumed = take(loaders(folder, consumed_train_samples=20)[0], 20)
    assert torch.equal(full[20:], resumed)


def test_data_parallel_ranks_are_disjoint_and_cover_the_global_order(tmp_path):
    folder, _ = make(tmp_path)
    single = take(loaders(folder, micro_batch_size=4)[0], 50)  # 200 samples
    r0 = list(itertools.islice(iter(loaders(folder, dp_rank=0, dp_world_size=2)[0]), 50))
    r1 = list(itertools.islice(iter(loaders(folder, dp_rank=1, dp_world_size=2)[0]), 50))
    merged = torch.cat([torch.cat([a, b]) for a, b in zip(r0, r1)])  # one micro-step = rank 0's then rank 1's slice
    assert torch.equal(merged, single)


def test_train_and_valid_splits_share_no_document(tmp_path):
    splits = split_documents(1000, [0.8, 0.15, 0.05], seed=1)
    assert sum(len(v) for v in splits.values()) == 1000
    assert not set(splits["train"]) & set(splits["valid"]) and not set(splits["valid"]) & set(splits["test"])
    assert len(splits["valid"]) == 150


def test_blending_matches_weights_in_every_window():
    weights = np.array([0.7, 0.2, 0.1])
    counts = np.zeros(3, dtype=np.int64)
    ids = []
    for _ in range(4):
        block, counts = blend_block(weights, counts, 25_000)
        ids.append(block)
    ids = np.concatenate(ids)
    window = 10_000
    onehot = np.eye(3)[ids]
    cum = np.concatenate([np.zeros((1, 3)), np.cumsum(onehot, axis=0)])
    for start in range(0, len(ids) - window, 997):
        share = (cum[start + window] - cum[start]) / window
        assert np.abs(share - weights).max() <= 0.001, (start, share)


def test_blended_loader_draws_from_every_dataset_by_weight(tmp_path):
    a, _ = make(tmp_path, "a", base=0)
    b, _ = make(tmp_path, "b", seed=1, base=500)  # dataset b's tokens are all >= 500
    batches = take(loaders([a, b], weights=[0.75, 0.25], micro_batch_size=4)[0], 100)
    from_b = (batches.min(dim=1).values >= 500).float().mean().item()
    assert from_b == pytest.approx(0.25, abs=0.01)
    ds = loaders([a, b], weights=[0.75, 0.25])[0].dataset
    assert isinstance(ds, BlendedDataset)


def test_validation_loader_is_finite_and_repeatable(tmp_path):
    folder, _ = make(tmp_path)
    _, valid = loaders(folder)
    first, second = list(valid), list(valid)
    assert len(first) > 0 and all(torch.equal(x, y) for x, y in zip(first, second))


def test_checks_against_the_model(tmp_path):
    folder, _ = make(tmp_path)
    with pytest.raises(ValueError, match="tokenized with vocab_size 1000, but model.vocab_size is 300"):
        loaders(folder, vocab_size=300)
    # ids beyond the model's vocabulary are caught from the recorded max id, not inside the embedding
    bad = write_token_dataset(tmp_path / "bad", [[1, 2, 350]] * 40, 300)
    with pytest.raises(ValueError, match="holds token id 350, but model.vocab_size is 300"):
        loaders(bad, vocab_size=300)
    tok_folder = write_token_dataset(tmp_path / "t", [[1, 2, 3]] * 40, VOCAB, tokenizer_sha256="aa" * 32)
    with pytest.raises(ValueError, match="tokenized with tokenizer sha256 aaaa"):
        loaders(tok_folder, tokenizer_sha256="bb" * 32)
    with pytest.raises(FileNotFoundError, match="neither a folder with dataset.json nor a prefix"):
        loaders(tmp_path / "missing")


def test_loader_workers_give_the_same_batches(tmp_path):
    folder, _ = make(tmp_path)
    assert torch.equal(take(loaders(folder)[0], 20), take(loaders(folder, num_workers=2)[0], 20))
