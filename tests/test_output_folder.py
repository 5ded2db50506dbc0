"""A model output path that already holds something else is refused, never deleted: only an empty folder or an
earlier output of the same kind (a re-run) is replaced."""

import pytest

from conftest import tiny_model_config
from mtplm.model.transformer import MTPTransformer
from mtplm.model.weights import save_model


def test_existing_folder_of_another_kind_is_refused_and_kept(tmp_path):
    model = MTPTransformer(tiny_model_config(vocab_size=256))
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step_00000004\n")
    with pytest.raises(ValueError, match=r"output .*run: an existing folder .*no params\.json"):
        save_model(model, run)
    assert (run / "checkpoints" / "latest").read_text() == "step_00000004\n"
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no temporary folder left beside it

    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep")
    with pytest.raises(ValueError, match=r"notes\.txt: is an existing file"):
        save_model(model, a_file)
    with pytest.raises(ValueError, match=r"cannot create its parent folder"):
        save_model(model, a_file / "model")
    assert a_file.read_text() == "keep"


def test_empty_folder_and_earlier_output_are_replaced(tmp_path):
    model = MTPTransformer(tiny_model_config(vocab_size=256))
    (tmp_path / "empty").mkdir()
    save_model(model, tmp_path / "empty")
    save_model(model, tmp_path / "empty")  # a re-run replaces its own earlier output
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == ["model.safetensors", "params.json"]


def test_hf_export_refuses_a_folder_that_is_not_an_export(tmp_path):
    pytest.importorskip("transformers")
    from mtplm.conversion.hf_export import export_hf

    save_model(MTPTransformer(tiny_model_config(vocab_size=256)), tmp_path / "final")
    with pytest.raises(ValueError, match=r"no config\.json"):
        export_hf(tmp_path / "final", tmp_path / "final", dtype="fp32")  # would delete the model it reads
    assert (tmp_path / "final" / "model.safetensors").is_file()
