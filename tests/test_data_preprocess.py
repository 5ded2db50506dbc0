"""mtp-preprocess: round trips, every bad-input case, interrupted runs and resume."""

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mtplm.data.gpt_dataset import ShardedDocuments
from mtplm.data.manifest import resolve_shards
from mtplm.data.preprocess import PreprocessConfig, PreprocessError, main, run_preprocess
from mtplm.data.tokenizer import load_tokenizer

DOCS = ["def f(x):\n    return x + 1\n", "héllo wörld — ünïcode ✓", "class A:\n\tpass\n", "x = [1, 2, 3]  # list"]


def decoded_documents(folder, tokenizer):
    prefixes, _ = resolve_shards(folder)
    docs = ShardedDocuments(prefixes)
    tok = load_tokenizer(tokenizer)
    out = []
    for d in range(len(docs)):
        ids = docs.read(d, 0, int(docs.lengths[d])).tolist()
        assert ids[-1] == tok.eod_id
        out.append(tok.decode(ids[:-1]))
    return out


def write_jsonl(path, records, gz=False):
    data = "".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in records).encode()
    path.write_bytes(gzip.compress(data) if gz else data)


def run(tmp_path, inputs, **kw):
    kw.setdefault("tokenizer", "bytes")
    kw.setdefault("workers", 1)
    return run_preprocess(PreprocessConfig(inputs=[str(i) for i in inputs], output=str(tmp_path / "out"), **kw),
                          log=lambda m: None)


@pytest.mark.parametrize("gz", [False, True])
def test_jsonl_round_trip_bytes(tmp_path, gz):
    path = tmp_path / ("in.jsonl.gz" if gz else "in.jsonl")
    write_jsonl(path, [{"text": t} for t in DOCS], gz=gz)
    summary = run(tmp_path, [path])
    assert summary["documents"] == 4 and summary["dtype"] == "uint16"
    assert decoded_documents(tmp_path / "out", "bytes") == DOCS


def test_text_files_parquet_and_sentencepiece_round_trip(tmp_path):
    (tmp_path / "src").mkdir()
    for i, t in enumerate(DOCS[:2]):
        (tmp_path / "src" / f"f{i}.py").write_text(t)
    pq.write_table(pa.table({"content": DOCS[2:]}), tmp_path / "more.parquet", row_group_size=1)
    corpus = (DOCS * 50)
    write_jsonl(tmp_path / "train.jsonl", [{"content": t} for t in corpus])
    summary = run(tmp_path, [tmp_path / "src", tmp_path / "more.parquet", tmp_path / "train.jsonl"],
                  tokenizer=None, train_tokenizer=True, vocab_size=300, text_key="content", workers=2)
    tok = tmp_path / "out" / "tokenizer.model"
    assert summary["tokenizer_sha256"] == load_tokenizer(tok).sha256
    got = decoded_documents(tmp_path / "out", tok)
    # sorted inputs: more.parquet, src/f0.py, src/f1.py, train.jsonl
    assert got[:4] == DOCS[2:] + DOCS[:2] and got[4:] == corpus


def test_bad_records_are_reported_with_file_and_line_and_skipped(tmp_path, capsys):
    path = tmp_path / "in.jsonl"
    write_jsonl(path, [{"text": "good"}, "{not json\n", {"body": "no text key"}, {"text": 5}, {"text": "   "}])
    with open(path, "ab") as f:
        f.write(b'{"text": "bad \xff utf8"}\n')
    (tmp_path / "bad.txt").write_bytes(b"line one\nline \xfe two\n")
    summary = run(tmp_path, [path, tmp_path / "bad.txt"])
    err = capsys.readouterr().err
    assert f"{path}:2: not valid JSON" in err
    assert f"{path}:3: no 'text' field" in err
    assert f"{path}:4: field 'text' is int, expected a string" in err
    assert f"{path}:6: not valid UTF-8" in err
    assert f"{tmp_path / 'bad.txt'}:2: not valid UTF-8" in err
    assert summary["run"]["errors"] == 5 and summary["run"]["empty"] == 1 and summary["documents"] == 1


def test_on_error_fail_stops_and_leaves_no_finished_shard(tmp_path):
    path = tmp_path / "in.jsonl"
    write_jsonl(path, [{"text": "good"}, "{broken\n"])
    with pytest.raises(PreprocessError, match=r"in.jsonl:2: not valid JSON"):
        run(tmp_path, [path], on_error="fail")
    out = tmp_path / "out"
    assert not list(out.glob("*.idx")) and not (out / "dataset.json").exists()


def test_parquet_missing_column_is_named(tmp_path, capsys):
    pq.write_table(pa.table({"body": ["a"]}), tmp_path / "x.parquet")
    with pytest.raises(PreprocessError, match="no column 'text'; columns are \\['body'\\]"):
        run(tmp_path, [tmp_path / "x.parquet"], on_error="fail")


def test_interrupted_run_resumes_without_redoing_complete_inputs(tmp_path, monkeypatch):
    inputs = []
    for i in range(4):
        p = tmp_path / f"in{i}.jsonl"
        write_jsonl(p, [{"text": f"document {i}.{j}"} for j in range(3)])
        inputs.append(p)
    import mtplm.data.preprocess_pool as pool

    real = pool.read_documents
    calls = []

    def crash_on_third(path, *args):
        calls.append(path.name)
        if path.name == "in2.jsonl":
            raise KeyboardInterrupt  # the run is killed while reading input 3
        return real(path, *args)

    monkeypatch.setattr(pool, "read_documents", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, inputs, shard_bytes=1)  # a shard per input
    out = tmp_path / "out"
    assert len(list(out.glob("shard_*.idx"))) == 2 and len(list(out.glob("shard_*.json"))) == 2
    assert not (out / "dataset.json").exists() and not list(out.glob("*.tmp"))
    monkeypatch.setattr(pool, "read_documents", lambda p, *a: calls.append(p.name) or real(p, *a))
    calls.clear()
    summary = run(tmp_path, inputs, shard_bytes=1)
    assert calls == ["in2.jsonl", "in3.jsonl"]
    assert summary["documents"] == 12 and len(summary["shards"]) == 4
    assert decoded_documents(out, "bytes") == [f"document {i}.{j}" for i in range(4) for j in range(3)]


def test_cli_errors_name_the_option(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--output", str(tmp_path / "o")])
    assert "give exactly one of --tokenizer" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--output", str(tmp_path / "o"), "--tokenizer", "bytes", "--on-error", "ignore"])
    assert "on_error: expected skip or fail" in capsys.readouterr().err
    assert main([str(tmp_path / "nope"), "--output", str(tmp_path / "o"), "--tokenizer", "bytes"]) == 1
    assert "no such file or directory" in capsys.readouterr().err
