"""Checks made once when a dataset is opened: token ids against the vocabulary (from a cross-checked manifest or
a cached scan), empty datasets and splits, and a folder of Megatron pairs named instead of a prefix."""

import json
import os

import numpy as np
import pytest

from mtplm.data import verify
from mtplm.data.config import DataConfig
from mtplm.data.indexed_dataset import DatasetFormatError, IndexedDatasetWriter
from mtplm.data.inspect import main as mtp_data
from mtplm.data.loader import build_data_loaders
from mtplm.data.synthetic import write_token_dataset

DOCS = [[1, 2, 3, 4, 5, 6, 7, 8]] * 30


def megatron_prefix(path, docs, dtype=np.uint16):
    path.parent.mkdir(parents=True, exist_ok=True)
    w = IndexedDatasetWriter(path, dtype)  # no manifest beside it, as Megatron/GPT-NeoX data comes
    for d in docs:
        w.add(d)
    return w.finish()


def build(spec, vocab_size=300, split=(0.9, 0.1, 0.0), cache_dir=None):
    cfg = DataConfig(datasets=[str(spec)], seq_len=4, split=list(split), num_workers=0, cache_dir=cache_dir)
    return build_data_loaders(cfg, n_future_tokens=2, vocab_size=vocab_size, micro_batch_size=2, dp_rank=0,
                              dp_world_size=1)


def drop_max_token_id(folder, vocab_size=None):
    for f in folder.glob("*.json"):
        m = json.loads(f.read_text())
        m.pop("max_token_id", None)
        if vocab_size is not None:
            m["vocab_size"] = vocab_size
        f.write_text(json.dumps(m))


def test_megatron_prefix_with_ids_beyond_the_vocabulary_is_refused_before_the_model(tmp_path):
    prefix = megatron_prefix(tmp_path / "text_document", DOCS[:-1] + [[1, 350, 2, 3]])
    with pytest.raises(ValueError, match=r"text_document.bin: holds token id 350, but model.vocab_size is 300"):
        build(prefix)
    build(prefix, vocab_size=351)  # fits: trains


def test_manifest_vocab_smaller_than_the_ids_it_describes(tmp_path, capsys):
    folder = write_token_dataset(tmp_path / "d", DOCS[:-1] + [[1, 350, 2]], vocab_size=1000)
    drop_max_token_id(folder, vocab_size=300)  # a manifest that claims 300 and records no max id
    with pytest.raises(ValueError, match=r"shard_00000.bin: holds token id 350, but model.vocab_size is 300"):
        build(folder)
    assert mtp_data(["inspect", str(folder)]) == 1
    err = capsys.readouterr().err
    assert "shard_00000.bin: holds token id 350, but the vocab_size is 300" in err and "dataset.json" in err
    # without a manifest, --vocab-size gives the model's size to check against
    prefix = megatron_prefix(tmp_path / "m", [[4, 5, 700]])
    assert mtp_data(["inspect", str(prefix), "--vocab-size", "512"]) == 1
    assert "m.bin: holds token id 700, but the vocab_size is 512 (--vocab-size)" in capsys.readouterr().err
    assert mtp_data(["inspect", str(prefix)]) == 0
    assert "largest token id: 700 (scanned m.bin)" in capsys.readouterr().out


def test_a_manifest_max_id_is_cross_checked_against_the_shard(tmp_path):
    folder = write_token_dataset(tmp_path / "d", DOCS[:-1] + [[1, 350, 2]], vocab_size=300)
    for f in folder.glob("*.json"):  # a manifest that understates the largest id is not believed
        f.write_text(json.dumps({**json.loads(f.read_text()), "max_token_id": 200}))
    with pytest.raises(DatasetFormatError, match=r"records max_token_id 200, but .*shard_00000.bin holds id 350"):
        build(folder)
    folder = write_token_dataset(tmp_path / "e", DOCS, vocab_size=300)
    m = json.loads((folder / "dataset.json").read_text())
    (folder / "dataset.json").write_text(json.dumps({**m, "documents": 29}))  # stale: another version of the data
    with pytest.raises(DatasetFormatError, match=r"dataset.json: records documents 29, but the files hold 30"):
        build(folder)


