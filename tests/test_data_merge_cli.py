"""mtp-data merge: bad outputs and mixed tokenizers end in one line naming the path or the datasets, and a
failed or interrupted merge leaves nothing behind (no temporary .bin/.idx beside the output)."""

import numpy as np

from mtplm.data import inspect as data_inspect
from mtplm.data.inspect import main as mtp_data
from mtplm.data.synthetic import write_token_dataset


def datasets(tmp_path):
    docs = [np.arange(1, 6), np.arange(3, 9)]
    a = write_token_dataset(tmp_path / "a", docs, vocab_size=300, tokenizer_sha256="aa" * 32)
    b = write_token_dataset(tmp_path / "b", docs, vocab_size=300, tokenizer_sha256="bb" * 32)
    return a, b


def test_merge_of_different_tokenizers_names_the_datasets(tmp_path, capsys):
    a, b = datasets(tmp_path)
    assert mtp_data(["merge", str(tmp_path / "m"), str(a), str(b)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{a} has tokenizer_sha256 aaaa" in err and f"{b} has tokenizer_sha256 bbbb" in err


def test_merge_into_an_unwritable_path_is_one_line(tmp_path, capsys):
    a, _ = datasets(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert mtp_data(["merge", str(blocker / "m"), str(a)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(blocker) in err and "Traceback" not in err


def test_interrupted_merge_leaves_no_partial_output(tmp_path, capsys, monkeypatch):
    a, _ = datasets(tmp_path)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(data_inspect, "write_concatenated_index", interrupted)  # after the .bin.tmp is written
    assert mtp_data(["merge", str(tmp_path / "out" / "m"), str(a)]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert list((tmp_path / "out").iterdir()) == []
