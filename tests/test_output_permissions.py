"""Model folders written atomically (the consolidated final/ model, Hugging Face exports) get the permissions
the umask gives, like every other output, not the 0700/0600 of the temporary folder they are written in."""

import os
import stat

import pytest

from conftest import tiny_model_config
from mtplm.model.transformer import MTPTransformer
from mtplm.model.weights import save_model


@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def modes(folder):
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in [folder, *folder.iterdir()]}


def test_consolidated_and_hf_folders_follow_the_umask(tmp_path, umask):
    pytest.importorskip("transformers")
    from mtplm.conversion.hf_export import export_hf

    tokenizer = tmp_path / "tokenizer.bin"
    tokenizer.write_bytes(b"x")
    save_model(MTPTransformer(tiny_model_config(vocab_size=256)), tmp_path / "final", {"extra.bin": tokenizer})
    got = modes(tmp_path / "final")
    assert got == {"final": 0o777 & ~umask, "params.json": 0o666 & ~umask, "model.safetensors": 0o666 & ~umask,
                   "extra.bin": 0o666 & ~umask}
    export_hf(tmp_path / "final", tmp_path / "hf", dtype="fp32")
    got = modes(tmp_path / "hf")
    assert got.pop("hf") == 0o777 & ~umask and "model.safetensors" in got
    assert set(got.values()) == {0o666 & ~umask}
