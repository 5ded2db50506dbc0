"""Megatron's .idx/.bin format: a pair built byte by byte from the format description reads back, ours is
byte-identical to it, and damaged files are refused with the file named."""

import struct

import numpy as np
import pytest

from mtplm.data.indexed_dataset import DatasetFormatError, IndexedDataset, IndexedDatasetWriter


def megatron_pair(prefix, docs, dtype_code=8, np_dtype=np.uint16, sequences_per_doc=1):
    """Written from the description alone: magic, version 1, dtype code, counts, lengths, pointers, doc indices."""
    seqs = []
    for d in docs:  # optionally split each document into several sequences, as Megatron's sentence mode does
        parts = np.array_split(np.asarray(d), sequences_per_doc) if sequences_per_doc > 1 else [np.asarray(d)]
        seqs.append(parts)
    flat = [s for parts in seqs for s in parts]
    lengths = [len(s) for s in flat]
    pointers, pos = [], 0
    for n in lengths:
        pointers.append(pos)
        pos += n * np.dtype(np_dtype).itemsize
    doc_idx = [0]
    for parts in seqs:
        doc_idx.append(doc_idx[-1] + len(parts))
    idx = b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", dtype_code)
    idx += struct.pack("<Q", len(lengths)) + struct.pack("<Q", len(doc_idx))
    idx += struct.pack(f"<{len(lengths)}i", *lengths) + struct.pack(f"<{len(pointers)}q", *pointers)
    idx += struct.pack(f"<{len(doc_idx)}q", *doc_idx)
    (prefix.parent / (prefix.name + ".idx")).write_bytes(idx)
    (prefix.parent / (prefix.name + ".bin")).write_bytes(b"".join(np.asarray(s, np_dtype).tobytes() for s in flat))


DOCS = [[5, 6, 7], [1], [9, 9, 9, 9, 2], [0, 65535]]


def test_hand_built_pair_reads_back(tmp_path):
    megatron_pair(tmp_path / "m", DOCS)
    ds = IndexedDataset(tmp_path / "m")
    assert ds.dtype == np.uint16 and len(ds) == 4 and ds.n_tokens == 11
    assert [ds.get(i).tolist() for i in range(4)] == DOCS
    assert ds.document_lengths().tolist() == [3, 1, 5, 2]


def test_multi_sequence_documents_and_int32(tmp_path):
    docs = [list(range(10)), list(range(100, 107))]
    megatron_pair(tmp_path / "m", docs, dtype_code=4, np_dtype=np.int32, sequences_per_doc=3)
    ds = IndexedDataset(tmp_path / "m")
    assert ds.dtype == np.int32 and len(ds) == 6
    offs, lens = ds.document_offsets(), ds.document_lengths()
    assert [ds.tokens[o:o + n].tolist() for o, n in zip(offs, lens)] == docs


def test_our_writer_is_byte_identical(tmp_path):
    megatron_pair(tmp_path / "m", DOCS)
    w = IndexedDatasetWriter(tmp_path / "ours", np.uint16)
    for d in DOCS:
        w.add(d)
    w.finish()
    for ext in (".idx", ".bin"):
        assert (tmp_path / f"ours{ext}").read_bytes() == (tmp_path / f"m{ext}").read_bytes()


def test_aborted_writer_leaves_nothing_that_looks_finished(tmp_path):
    w = IndexedDatasetWriter(tmp_path / "x", np.uint16)
    w.add([1, 2, 3])
    assert not (tmp_path / "x.bin").exists() and not (tmp_path / "x.idx").exists()
    w.abort()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("damage, message", [
    (lambda i, b: i.write_bytes(b"NOTMAGIC!" + i.read_bytes()[9:]), "m.idx: not an indexed dataset index"),
    (lambda i, b: i.write_bytes(i.read_bytes()[:9] + struct.pack("<Q", 2) + i.read_bytes()[17:]), "index version 2"),
    (lambda i, b: i.write_bytes(i.read_bytes()[:17] + b"\x09" + i.read_bytes()[18:]), "unknown dtype code 9"),
    (lambda i, b: i.write_bytes(i.read_bytes()[:40]), "truncated index"),
    (lambda i, b: b.write_bytes(b.read_bytes()[:-2]), "m.bin: 20 bytes, but"),
    (lambda i, b: b.unlink(), "m.bin: missing"),
])
def test_damaged_files_are_refused_with_the_file_named(tmp_path, damage, message):
    megatron_pair(tmp_path / "m", DOCS)
    damage(tmp_path / "m.idx", tmp_path / "m.bin")
    with pytest.raises((DatasetFormatError, FileNotFoundError), match=message):
        IndexedDataset(tmp_path / "m")
