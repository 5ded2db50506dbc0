"""mtp-generate end to end, and the Hugging Face export's heads speculating exactly like our checkpoint."""

import json
import re

import pytest
import torch

from conftest import tiny_model_config
from mtplm.data.tokenizer import ByteTokenizer
from mtplm.inference.generate import main
from mtplm.inference.speculative import MTPGenerator
from mtplm.model.transformer import MTPTransformer
from mtplm.model.weights import save_model


def test_cli_speculative_and_plain_print_the_same_text(tmp_path, capsys):
    torch.manual_seed(0)
    model = MTPTransformer(tiny_model_config(vocab_size=256))  # byte-level: no tokenizer file needed
    save_model(model, tmp_path / "m")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def f(x):\n\nclass A:\n")
    args = [str(tmp_path / "m"), "--prompt", "import os", "--prompts_file", str(prompts), "--max_new_tokens", "12",
            "--batch_size", "2"]
    assert main(args) == 0
    spec = capsys.readouterr().out
    assert main(args + ["--no-speculative"]) == 0
    plain = capsys.readouterr().out
    assert spec.split("[")[0] == plain.split("[")[0]  # the completions
    assert "speculative, 3 draft heads" in spec and "tokens per forward" in spec and "plain decoding" in plain


def test_cli_acceptance_of_draft_positions_never_reached_is_a_dash(tmp_path, capsys):
    torch.manual_seed(0)
    save_model(MTPTransformer(tiny_model_config(vocab_size=256)), tmp_path / "m")  # random heads: draft 1 fails
    assert main([str(tmp_path / "m"), "--prompt", "import os", "--max_new_tokens", "6"]) == 0
    out = capsys.readouterr().out
    acc = re.search(r"acceptance per draft position \[(.*?)\]", out).group(1).split()
    assert len(acc) == 3 and acc[0] != "-" and "-" in acc, out  # positions 2, 3 judged only after 1 is accepted
    assert "nan" not in out and all(a == "-" or 0 <= float(a) <= 1 for a in acc), out


def test_cli_errors(tmp_path, capsys):
    assert main([str(tmp_path / "missing"), "--prompt", "x"]) == 1
    assert "missing" in capsys.readouterr().err


def test_hf_export_heads_speculate_like_our_checkpoint(tmp_path):
    import pytest

    pytest.importorskip("transformers")
    from mtplm.conversion.hf_export import export_hf
    from mtplm.conversion.hf_import import load_hf_export

    torch.manual_seed(0)
    model = MTPTransformer(tiny_model_config(vocab_size=200)).eval()
    save_model(model, tmp_path / "ours")
    export_hf(tmp_path / "ours", tmp_path / "hf", dtype="fp32")
    prompts = [[1, 2, 3, 4], [5, 6], [7, 8, 9]]
    ours, s1 = MTPGenerator(model).generate(prompts, 20, draft_heads=3)
    theirs, s2 = MTPGenerator(load_hf_export(tmp_path / "hf")).generate(prompts, 20, draft_heads=3)
    assert ours == theirs and s1.accepted == s2.accepted


@pytest.fixture
def byte_model(tmp_path):
    """A byte-level model (no tokenizer file needed) with a 64-token context, saved for the CLI."""
    torch.manual_seed(0)
    model = MTPTransformer(tiny_model_config(vocab_size=256, max_seq_len=64)).eval()
    save_model(model, tmp_path / "m")
    return model, str(tmp_path / "m")


def completion(model, text, max_new_tokens, tokens=None):
    """What mtp-generate prints for one prompt (greedy), from the library: the prompt as the model reads it."""
    tok = ByteTokenizer()
    (out,), stats = MTPGenerator(model).generate([tokens or tok.encode(text)], max_new_tokens, stop_tokens=[0])
    limit = f"[stopped at the context limit, max_seq_len {model.cfg.max_seq_len}]\n" * (stats.context_limited == 1)
    return f"=== {text!r}\n{text}{tok.decode(out)}\n{limit}"