def test_scan_is_cached_beside_the_index_and_redone_when_the_file_changes(tmp_path, monkeypatch):
    calls = []
    real = verify.scan_token_range
    monkeypatch.setattr(verify, "scan_token_range", lambda ds: calls.append(ds.prefix) or real(ds))
    prefix = megatron_prefix(tmp_path / "m", DOCS)
    build(prefix)
    build(prefix)  # valid split and second run: from the cache
    assert len(calls) == 1 and (tmp_path / ".m.token_range.json").is_file()
    data = (tmp_path / "m.bin").read_bytes()
    (tmp_path / "m.bin").write_bytes(data[:-2] + np.uint16(299).tobytes())  # same size, new content
    st = os.stat(tmp_path / "m.bin")
    os.utime(tmp_path / "m.bin", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(ValueError, match="holds token id 299, but model.vocab_size is 290"):
        build(prefix, vocab_size=290)
    assert len(calls) == 2


def test_read_only_data_folder_caches_the_scan_in_the_cache_dir(tmp_path, monkeypatch):
    prefix = megatron_prefix(tmp_path / "data" / "m", DOCS)
    real_write = verify.write_json_atomic

    def read_only(path, data):  # root ignores chmod, so the read-only folder is simulated
        if path.parent == tmp_path / "data":
            raise PermissionError(13, "Read-only file system", str(path))
        real_write(path, data)

    monkeypatch.setattr(verify, "write_json_atomic", read_only)
    calls = []
    real = verify.scan_token_range
    monkeypatch.setattr(verify, "scan_token_range", lambda ds: calls.append(1) or real(ds))
    cache = tmp_path / "cache"
    ds = verify.open_dataset(prefix)
    assert verify.token_range(ds.shards[0], cache) == (1, 8)
    assert verify.token_range(ds.shards[0], cache) == (1, 8)
    assert len(calls) == 1 and len(list(cache.glob("m-*.token_range.json"))) == 1
    assert not (tmp_path / "data" / ".m.token_range.json").exists()


def test_empty_dataset_is_one_line_in_inspect_and_training(tmp_path, capsys):
    folder = write_token_dataset(tmp_path / "empty", [], vocab_size=300)
    assert mtp_data(["inspect", str(folder)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "empty (0 documents, 0 tokens in 0 shard(s)" in err
    assert "empty/dataset.json" in err
    with pytest.raises(ValueError, match=r"dataset .*empty: empty \(0 documents"):
        build(folder)
    prefix = megatron_prefix(tmp_path / "m", [[], []])  # documents without tokens
    with pytest.raises(ValueError, match=r"empty \(2 documents, 0 tokens in 1 shard\(s\); .*m.idx\)"):
        build(prefix)


def test_a_split_that_leaves_no_documents_names_the_dataset_and_split(tmp_path):
    folder = write_token_dataset(tmp_path / "small", DOCS[:3], vocab_size=300)
    with pytest.raises(ValueError, match=r"dataset .*small: its valid split is empty \(data.split \[0.9, 0.1, 0.0\] "
                                         r"of its 3 documents\)"):
        build(folder)
    with pytest.raises(ValueError, match=r"its train split is empty"):
        build(folder, split=(0.1, 0.9, 0.0))
    build(folder, split=(1.0, 0.0, 0.0))


def test_folder_of_megatron_pairs_names_its_prefixes(tmp_path):
    for name in ("text_document", "code_document"):
        megatron_prefix(tmp_path / "mg" / name, DOCS)
    (tmp_path / "mg" / "stray.idx").write_bytes(b"")  # no .bin: not a pair
    with pytest.raises(FileNotFoundError, match=r"mg: a folder without dataset.json; name a Megatron .idx/.bin pair "
                                                r"by its prefix instead \(e.g. .*mg/code_document\); this folder "
                                                r"holds the prefixes: code_document, text_document$"):
        build(tmp_path / "mg")
    build(tmp_path / "mg" / "text_document")
    # our own shards without dataset.json: an interrupted mtp-preprocess, which a re-run completes
    folder = write_token_dataset(tmp_path / "ours", DOCS, vocab_size=300)
    (folder / "dataset.json").unlink()
    with pytest.raises(FileNotFoundError, match="needs dataset.json .*an interrupted run must be re-run"):
        build(folder)


def test_chunked_scan_matches_numpy_over_the_whole_shard(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 60_000, rng.integers(1, 50)).tolist() for _ in range(40)]
    ds = verify.open_dataset(megatron_prefix(tmp_path / "m", docs))
    flat = np.concatenate(docs)
    for chunk in (1, 7, 64, 10**6):
        monkeypatch.setattr(verify, "SCAN_CHUNK", chunk)
        assert verify.scan_token_range(ds.shards[0]) == (int(flat.min()), int(flat.max()))


def test_no_scan_when_the_dtype_cannot_hold_an_id_beyond_the_vocabulary(tmp_path, monkeypatch):
    monkeypatch.setattr(verify, "scan_token_range", lambda ds: pytest.fail("scanned"))
    ds = verify.open_dataset(megatron_prefix(tmp_path / "m", [[65535, 1]]))
    verify.check_token_ids(ds, 65536)


def test_a_path_with_the_extension_says_to_pass_the_prefix(tmp_path, capsys):
    prefix = megatron_prefix(tmp_path / "text_document", DOCS)
    for ext in (".idx", ".bin"):
        assert mtp_data(["inspect", f"{prefix}{ext}"]) == 1
        err = capsys.readouterr().err.strip()
        assert err == (f"mtp-data: dataset {prefix}{ext}: name a .idx/.bin pair by its prefix, without the "
                       f"extension: {prefix}"), err
        with pytest.raises(FileNotFoundError, match="by its prefix, without the extension"):
            build(f"{prefix}{ext}")  # training resolves data.datasets the same way
