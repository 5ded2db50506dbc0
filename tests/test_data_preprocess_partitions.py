"""mtp-preprocess spread over workers and nodes: byte ranges of one file, partitions written by separate processes
into one folder, finalize, re-runs of one partition. Every way must give the documents and token ids of one
single-worker run over the same inputs."""

import gzip
import json
import random
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mtplm.data.gpt_dataset import ShardedDocuments
from mtplm.data.inspect import main as mtp_data
from mtplm.data.manifest import resolve_shards
from mtplm.data.preprocess import PreprocessConfig, PreprocessError, run_preprocess
from mtplm.data.preprocess_plan import MIN_RANGE_BYTES
from mtplm.data.readers import Document, read_documents
from mtplm.data.tokenizer import load_tokenizer


def texts(n, seed):
    rng = random.Random(seed)
    return [f"doc {seed}.{i} " + "".join(rng.choice("abcdefgh \n✓") for _ in range(rng.randrange(0, 400)))
            for i in range(n)]


def make_corpus(folder):
    """A JSONL file split into byte ranges, a Parquet file split by row groups, a gzip file and small files packed
    together; one bad record in the big file, on a line that is not the first of its range."""
    folder.mkdir()
    big = texts(1500, 1)
    lines = [json.dumps({"text": t}) for t in big]
    lines[1000] = "{broken"
    (folder / "big.jsonl").write_text("\n".join(lines) + "\n")
    pq.write_table(pa.table({"text": texts(600, 2)}), folder / "rows.parquet", row_group_size=50)
    (folder / "c.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps({"text": t}) + "\n"
                                                              for t in texts(30, 3)).encode(), mtime=0))
    for i, t in enumerate(texts(5, 4)):
        (folder / f"small{i}.txt").write_text(t or "x")
    return folder


def documents(folder):
    """Every document's token ids, in dataset order, through the training reader."""
    prefixes, manifest = resolve_shards(folder)
    docs = ShardedDocuments(prefixes)
    return manifest, [docs.read(d, 0, int(docs.lengths[d])).tolist() for d in range(len(docs))]


def cfg(corpus, out, **kw):
    return PreprocessConfig(inputs=[str(corpus)], output=str(out), tokenizer="bytes",
                            **{"workers": 1, "shard_bytes": MIN_RANGE_BYTES, **kw})


def test_ranges_cut_anywhere_read_every_record_once(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["a", "bb", "", "ccc\n", "d" * 7]) + "\n{bad\n")
    key = lambda d: d.text if isinstance(d, Document) else d.reason
    whole = [key(d) for d in read_documents(path, "jsonl", "text")]
    size = path.stat().st_size
    for cut in range(size + 1):  # every cut point, including those inside a record and on a newline
        parts = [*read_documents(path, "jsonl", "text", 0, cut), *read_documents(path, "jsonl", "text", cut, size)]
        assert [key(d) for d in parts] == whole, cut


