"""The tokenizer's training sample is bounded and spread over every input: windows evenly spaced over the corpus
bytes (a large JSONL file entered midway at a record boundary, a gzip file read from its start), whole records
only, the same sample every time, and dataset.json states it."""

import gzip
import json

from mtplm.data import tokenizer_sample
from mtplm.data.preprocess import PreprocessConfig, run_preprocess
from mtplm.data.tokenizer import load_tokenizer
from mtplm.data.tokenizer_sample import sample_texts


def jsonl(path, texts, opener=open):
    with opener(path, "wt") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    return path


def doc(i):
    return f"def f{i}(x):\n    return x + {i}  # record {i:06d}\n"


def test_one_large_file_is_sampled_across_its_length_not_from_its_head(tmp_path):
    texts = [doc(i) for i in range(20_000)]
    path = jsonl(tmp_path / "big.jsonl", texts)
    size = path.stat().st_size
    budget = size // 20
    sample, description = sample_texts([path], ["jsonl"], "text", budget, windows=8)
    got = list(sample)
    assert set(got) <= set(texts)  # whole records only: the partial line at each window's start is skipped
    taken = sum(len(t.encode()) for t in got)
    assert budget - 8 * len(texts[0]) <= taken <= budget + 8 * len(texts[0])  # the budget, not the file
    ids = sorted(int(t.rsplit("record ", 1)[1]) for t in got)
    assert ids[0] < 20_000 // 8 and ids[-1] >= 20_000 * 7 // 8  # from the first and the last eighth
    assert [w["offset"] for w in description["windows"]] == [(2 * i + 1) * size // 16 for i in range(8)]
    assert sum(w["text_bytes"] for w in description["windows"]) == taken
    again, description_again = sample_texts([path], ["jsonl"], "text", budget, windows=8)
    assert list(again) == got and description_again == description  # a pure function of the bytes


def test_every_input_contributes_and_gzip_is_read_from_its_start(tmp_path):
    files = [jsonl(tmp_path / f"part{k}.jsonl", [doc(1000 * k + i) for i in range(500)]) for k in range(3)]
    files.append(jsonl(tmp_path / "part3.jsonl.gz", [doc(3000 + i) for i in range(2000)], gzip.open))
    total = sum(f.stat().st_size for f in files)
    sample, description = sample_texts(files, ["jsonl"] * 4, "text", total // 10, windows=12)
    got = list(sample)
    per_file = {int(t.rsplit("record ", 1)[1]) // 1000 for t in got}
    assert per_file == {0, 1, 2, 3}
    gz = [w for w in description["windows"] if w["file"].endswith(".gz")]
    assert len(gz) == 1 and gz[0]["offset"] == 0  # its windows merged into one read from the start
    assert min(int(t.rsplit("record ", 1)[1]) for t in got if "record 003" in t) == 3000


def test_a_corpus_within_the_budget_is_read_whole(tmp_path):
    texts = [doc(i) for i in range(50)]
    path = jsonl(tmp_path / "small.jsonl", texts)
    sample, description = sample_texts([path], ["jsonl"], "text", 1 << 20)
    assert list(sample) == texts and description["method"] == "whole corpus" and description["documents"] == 50


def test_dataset_json_states_the_sample_and_the_tokenizer_is_reproducible(tmp_path, monkeypatch):
    monkeypatch.setattr(tokenizer_sample, "WINDOW_BYTES", 1 << 16)  # 16 windows in the 1 MiB budget
    inputs = [jsonl(tmp_path / f"in{k}.jsonl", [doc(20_000 * k + i) for i in range(20_000)]) for k in range(2)]

    def run(out):
        cfg = PreprocessConfig(inputs=[str(p) for p in inputs], output=str(out), tokenizer=None,
                               train_tokenizer=True, vocab_size=300, tokenizer_sample_mb=1, workers=1)
        run_preprocess(cfg, log=lambda *a: None)
        return json.loads((out / "dataset.json").read_text())

    first, second = run(tmp_path / "one"), run(tmp_path / "two")
    sample = first["tokenizer_sample"]
    assert sample["budget_bytes"] == 1 << 20 and sample["corpus_bytes"] > 1 << 20
    assert len(sample["windows"]) == 16 and {w["file"] for w in sample["windows"]} == {str(p) for p in inputs}
    assert 0 < sum(w["text_bytes"] for w in sample["windows"]) <= (1 << 20) + len(sample["windows"]) * 100
    assert second["tokenizer_sample"] == sample
    assert first["tokenizer_sha256"] == second["tokenizer_sha256"] == load_tokenizer(
        tmp_path / "one" / "tokenizer.model").sha256
