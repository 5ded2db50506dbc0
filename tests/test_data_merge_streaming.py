"""mtp-data merge streams: its memory stays flat as the inputs grow (tokens copied and the index written one CHUNK
at a time, never a shard's arrays at once), its bytes equal a whole-array concatenation across many chunk
boundaries, and its counts are checked: an input that changes under it, or a merged pair whose counts differ from
the inputs', is refused in one line with nothing left behind."""

import tracemalloc

import numpy as np
import pytest

from mtplm.data import indexed_dataset, inspect as data_inspect
from mtplm.data.indexed_dataset import IndexedDataset, bin_path, idx_path, write_index
from mtplm.data.inspect import main as mtp_data

SMALL_CHUNK = 4096  # bytes: the inputs below span hundreds of chunks


def megatron_prefix(path, n_docs, seed):
    """A Megatron-style pair (no manifest) whose documents span 1-3 sequences each."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 9, size=n_docs * 2).astype(np.int32)
    cuts = np.concatenate([[0], np.cumsum(rng.integers(1, 4, size=n_docs))])
    cuts = cuts[cuts < len(lengths)]
    doc_idx = np.append(cuts, len(lengths)).astype(np.int64)
    rng.integers(0, 300, size=int(lengths.sum())).astype(np.uint16).tofile(bin_path(path))
    write_index(idx_path(path), np.dtype(np.uint16), lengths, doc_idx)
    return path


def reference(prefixes, out):
    """The whole-array concatenation (megatron-core's add_index, in memory)."""
    shards = [IndexedDataset(p) for p in prefixes]
    lengths = np.concatenate([s.lengths for s in shards])
    doc_idx, base = [np.zeros(1, np.int64)], 0
    for s in shards:
        doc_idx.append(s.doc_indices[1:] + base)
        base += len(s.lengths)
    write_index(idx_path(out), shards[0].dtype, lengths, np.concatenate(doc_idx))
    bin_path(out).write_bytes(b"".join(bin_path(p).read_bytes() for p in prefixes))


def peak_of_merge(tmp_path, n_docs):
    inputs = [megatron_prefix(tmp_path / f"in{n_docs}_{k}", n_docs, seed=k) for k in range(2)]
    for p in inputs:  # the max-id scan of data without a manifest is cached beside it: done before measuring
        data_inspect.shard_id_bounds(data_inspect.open_dataset(p))
    tracemalloc.start()
    try:
        data_inspect.merge(str(tmp_path / f"merged{n_docs}"), [str(p) for p in inputs])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    reference(inputs, tmp_path / f"ref{n_docs}")
    for ext in (".idx", ".bin"):
        assert (tmp_path / f"merged{n_docs}{ext}").read_bytes() == (tmp_path / f"ref{n_docs}{ext}").read_bytes()
    size = sum(idx_path(p).stat().st_size + bin_path(p).stat().st_size for p in inputs)
    return peak, size


def test_merge_memory_stays_flat_as_the_input_grows(tmp_path, monkeypatch):
    monkeypatch.setattr(indexed_dataset, "CHUNK", SMALL_CHUNK)
    small, small_size = peak_of_merge(tmp_path, 5_000)
    large, large_size = peak_of_merge(tmp_path, 100_000)
    assert large_size > 15 * small_size
    # 20x the input, the same peak (a few chunks and the bookkeeping), far below one input's index
    assert large < small + 16 * SMALL_CHUNK, (small, large)
    assert large < large_size / 20, (large, large_size)


def test_merge_refuses_an_input_that_shrinks_while_it_is_read(tmp_path, capsys, monkeypatch):
    a = megatron_prefix(tmp_path / "a", 50, seed=1)
    b = megatron_prefix(tmp_path / "b", 50, seed=2)
    bounds = data_inspect.shard_id_bounds

    def then_truncate(ds, *args, **kwargs):  # opened and checked; then another job cuts the file short
        out = bounds(ds, *args, **kwargs)
        if ds.spec == str(b):
            with open(bin_path(b), "r+b") as f:
                f.truncate(10)
        return out

    monkeypatch.setattr(data_inspect, "shard_id_bounds", then_truncate)
    assert mtp_data(["merge", str(tmp_path / "out" / "m"), str(a), str(b)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{bin_path(b)}: ended after 10 bytes" in err, err
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("broken", ["copy_tokens", "write_concatenated_index"])
def test_merge_refuses_a_result_whose_counts_differ_from_the_inputs(tmp_path, capsys, monkeypatch, broken):
    a = megatron_prefix(tmp_path / "a", 50, seed=1)
    b = megatron_prefix(tmp_path / "b", 50, seed=2)
    real = getattr(data_inspect, broken)

    def drops_the_last_shard(*args):  # a writer that loses an input must not pass as a merge
        return real(*(a[:-1] if isinstance(a, list) else a for a in args))

    monkeypatch.setattr(data_inspect, broken, drops_the_last_shard)
    assert mtp_data(["merge", str(tmp_path / "out" / "m"), str(a), str(b)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "but the inputs hold" in err and "nothing was written" in err, err
    assert list((tmp_path / "out").iterdir()) == []