def test_byte_ranges_over_workers_and_partitions_give_one_run_s_dataset(tmp_path, capsys):
    corpus = make_corpus(tmp_path / "in")
    ref = run_preprocess(cfg(corpus, tmp_path / "ref"), log=lambda m: None)
    assert len(ref["shards"]) >= 6  # the big file and the Parquet file really are split
    ref_manifest, ref_docs = documents(tmp_path / "ref")
    err = capsys.readouterr().err
    assert f"{corpus / 'big.jsonl'}: record at byte " in err and "not valid JSON" in err
    # The naive reference: inputs in sorted path order, records in file order, one document each.
    tok = load_tokenizer("bytes")
    big = [t for i, t in enumerate(texts(1500, 1)) if i != 1000]
    naive = [tok.encode(t) + [tok.eod_id] for t in big + texts(30, 3) + texts(600, 2) + [t or "x" for t in texts(5, 4)]]
    assert ref_docs == naive

    # one process, 2 workers: the same bytes
    run_preprocess(cfg(corpus, tmp_path / "w2", workers=2), log=lambda m: None)
    for name in ["dataset.json"] + [f"{s}{ext}" for s in ref["shards"] for ext in (".idx", ".bin", ".json")]:
        assert (tmp_path / "w2" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name

    # two partitions as two processes (two nodes) into one folder, at the same time
    out = tmp_path / "nodes"
    cmd = [sys.executable, "-m", "mtplm.data.preprocess", str(corpus), "--output", str(out), "--tokenizer", "bytes",
           "--workers", "1", "--shard-bytes", str(MIN_RANGE_BYTES), "--num-partitions", "2"]
    procs = [subprocess.Popen(cmd + ["--partition-index", str(i)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in (0, 1)]
    logs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    assert sum("is complete:" in o for o, _ in logs) >= 1  # the last to finish wrote dataset.json
    manifest, docs = documents(out)
    assert docs == ref_docs and manifest == ref_manifest
    (out / "dataset.json").unlink()
    assert mtp_data(["finalize", str(out)]) == 0
    assert documents(out) == (ref_manifest, ref_docs)


def test_partition_rerun_redoes_only_its_unfinished_units_and_finalize_names_missing_partitions(tmp_path, monkeypatch,
                                                                                                  capsys):
    corpus = make_corpus(tmp_path / "in")
    out = tmp_path / "out"
    run_preprocess(cfg(corpus, out, num_partitions=3, partition_index=0), log=lambda m: None)
    assert mtp_data(["finalize", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "partition 1 of 3 has not run; partition 2 of 3 has not run" in err
    assert not (out / "dataset.json").exists()

    import mtplm.data.preprocess_pool as pool

    real, calls = pool.read_documents, []

    def crash_in_parquet(path, fmt, key, start, end):
        calls.append((path.name, start))
        if path.name == "rows.parquet":
            raise KeyboardInterrupt  # the node is stopped in its Parquet range, after three JSONL ranges
        return real(path, fmt, key, start, end)

    monkeypatch.setattr(pool, "read_documents", crash_in_parquet)
    with pytest.raises(KeyboardInterrupt):
        run_preprocess(cfg(corpus, out, num_partitions=3, partition_index=1), log=lambda m: None)
    assert [c[0] for c in calls] == ["big.jsonl"] * 3 + ["rows.parquet"]
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard_*")}
    assert mtp_data(["finalize", str(out)]) == 1
    assert "partition 1 of 3 has not completed (" in capsys.readouterr().err

    monkeypatch.setattr(pool, "read_documents", lambda path, *a: calls.append((path.name, a[2])) or real(path, *a))
    calls.clear()
    logs = []
    run_preprocess(cfg(corpus, out, num_partitions=3, partition_index=1), log=logs.append)
    assert calls == [("rows.parquet", 7)]  # only what was not finished
    assert "partition 1 of 3: resuming:" in logs[0]
    assert all(p.stat().st_mtime_ns == before[p.name] for p in out.glob("shard_*") if p.name in before)

    # a partition with other settings or another partition count is refused in one line, before writing
    for change, named in ((dict(append_eod=False), "append_eod: True in"),
                          (dict(num_partitions=4), "holds partition 0 of a 3-partition run")):
        with pytest.raises(PreprocessError, match=named):
            run_preprocess(cfg(corpus, out, **{"num_partitions": 3, "partition_index": 2, **change}),
                           log=lambda m: None)
    (corpus / "extra.txt").write_text("one more input")
    with pytest.raises(PreprocessError, match="partition 0 of 3 planned other work"):
        run_preprocess(cfg(corpus, out, num_partitions=3, partition_index=2), log=lambda m: None)
    (corpus / "extra.txt").unlink()

    summary = run_preprocess(cfg(corpus, out, num_partitions=3, partition_index=2), log=lambda m: None)
    assert "pending" not in summary and (out / "dataset.json").is_file()
    run_preprocess(cfg(corpus, tmp_path / "ref"), log=lambda m: None)
    assert documents(out) == documents(tmp_path / "ref")


def test_damaged_parquet_split_over_shards_is_left_out_whole(tmp_path, capsys):
    corpus = tmp_path / "in"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts(20, 5)))
    bad = corpus / "rows.parquet"
    pq.write_table(pa.table({"text": texts(600, 2)}), bad, row_group_size=50, compression="zstd")
    chunk = pq.ParquetFile(bad).metadata.row_group(3).column(0)  # in the first of its two ranges
    data = bytearray(bad.read_bytes())
    middle = chunk.data_page_offset + chunk.total_compressed_size // 2
    data[middle:middle + 64] = b"\xff" * 64
    bad.write_bytes(bytes(data))
    summary = run_preprocess(cfg(corpus, tmp_path / "out", workers=2), log=lambda m: None)
    assert f"skipped {bad}: damaged after row " in capsys.readouterr().err
    assert list(summary["skipped_inputs"]) == [str(bad)]
    tok = load_tokenizer("bytes")
    assert documents(tmp_path / "out")[1] == [tok.encode(t) + [tok.eod_id] for t in texts(20, 5)]
    # replaced, it is added by a re-run: the dataset is then what one run over the good inputs gives
    pq.write_table(pa.table({"text": texts(600, 2)}), bad, row_group_size=50, compression="zstd")
    summary = run_preprocess(cfg(corpus, tmp_path / "out", workers=2), log=lambda m: None)
    assert not summary["skipped_inputs"]
    run_preprocess(cfg(corpus, tmp_path / "ref"), log=lambda m: None)
    assert documents(tmp_path / "out") == documents(tmp_path / "ref")


def test_partitions_that_each_train_the_tokenizer_train_the_same_one(tmp_path):
    corpus = tmp_path / "in"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts(300, 6)))
    train = dict(tokenizer=None, train_tokenizer=True, vocab_size=300, shard_bytes=1)
    for i in (1, 0):
        # partition 0 starts as if partition 1 had not written tokenizer.model yet: it trains one too, which job.json
        # would refuse if its sha256 differed
        (tmp_path / "out" / "tokenizer.model").unlink(missing_ok=True)
        run_preprocess(PreprocessConfig(inputs=[str(corpus)], output=str(tmp_path / "out"), workers=1,
                                        num_partitions=2, partition_index=i, **train), log=lambda m: None)
    run_preprocess(PreprocessConfig(inputs=[str(corpus)], output=str(tmp_path / "ref"), workers=1, **train),
                   log=lambda m: None)
    (m, docs), (ref_m, ref_docs) = documents(tmp_path / "out"), documents(tmp_path / "ref")
    assert docs == ref_docs and m["tokenizer_sha256"] == ref_m["tokenizer_sha256"] and len(docs) == 300


def test_num_partitions_needs_a_partition_index(tmp_path):
    """A forgotten --partition-index would silently redo partition 0 on every node."""
    from mtplm.config import ConfigError
    from mtplm.data.preprocess import PreprocessConfig

    with pytest.raises(ConfigError, match=r"^partition_index: --num-partitions 2 needs --partition-index \(0\.\.1"):
        PreprocessConfig(inputs=["a.jsonl"], output=str(tmp_path / "out"), tokenizer="bytes", num_partitions=2)
    assert PreprocessConfig(inputs=["a.jsonl"], output=str(tmp_path / "out"), tokenizer="bytes").partition_index == 0
