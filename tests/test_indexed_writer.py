"""IndexedDatasetWriter.rollback: a shard whose writer rolled back some documents is byte for byte the shard
written without them (mtp-preprocess uses it to drop an input found damaged part-way through)."""

import numpy as np

from mtplm.data.indexed_dataset import IndexedDataset, IndexedDatasetWriter, bin_path, idx_path


def test_rollback_gives_the_same_bytes_as_never_adding(tmp_path):
    kept = [np.array([5, 7, 9]), np.array([1])]
    dropped = [np.array([300, 301]), np.array([2, 3, 4, 5])]  # a larger id too: max_id must come back
    ref = IndexedDatasetWriter(tmp_path / "ref", np.uint16)
    for d in kept + [np.array([8, 8])]:
        ref.add(d)
    ref.finish()

    w = IndexedDatasetWriter(tmp_path / "rolled", np.uint16)
    for d in kept:
        w.add(d)
    at = w.position()
    for d in dropped:
        w.add(d)
    w.rollback(at)
    assert w.position() == at == (2, 4, 9)
    w.add(np.array([8, 8]))
    w.finish()
    for path in (idx_path, bin_path):
        assert path(tmp_path / "rolled").read_bytes() == path(tmp_path / "ref").read_bytes()
    assert IndexedDataset(tmp_path / "rolled").n_tokens == 6


def test_rollback_to_the_current_position_changes_nothing(tmp_path):
    w = IndexedDatasetWriter(tmp_path / "s", np.int32)
    w.add(np.array([1, 2]))
    w.rollback(w.position())
    w.add(np.array([3]))
    w.finish()
    assert bin_path(tmp_path / "s").read_bytes() == np.array([1, 2, 3], np.int32).tobytes()
