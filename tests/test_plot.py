"""mtp-plot: PNG figures from metrics.jsonl, and one clear line for what it cannot plot."""

import json
import re
import sys

import pytest

pytest.importorskip("matplotlib")  # the test extra installs it; mtp-plot itself says which extra to install

from mtplm.pretrain.plot import main  # noqa: E402


def write_run(folder, n=4, steps=30, scale=1.0, acceptance=True, seq_len=64):
    folder.mkdir(parents=True)
    lines = []
    for s in range(1, steps + 1):
        heads = [scale * (5 + k) / (1 + 0.1 * s) for k in range(n)]
        lines.append({"kind": "train", "step": s, "loss": sum(heads), "head_losses": heads,
                      "lr": scale * 1e-3 * min(1, s / 5),
                      "grad_norm": 1.0, "tokens_per_s": 1000 + 10 * s * scale, "consumed_samples": 8 * s,
                      "consumed_tokens": 8 * s * seq_len})
        if s % 10 == 0:
            rec = {"kind": "valid", "step": s, "loss": sum(heads), "head_losses": [h * 1.1 for h in heads]}
            if acceptance and n > 1:
                rec["acceptance"] = [min(1.0, 0.02 * s / (j + scale)) for j in range(n - 1)]
                rec["tokens_per_forward"] = [1 + 0.01 * s * (j + scale) for j in range(n - 1)]
            lines.append(rec)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return folder


def png_pixels(path):
    from matplotlib.image import imread

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    return imread(path)


def test_figures_depend_on_the_data(tmp_path, capsys):
    a = write_run(tmp_path / "a" / "n4")
    b = write_run(tmp_path / "b" / "n4", scale=2.0)  # same name, steps and tokens: only the values differ
    assert main([str(a)]) == 0 and main([str(b)]) == 0
    printed = capsys.readouterr().out.split()
    names = {"loss.png", "lr.png", "throughput.png", "acceptance.png"}
    assert {p.rsplit("/", 1)[-1] for p in printed} == names
    for name in names:
        pa, pb = png_pixels(a / "plots" / name), png_pixels(b / "plots" / name)
        assert len({tuple(px) for px in pa.reshape(-1, pa.shape[-1]).tolist()}) > 10  # not a blank canvas
        assert pa.shape != pb.shape or (pa != pb).any(), name  # other data, other image
    # Runs overlaid into one folder; an n=1 run (no acceptance) beside an n=4 one.
    c = write_run(tmp_path / "n1", n=1, acceptance=False)
    assert main([str(c), str(a), "--output", str(tmp_path / "both")]) == 0
    both = png_pixels(tmp_path / "both" / "loss.png")
    alone = png_pixels(a / "plots" / "loss.png")
    assert both.shape != alone.shape or (both != alone).any()
    assert (tmp_path / "both" / "acceptance.png").is_file()
    assert not list((tmp_path / "both").glob(".*"))  # no temporary files left
    # Without acceptance records there is no acceptance figure.
    assert main([str(c)]) == 0 and not (c / "plots" / "acceptance.png").exists()


def test_a_record_being_written_is_left_out(tmp_path):
    run = write_run(tmp_path / "live")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "st')  # a running job's line, not finished yet
    assert main([str(run)]) == 0


@pytest.mark.parametrize("content, expected", [
    (None, r"metrics\.jsonl: no such file"),
    ("", r"metrics\.jsonl: no training records"),
    ('{"kind": "train", "step": 1}\nnot json\n', r"metrics\.jsonl:1: the train record has no \"head_losses\""),
    ('{"kind": "train", "step": 1, "head_losses": [1.0], "lr": 0.1, "tokens_per_s": 5}\nnot json\n',
     r"metrics\.jsonl:2: not a JSON record"),
    ('{"kind": "train", "step": 1, "head_losses": ["x"], "lr": 0.1, "tokens_per_s": 5}\n',
     r"metrics\.jsonl:1: \"head_losses\" must be a number"),
    ('[1, 2]\n', r"metrics\.jsonl:1: expected an object with \"kind\""),
])
def test_bad_metrics_give_one_line(tmp_path, capsys, content, expected):
    run = tmp_path / "run"
    run.mkdir()
    if content is not None:
        (run / "metrics.jsonl").write_text(content)
    assert main([str(run)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mtp-plot: "), err
    assert re.search(expected, err), err
    assert not (run / "plots").exists()


def test_missing_matplotlib_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert main([str(write_run(tmp_path / "run"))]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and '"mtplm[plot]"' in err, err
