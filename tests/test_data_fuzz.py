"""Fuzzing the shard reader through the training data path: random truncations and byte flips of .idx/.bin and
random edits of dataset.json (seeded, a few hundred cases). Every case must end in a clean one-line error that
names a file of the dataset, or in a correct read: never a numpy/torch traceback, a hang, an out-of-bounds or
short read, or a silently different dataset.

What a correct read is depends on what was damaged: a flipped byte in .bin token data legitimately changes
that token (and nothing else); the .idx describes where documents are, so a damaged .idx must be refused, except
a document index moved without breaking the order, which only regroups the same token stream into other
documents; an edited dataset.json that is still accepted must give the same documents.
"""

import json
import shutil
import signal
import struct

import numpy as np
import pytest

from mtplm.data.config import DataConfig
from mtplm.data.loader import build_data_loaders
from mtplm.data.synthetic import write_token_dataset

from test_data_format import megatron_pair

VOCAB = 300
HEADER = 34


def read_everything(spec, cache_dir):
    """The training path: open, check, split, index; then every document and a few samples."""
    cfg = DataConfig(datasets=[str(spec)], seq_len=8, split=[1.0, 0.0, 0.0], seed=3, num_workers=0,
                     cache_dir=str(cache_dir))
    train, _ = build_data_loaders(cfg, n_future_tokens=2, vocab_size=VOCAB, micro_batch_size=2, dp_rank=0,
                                  dp_world_size=1)
    docs = train.dataset.datasets[0].docs
    out = []
    for i in range(len(docs)):
        tokens = docs.read(i, 0, int(docs.lengths[i]))
        assert len(tokens) == docs.lengths[i], "short read"
        out.append(tokens.tolist())
    it = iter(train)
    for _ in range(3):
        batch = next(it)
        assert batch.shape == (2, 10) and int(batch.min()) >= 0 and int(batch.max()) < VOCAB
    return out


def outcome(spec, work, cache_dir):
    """(documents, None) or (None, message); anything but a clean error naming the damaged dataset fails."""
    signal.alarm(10)  # a hang fails the test instead of stalling CI
    try:
        return read_everything(spec, cache_dir), None
    except (ValueError, FileNotFoundError) as e:
        msg = str(e)
        assert str(work) in msg and "\n" not in msg, f"{type(e).__name__} without the file named: {msg}"
        return None, msg
    finally:
        signal.alarm(0)


@pytest.fixture
def pristine(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, VOCAB, rng.integers(1, 40)).tolist() for _ in range(30)]
    write_token_dataset(tmp_path / "pristine" / "ours", docs, VOCAB, docs_per_shard=12)
    megatron_pair(tmp_path / "pristine" / "mg", docs[:20], sequences_per_doc=3)  # no manifest
    return tmp_path, docs


def copy(tmp_path, k):
    work = tmp_path / f"case{k:04d}"
    shutil.copytree(tmp_path / "pristine", work)
    return work


def flip(path, rng, lo=0, hi=None):
    data = bytearray(path.read_bytes())
    pos = int(rng.integers(lo, len(data) if hi is None else hi))
    data[pos] ^= int(rng.integers(1, 256))  # never a no-op
    path.write_bytes(bytes(data))
    return pos


def idx_regions(path):
    n_seq, n_doc = struct.unpack_from("<QQ", path.read_bytes(), 18)
    return HEADER + 12 * n_seq, HEADER + 12 * n_seq + 8 * n_doc  # document indices live in [start, end)


def test_damaged_shards_are_refused_or_read_correctly(pristine):
    tmp_path, docs = pristine
    rng = np.random.default_rng(1234)
    stats = {"refused": 0, "read": 0}
    for k in range(240):
        work = copy(tmp_path, k)
        spec, expected = (work / "ours", docs) if k % 2 else (work / "mg", docs[:20])
        files = sorted(spec.glob("*.idx")) + sorted(spec.glob("*.bin")) if spec.is_dir() else \
            [work / "mg.idx", work / "mg.bin"]
        target = files[int(rng.integers(len(files)))]
        size = target.stat().st_size
        truncate = rng.random() < 0.3
        if truncate:
            target.write_bytes(target.read_bytes()[:int(rng.integers(0, size))])
        else:
            pos = flip(target, rng)
        got, err = outcome(spec, work, work / "cache")
        stats["refused" if err else "read"] += 1
        if err:
            continue
        assert not truncate, f"case {k}: truncated {target.name} to fewer bytes was read"
        if target.suffix == ".idx":  # only a document index moved within order can pass: same token stream
            start, end = idx_regions(target)
            assert start <= pos < end, f"case {k}: byte {pos} of {target.name} changed and was not detected"
            assert sum(got, []) == sum(expected, [])
        else:  # one token changed, every document in place
            assert [len(d) for d in got] == [len(d) for d in expected]
            stream, want = np.array(sum(got, [])), np.array(sum(expected, []))
            shard_start = 0 if not spec.is_dir() else sum(
                (p.stat().st_size for p in sorted(spec.glob("*.bin")) if p.name < target.name))
            changed = np.flatnonzero(stream != want)
            assert set(changed.tolist()) <= {(shard_start + pos) // 2}, f"case {k}: {changed}"
    assert stats["refused"] > 100 and stats["read"] > 10, stats  # both outcomes exercised


EDIT_VALUES = [None, -5, 0, 1, 10**12, "x", "", [], {}, True, 3.5, ["shard_00000"], ["nope"],
               ["shard_00000", "shard_00000"], ["shard_00002", "shard_00001", "shard_00000"]]


def edit_manifest(path, rng):
    text = path.read_text()
    kind = int(rng.integers(5))
    if kind == 0:  # cut short
        path.write_text(text[:int(rng.integers(0, len(text)))])
    elif kind == 1:  # a flipped byte anywhere (may break UTF-8)
        flip(path, rng)
    elif kind == 2:  # not an object
        path.write_text(json.dumps(EDIT_VALUES[int(rng.integers(len(EDIT_VALUES)))]))
    else:
        m = json.loads(text)
        key = sorted(m)[int(rng.integers(len(m)))]
        if kind == 3:
            del m[key]
        else:
            m[key] = EDIT_VALUES[int(rng.integers(len(EDIT_VALUES)))]
        path.write_text(json.dumps(m))


def test_edited_dataset_manifest_is_refused_or_changes_nothing(pristine):
    tmp_path, docs = pristine
    rng = np.random.default_rng(99)
    stats = {"refused": 0, "read": 0}
    for k in range(200):
        work = copy(tmp_path, k)
        edit_manifest(work / "ours" / "dataset.json", rng)
        got, err = outcome(work / "ours", work, work / "cache")
        stats["refused" if err else "read"] += 1
        if not err:  # the shards may be listed in another order; the documents are the same
            assert sorted(got) == sorted(docs), f"case {k}: {(work / 'ours' / 'dataset.json').read_text()}"
    assert stats["refused"] > 50 and stats["read"] > 10, stats