def test_prompts_files_jsonl_and_plain_text(tmp_path, capsys, byte_model):
    """A .jsonl prompts file carries any text (a literal backslash-n and a newline are different prompts); any
    other file is one prompt per line, taken as it is."""
    model, path = byte_model
    texts = ["print('a\\nb')", "def f():\n    return", "x = 1  # \u00e9"]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("".join(json.dumps({"prompt": t, "id": i}) + "\n" for i, t in enumerate(texts)) + "\n")
    assert main([path, "--prompts-file", str(jsonl), "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert out.split("[speculative")[0] == "".join(completion(model, t, 6) + "\n" for t in texts)
    plain = tmp_path / "p.txt"
    plain.write_text("print('a\\nb')\n\n  x = 1\n")
    assert main([path, "--prompts-file", str(plain), "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert out.split("[speculative")[0] == "".join(completion(model, t, 6) + "\n" for t in ["print('a\\nb')", "  x = 1"])


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "a"', "p.jsonl:2: not a JSON object (Expecting ',' delimiter"),
    ('{"text": "a"}', 'p.jsonl:2: field "prompt" is missing (keys: text)'),
    ('{"prompt": 3}', 'p.jsonl:2: field "prompt": expected a string, got int'),
    ('["a"]', 'p.jsonl:2: expected a JSON object, got a JSON list'),
])
def test_bad_jsonl_prompt_line_names_file_line_and_field(tmp_path, capsys, byte_model, line, message):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "ok"}\n' + line + "\n")
    assert main([byte_model[1], "--prompts-file", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"mtp-generate: {tmp_path}/{message}") and err.count("\n") == 1


def test_cli_prompt_overflow(tmp_path, capsys, byte_model):
    """Refused by default, naming the prompt and both lengths; cut from the left with one warning per prompt
    under --prompt-overflow truncate-left, giving what the cut prompt gives, stopped at the context limit."""
    model, path = byte_model
    long = "".join(f"line {i}\n" for i in range(20))  # 150 bytes, context 64
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "short"}) + "\n" + json.dumps({"prompt": long}) + "\n")
    assert main([path, "--prompt", "ok", "--prompts-file", str(prompts)]) == 1
    err = capsys.readouterr().err
    assert err == (f"mtp-generate: {prompts}:2 has 150 tokens, more than the 63 a prompt may have: the model's context "
                   "(max_seq_len) is 64 tokens and one must be left to generate; shorten it, or keep its last 63 "
                   "tokens with prompt_overflow 'truncate-left' (mtp-generate --prompt-overflow truncate-left)\n")
    args = [path, "--prompt", long, "--prompts-file", str(prompts), "--max-new-tokens", "8"]
    assert main(args + ["--prompt-overflow", "truncate-left"]) == 0
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        f"mtp-generate: warning: {name} has 150 tokens, more than the 63 a prompt may have: the model's context "
        "(max_seq_len) is 64 tokens and one must be left to generate; kept its last 63 tokens"
        for name in ("--prompt #1", f"{prompts}:2")]
    cut = ByteTokenizer().encode(long)[-63:]
    want = "".join(completion(model, text, 8, tokens) + "\n" for text, tokens in ((long, cut), ("short", None),
                                                                                 (long, cut)))
    assert captured.out.split("[speculative")[0] == want
    assert want.count("[stopped at the context limit, max_seq_len 64]") == 2
    assert "2 stopped at the context limit" in captured.out.splitlines()[-1]
    with pytest.raises(SystemExit, match="2"):
        main(args + ["--prompt-overflow", "cut"])
    assert "prompt_overflow: expected error or truncate-left, got 'cut'" in capsys.readouterr().err


@pytest.mark.parametrize("name, content, message", [
    ("p.jsonl", "\n  \n", "holds no records"),
    ("p.txt", "", "holds no records"),
    ("missing.jsonl", None, "{tmp}/missing.jsonl: cannot read the prompts file (No such file or directory)"),
])
def test_empty_or_missing_prompts_file_names_the_file(tmp_path, capsys, byte_model, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    assert main([byte_model[1], "--prompts-file", str(path)]) == 1
    err = capsys.readouterr().err
    assert message.format(tmp=tmp_path) in err and str(path) in err and err.count("\n") == 1


def test_cli_compile_prints_what_eager_decoding_prints(tmp_path, capsys, byte_model, monkeypatch):
    """--compile takes the static-shape step (inference/static_decode.py), here run uncompiled so the test costs
    no compilation (tests/test_compiled_decode.py compiles it): the same text, with prompts that reach the
    context limit and a last batch narrower than the others."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    _, path = byte_model
    args = [path, "--prompt", "import os", "--prompt", "x" * 55, "--prompt", "def f(", "--max_new_tokens", "20",
            "--batch_size", "2"]
    for speculative in ([], ["--no-speculative"]):
        assert main(args + speculative) == 0
        eager = capsys.readouterr().out
        assert main(args + speculative + ["--compile"]) == 0
        compiled = capsys.readouterr().out
        assert compiled.split("\n[")[0] == eager.split("\n[")[0] and "stopped at the context limit" in eager
        assert ", compiled]" in compiled and ", compiled]" not in eager
