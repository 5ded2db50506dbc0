"""mtp-preprocess re-runs and faults: one job per output folder (a re-run continues it, does nothing when it is
complete, or is refused naming what differs), reproducible tokenizer bytes, damaged inputs and unusable
outputs in one line."""

import gzip
import json
import os
import random

import pytest

from mtplm.data.preprocess import PreprocessConfig, PreprocessError, main, run_preprocess
from mtplm.data.tokenizer import load_tokenizer, train_sentencepiece

TEXTS = [f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(60)]


def write_jsonl(path, texts, key="text", gz=False):
    data = "".join(json.dumps({key: t}) + "\n" for t in texts).encode()
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
    return path


def run(out, inputs, **kw):
    kw.setdefault("tokenizer", "bytes")
    kw.setdefault("workers", 1)
    logs = []
    summary = run_preprocess(PreprocessConfig(inputs=[str(i) for i in inputs], output=str(out), **kw), log=logs.append)
    return summary, logs


def snapshot(folder):
    """Every file's name, bytes and modification time."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def contents(folder):
    return {name: data for name, (data, _) in snapshot(folder).items()}


@pytest.fixture
def sp_model(tmp_path_factory):
    return train_sentencepiece(TEXTS * 5, tmp_path_factory.mktemp("sp") / "sp", 300)


# -- one job per folder ----------------------------------------------------------------------------------
TOKENS, LAYOUT = "refusing to mix tokenizations", "refusing to change its shard layout"


@pytest.mark.parametrize("change, named, reason", [
    ("sentencepiece", "tokenizer_sha256", TOKENS),
    (dict(append_eod=False), "append_eod: True in", TOKENS),
    (dict(text_key="content"), "text_key: 'text' in", TOKENS),
    (dict(format="text"), "format: 'auto' in", TOKENS),
    # shard size does not change the tokens, but a continued run must write the shards one run would have
    (dict(shard_bytes=7), "shard_bytes: 134217728 in", LAYOUT),
    (dict(shard_bytes=7, append_eod=False), "append_eod: True in", TOKENS),
])
def test_rerun_with_other_settings_is_refused_before_writing(tmp_path, sp_model, change, named, reason):
    inp = write_jsonl(tmp_path / "a.jsonl", TEXTS[:5])
    write_jsonl(tmp_path / "b.jsonl", TEXTS[5:9])
    out = tmp_path / "out"
    run(out, [inp])
    before = snapshot(out)
    kw = dict(tokenizer=str(sp_model)) if change == "sentencepiece" else change
    with pytest.raises(PreprocessError, match=reason) as e:
        run(out, [inp, tmp_path / "b.jsonl"], **kw)
    assert named in str(e.value) and "in this run" in str(e.value)
    assert (TOKENS in str(e.value)) == (reason == TOKENS)  # a layout change alone is not called a tokenization
    if "shard_bytes" in change:  # named, whatever else differs
        assert "shard_bytes: 134217728 in" in str(e.value) and "layout" in str(e.value)
    if change == "sentencepiece":  # both tokenizers named
        assert "'bytes' in" not in str(e.value)
        assert load_tokenizer("bytes").sha256 in str(e.value) and load_tokenizer(sp_model).sha256 in str(e.value)
    assert snapshot(out) == before  # nothing written, nothing removed


@pytest.mark.parametrize("change, named", [
    (dict(vocab_size=320), "vocab_size: 300 in"),
    (dict(tokenizer_type="unigram"), "tokenizer_type: 'bpe' in"),
    (dict(train_tokenizer=False, tokenizer="bytes"), r"tokenizer_sha256: \w+ \('trained'\) in .*\('bytes'\) in this run"),
])
def test_rerun_of_a_trained_job_with_other_tokenizer_settings_is_refused(tmp_path, change, named):
    inp = write_jsonl(tmp_path / "a.jsonl", TEXTS * 3)
    out = tmp_path / "out"
    run(out, [inp], tokenizer=None, train_tokenizer=True, vocab_size=300)
    before = snapshot(out)
    with pytest.raises(PreprocessError, match=named):
        run(out, [inp], **{**dict(tokenizer=None, train_tokenizer=True, vocab_size=300), **change})
    assert snapshot(out) == before


def test_same_job_continues_and_a_complete_job_is_a_no_op(tmp_path, sp_model):
    a, b = write_jsonl(tmp_path / "a.jsonl", TEXTS[:20]), write_jsonl(tmp_path / "b.jsonl", TEXTS[20:])
    out = tmp_path / "out"
    run(out, [a], tokenizer=str(sp_model), shard_bytes=1)  # a shard per input
    # The same tokenizer by another path (same sha256) and one input more: the job continues.
    copy = tmp_path / "copy.model"
    copy.write_bytes(sp_model.read_bytes())
    summary, logs = run(out, [a, b], tokenizer=str(copy), shard_bytes=1)
    assert summary["documents"] == len(TEXTS) and len(summary["shards"]) == 2 and "resuming: 1 of 2" in logs[0]
    before = snapshot(out)
    summary2, logs = run(out, [a, b], tokenizer=str(copy), workers=2, shard_bytes=1)
    assert snapshot(out) == before and "nothing to do" in logs[-1]
    assert {k: v for k, v in summary2.items() if k != "run"} == {k: v for k, v in summary.items() if k != "run"}


def test_folder_without_job_file_is_checked_against_its_shard_manifests(tmp_path, sp_model):
    inp = write_jsonl(tmp_path / "a.jsonl", TEXTS[:5])
    out = tmp_path / "out"
    run(out, [inp])
    (out / "job.json").unlink()  # as written before job.json existed
    with pytest.raises(PreprocessError, match="tokenizer_sha256: "):
        run(out, [inp, write_jsonl(tmp_path / "b.jsonl", TEXTS[5:9])], tokenizer=str(sp_model))
    with pytest.raises(PreprocessError, match="append_eod: True in"):
        run(out, [inp, tmp_path / "b.jsonl"], append_eod=False)
    summary, _ = run(out, [inp, tmp_path / "b.jsonl"])
    assert summary["documents"] == 9 and (out / "job.json").is_file()


def test_trained_tokenizer_is_byte_identical_across_runs(tmp_path):
    inp = write_jsonl(tmp_path / "a.jsonl", TEXTS * 3)
    s1, _ = run(tmp_path / "one", [inp], tokenizer=None, train_tokenizer=True, vocab_size=300)
    s2, _ = run(tmp_path / "deeper" / "two", [inp], tokenizer=None, train_tokenizer=True, vocab_size=300)
    assert (tmp_path / "one" / "tokenizer.model").read_bytes() == (tmp_path / "deeper" / "two" / "tokenizer.model").read_bytes()
    assert s1["tokenizer_sha256"] == s2["tokenizer_sha256"]
    d1, d2 = (json.loads((tmp_path / d / "dataset.json").read_text()) for d in ("one", "deeper/two"))
    assert d1["tokenizer_sha256"] == d2["tokenizer_sha256"] == load_tokenizer(tmp_path / "one" / "tokenizer.model").sha256


# -- damaged inputs and unusable outputs -----------------------------------------------------------------
def damaged(path, kind):
    rng = random.Random(0)  # text that compresses poorly, so a cut half-way leaves many whole records
    texts = [t + "".join(rng.choice("abcdefgh ") for _ in range(300)) for t in TEXTS * 3]
    data = "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
    if kind == "not gzip":
        path.write_bytes(data)
    else:  # cut short: the first records decompress, then the stream ends
        packed = gzip.compress(data, mtime=0)
        path.write_bytes(packed[: len(packed) // 2])
    return path


REASONS = {"not gzip": "not a gzip file", "truncated": "truncated: the compressed data ends after line"}


@pytest.mark.parametrize("kind, position, workers", [("not gzip", 0, 1), ("not gzip", 1, 1), ("truncated", 0, 1),
                                                     ("truncated", 1, 1), ("truncated", 1, 2)])
def test_damaged_compressed_input_is_skipped_whole(tmp_path, capsys, kind, position, workers):
    good = [write_jsonl(tmp_path / "1.jsonl", TEXTS[:7]), write_jsonl(tmp_path / "3.jsonl", TEXTS[7:12])]
    bad = damaged(tmp_path / f"{2 * position}.jsonl.gz", kind)  # inputs are taken in sorted order
    inputs = good[:position] + [bad] + good[position:]
    summary, _ = run(tmp_path / "out", inputs, workers=workers)  # all three inputs in one shard
    err = capsys.readouterr().err
    assert f"skipped {bad}: {REASONS[kind]}" in err and "Traceback" not in err
    assert summary["run"]["errors"] == 1 and summary["documents"] == 12 and len(summary["shards"]) == 1
    assert list(summary["skipped_inputs"]) == [str(bad)] and REASONS[kind] in summary["skipped_inputs"][str(bad)]
    # Exactly what the good inputs alone give: no document of the damaged one is kept, even those read and
    # written before the damage was found.
    run(tmp_path / "ref", [g for g in inputs if g != bad])
    bins = lambda d: sorted(p.read_bytes() for p in d.glob("shard_*.bin"))
    assert bins(tmp_path / "out") == bins(tmp_path / "ref")
    # Its shard is redone by a re-run: once the input is replaced, it is added.
    write_jsonl(bad, TEXTS[12:15], gz=True)
    summary, _ = run(tmp_path / "out", inputs)
    assert summary["documents"] == 15 and len(summary["shards"]) == 1 and not summary["skipped_inputs"]
    assert bins(tmp_path / "out") == bins(run(tmp_path / "fresh", inputs)[0] and tmp_path / "fresh")


@pytest.mark.parametrize("kind", ["not gzip", "truncated"])
def test_damaged_compressed_input_with_on_error_fail_is_one_line(tmp_path, capsys, kind):
    bad = damaged(tmp_path / "b.jsonl.gz", kind)
    rc = main([str(bad), "--output", str(tmp_path / "out"), "--tokenizer", "bytes", "--workers", "1",
               "--on-error", "fail"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1 and f"mtp-preprocess: {bad}: {REASONS[kind]}" in err
    assert not list((tmp_path / "out").glob("shard_*"))


def unusable_output(tmp_path, kind):
    if kind == "existing file":
        (tmp_path / "taken").write_text("x")
        return tmp_path / "taken", "is an existing file"
    if kind == "under a file":  # as root nothing is unwritable by permission; a path through a file is
        (tmp_path / "plain").write_text("x")
        return tmp_path / "plain" / "out", "Not a directory"
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    return ro, "Permission denied"


@pytest.mark.parametrize("kind", ["existing file", "under a file",
                                  pytest.param("read-only folder", marks=pytest.mark.skipif(
                                      os.geteuid() == 0, reason="root writes to any folder"))])
def test_unusable_output_is_one_line(tmp_path, capsys, kind):
    inp = write_jsonl(tmp_path / "a.jsonl", TEXTS[:3])
    out, reason = unusable_output(tmp_path, kind)
    rc = main([str(inp), "--output", str(out), "--tokenizer", "bytes", "--workers", "1"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1, err
    assert err.startswith(f"mtp-preprocess: output {out}: ") and reason in err


def test_folder_of_an_earlier_layout_is_refused_in_one_line(tmp_path, capsys):
    inp = write_jsonl(tmp_path / "a.jsonl", TEXTS[:3])
    out = tmp_path / "out"
    run(out, [inp])
    job = json.loads((out / "job.json").read_text())
    job["max_shard_tokens"] = job.pop("shard_bytes")  # as written before the unit plan
    (out / "job.json").write_text(json.dumps(job))
    before = snapshot(out)
    assert main([str(inp), "--output", str(out), "--tokenizer", "bytes", "--workers", "1"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "written by an earlier mtp-preprocess" in err
    assert snapshot(out) == before
