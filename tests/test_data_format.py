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


@pytest.mark.parametrize("keep", [0, 5, 9, 12, 33])
def test_truncated_header_says_so(tmp_path, keep):
    megatron_pair(tmp_path / "m", DOCS)
    idx = tmp_path / "m.idx"
    idx.write_bytes(idx.read_bytes()[:keep])
    with pytest.raises(DatasetFormatError, match=rf"m.idx: truncated header: the file has {keep} bytes, an index "
                                                 r"header has 34$"):
        IndexedDataset(tmp_path / "m")


def _patch(idx, offset, fmt, value):
    data = bytearray(idx.read_bytes())
    struct.pack_into(fmt, data, offset, value)
    idx.write_bytes(bytes(data))


HEADER, N = 34, len(DOCS)  # DOCS: 4 sequences, 5 document indices


@pytest.mark.parametrize("offset, fmt, value, message", [
    (HEADER + 4, "<i", 2, r"sequence 2 points to byte 8, but the lengths before it end at byte 10"),
    (HEADER + 4, "<i", -1, "sequence 1 has negative length -1"),
    (HEADER + 4 * N + 16, "<q", 10, "sequence 2 points to byte 10, but the lengths before it end at byte 8"),
    (HEADER + 12 * N + 24, "<q", 1, "document indices must rise from 0 to the sequence count 4 without going back"),
    (HEADER + 12 * N + 32, "<q", 3, "document indices must rise from 0 to the sequence count 4"),
    (HEADER + 12 * N, "<q", 1, "document indices must rise from 0"),
    (HEADER - 16, "<Q", N - 1, "index longer than its header says"),
    (HEADER - 8, "<Q", 2**40, "truncated index: 122 bytes, but a header of 4 sequences and 1099511627776"),
    (HEADER + 4 * 3, "<i", 3, r"m.bin: 22 bytes, but .*m.idx describes 12 tokens of uint16 \(24 bytes\)"),
])
def test_inconsistent_index_is_refused_at_open(tmp_path, offset, fmt, value, message):
    """Lengths, pointers and document indices must agree with each other and with .bin, or reads go out of
    bounds or return other documents' tokens."""
    megatron_pair(tmp_path / "m", DOCS)
    _patch(tmp_path / "m.idx", offset, fmt, value)
    with pytest.raises(DatasetFormatError, match=message):
        IndexedDataset(tmp_path / "m")


def test_empty_documents_including_the_last_read_as_empty(tmp_path):
    megatron_pair(tmp_path / "m", [[1, 2], [3]])
    idx = tmp_path / "m.idx"  # an empty last document, as Megatron's end_document() twice writes it
    lengths, pointers = [2, 1], [0, 4]
    raw = b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 8, 2, 4) + struct.pack("<2i", *lengths)
    raw += struct.pack("<2q", *pointers) + struct.pack("<4q", 0, 1, 2, 2)
    idx.write_bytes(raw)
    ds = IndexedDataset(tmp_path / "m")
    assert ds.document_lengths().tolist() == [2, 1, 0]
    assert ds.document_offsets().tolist() == [0, 2, 3]
