"""Console commands whose output is cut short by its reader (`| head`) end quietly, as Unix tools do."""

import subprocess
import sys

import pytest
import torch

from conftest import tiny_model_config
from mtplm.data.synthetic import write_token_dataset
from mtplm.model.transformer import MTPTransformer
from mtplm.model.weights import save_model


def read_one_line_then_close(argv):
    """(exit code, stderr) of a command whose reader takes one line and goes away, like `| head -1`."""
    proc = subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    return proc.wait(timeout=120), err


@pytest.mark.parametrize("command", ["mtp-data", "mtp-generate"])
def test_closed_stdout_ends_the_command_quietly(tmp_path, command):
    # more output than a pipe buffers (64 KiB), so the command is still writing when its reader leaves
    if command == "mtp-data":
        docs = [[ord("a") + i % 26 for i in range(1200)]] * 300
        write_token_dataset(tmp_path / "d", docs, vocab_size=256)
        argv = ["-m", "mtplm.data.inspect", "inspect", str(tmp_path / "d"), "--decode", "300", "--tokenizer", "bytes"]
    else:
        torch.manual_seed(0)
        save_model(MTPTransformer(tiny_model_config(vocab_size=256)), tmp_path / "m")
        (tmp_path / "p.txt").write_text("def f(x):\n" * 3000)
        argv = ["-m", "mtplm.inference.generate", str(tmp_path / "m"), "--prompts_file", str(tmp_path / "p.txt"),
                "--max_new_tokens", "2", "--batch_size", "1000"]
    code, err = read_one_line_then_close(argv)
    assert err == "" and code == 1, (code, err)  # CPython's advice: exit 1, nothing printed
