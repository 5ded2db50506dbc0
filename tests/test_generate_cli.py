"""mtp-generate end to end, and the Hugging Face export's heads speculating exactly like our checkpoint."""

import torch

from conftest import tiny_model_config
from mtplm.inference.generate import main
from mtplm.inference.speculative import MTPGenerator
from mtplm.model.transformer import MTPTransformer
from mtplm.model.weights import save_model


def test_cli_speculative_and_plain_print_the_same_text(tmp_path, capsys):
    torch.manual_seed(0)
    model = MTPTransformer(tiny_model_config(vocab_size=256))  # byte-level: no tokenizer file needed
    save_model(model, tmp_path / "m")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def f(x):\\n    return\nclass A:\n")
    args = [str(tmp_path / "m"), "--prompt", "import os", "--prompts_file", str(prompts), "--max_new_tokens", "12",
            "--batch_size", "2"]
    assert main(args) == 0
    spec = capsys.readouterr().out
    assert main(args + ["--no-speculative"]) == 0
    plain = capsys.readouterr().out
    assert spec.split("[")[0] == plain.split("[")[0]  # the completions
    assert "speculative, 3 draft heads" in spec and "tokens per forward" in spec and "plain decoding" in plain


def test_cli_errors(tmp_path, capsys):
    assert main([str(tmp_path / "missing"), "--prompt", "x"]) == 1
    assert "missing" in capsys.readouterr().err


def test_hf_export_heads_speculate_like_our_checkpoint(tmp_path):
    import pytest

    pytest.importorskip("transformers")
    from mtplm.pretrain.hf_export import export_hf
    from mtplm.pretrain.hf_import import load_hf_export

    torch.manual_seed(0)
    model = MTPTransformer(tiny_model_config(vocab_size=200)).eval()
    save_model(model, tmp_path / "ours")
    export_hf(tmp_path / "ours", tmp_path / "hf", dtype="fp32")
    prompts = [[1, 2, 3, 4], [5, 6], [7, 8, 9]]
    ours, s1 = MTPGenerator(model).generate(prompts, 20, draft_heads=3)
    theirs, s2 = MTPGenerator(load_hf_export(tmp_path / "hf")).generate(prompts, 20, draft_heads=3)
    assert ours == theirs and s1.accepted == s2.accepted
