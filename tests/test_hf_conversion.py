"""Export to and import from Hugging Face, checked against transformers itself (tiny models, offline)."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_model_config
from dist_launch import REPO, run_ranks
from mtplm.model.transformer import MTPTransformer
from mtplm.model.weights import save_model
from mtplm.conversion.hf_export import HEADS_FILE, export_hf, main as export_main
from mtplm.conversion.hf_import import load_hf_export, load_meta_native, main as import_main

transformers = pytest.importorskip("transformers")

SHAPES = {
    "gqa-untied-v200-n4": dict(n_kv_heads=2, vocab_size=200, n_future_tokens=4, n_layers=6),
    "mha-tied-v256-n1": dict(n_kv_heads=4, vocab_size=256, n_future_tokens=1, n_layers=3, tie_embeddings=True),
    "mqa-untied-v100-n2": dict(n_kv_heads=1, vocab_size=100, n_future_tokens=2, n_layers=4, multiple_of=24),
}


def hf_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def greedy(model, x, steps):
    ids = x
    for _ in range(steps):
        ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
    return ids


@pytest.mark.parametrize("shape", list(SHAPES))
def test_export_matches_transformers_and_round_trips(tmp_path, shape):
    model = MTPTransformer(tiny_model_config(**SHAPES[shape])).eval()
    save_model(model, tmp_path / "ours")
    export_hf(tmp_path / "ours", tmp_path / "hf", dtype="fp32")
    hf = hf_model(tmp_path / "hf")
    x = torch.randint(0, model.cfg.vocab_size, (2, 11))
    with torch.no_grad():
        assert (hf(x).logits - model(x).logits).abs().max() <= 1e-4
        ours = greedy(model, x, 8)
        # An explicit mask: from pad_token_id alone, generate() would mask every prompt token equal to it.
        theirs = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=8, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours, theirs)
    # HF -> ours -> HF is exact, heads included
    back = load_hf_export(tmp_path / "hf")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))
    save_model(back, tmp_path / "ours2")
    export_hf(tmp_path / "ours2", tmp_path / "hf2", dtype="fp32")
    for name in ["model.safetensors"] + ([HEADS_FILE] if model.cfg.n_future_tokens > 1 else []):
        a, b = load_file(str(tmp_path / "hf" / name)), load_file(str(tmp_path / "hf2" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sharded_export_and_bf16(tmp_path):
    model = MTPTransformer(tiny_model_config(dim=128, n_heads=4)).eval()
    save_model(model, tmp_path / "ours")
    export_hf(tmp_path / "ours", tmp_path / "hf", dtype="bf16", max_shard_size="200KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    back = load_hf_export(tmp_path / "hf")
    x = torch.randint(0, 200, (1, 9))
    with torch.no_grad():
        assert (back(x, all_heads=True).logits - model(x, all_heads=True).logits).abs().max() < 0.05


def test_tokenizer_loads_in_transformers_and_encodes_like_ours(tmp_path):
    from mtplm.data.tokenizer import load_tokenizer, train_sentencepiece

    text = open(transformers.__file__.replace("__init__.py", "configuration_utils.py")).read()
    tok_path = train_sentencepiece([text], tmp_path / "sp", 700)
    model = MTPTransformer(tiny_model_config(vocab_size=700)).eval()
    save_model(model, tmp_path / "ours", {"tokenizer.model": tok_path})
    export_hf(tmp_path / "ours", tmp_path / "hf", dtype="fp32")
    ours = load_tokenizer(tok_path)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    lines = open(transformers.__file__.replace("__init__.py", "modeling_utils.py")).read().split("\n")
    snippets = ["\n".join(lines[i:i + 5]) for i in range(0, len(lines), 60)] + ["  x = 1\n\ty", "Hello  world"]
    for s in snippets:
        assert hf_tok.encode(s, add_special_tokens=False) == ours.encode(s), repr(s)
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == ours.eod_id


def test_plain_llama_gets_new_heads_from_its_last_block(tmp_path):
    cfg = transformers.LlamaConfig(vocab_size=150, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "llama")
    assert import_main([str(tmp_path / "llama"), str(tmp_path / "ours"), "--n-future-tokens", "3"]) == 0
    from mtplm.model.weights import load_model

    ours = load_model(tmp_path / "ours").eval()
    assert ours.cfg.n_future_tokens == 3 and ours.cfg.n_layers == 5
    x = torch.randint(0, 150, (2, 7))
    with torch.no_grad():
        assert (ours(x).logits - hf(x).logits).abs().max() <= 1e-4
        all_heads = ours(x, all_heads=True).logits
    assert torch.equal(all_heads[1], all_heads[0]) and torch.equal(all_heads[2], all_heads[0])  # copies of head 1


@pytest.mark.parametrize("mp", [1, 2])
def test_meta_native_checkpoint_imports(tmp_path, mp):
    model = MTPTransformer(tiny_model_config(vocab_size=256)).eval()
    sd = model.state_dict()
    split = {"tok_embeddings": 1, "output": 0, "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "wo": 1, "w2": 1}
    for r in range(mp):  # Meta's model-parallel layout
        part = {}
        for k, v in sd.items():
            d = split.get(k.split(".")[-2])
            part[k] = v.chunk(mp, dim=d)[r].clone() if d is not None and mp > 1 else v.clone()
        torch.save(part, tmp_path / f"consolidated.{r:02d}.pth")
    (tmp_path / "params.json").write_text(json.dumps(model.cfg.to_params_json()))
    back = load_meta_native(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(sd.values(), back.state_dict().values()))


def test_export_from_training_checkpoints(tmp_path, capsys):
    """Single-process ZeRO-1 and 2-process ZeRO-3 checkpoints export to the model the run ended with."""
    cfg = [sys.executable, "tests/workers/train_synthetic.py", "--config", "configs/tiny.yaml",
           "--model.vocab_size", "200", "--data.seq_len", "16", "--train.steps", "2", "--train.eval_interval", "0"]
    proc = subprocess.run(cfg + ["--train.out_dir", str(tmp_path / "z1"), "--deepspeed_config",
                                 "ds_configs/zero1.json"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run_ranks(2, cfg[1:] + ["--train.out_dir", str(tmp_path / "z3"), "--deepspeed_config", "ds_configs/zero3.json"])
    from mtplm.model.weights import load_model

    for run in ("z1", "z3"):
        assert export_main([str(tmp_path / run / "checkpoints"), str(tmp_path / f"{run}_hf"), "--dtype", "fp32"]) == 0
        final = load_model(tmp_path / run / "final").eval()
        back = load_hf_export(tmp_path / f"{run}_hf")
        for (k, a), b in zip(final.state_dict().items(), back.state_dict().values()):
            assert torch.allclose(a, b, atol=1e-7), f"{run}: {k}"
    # a damaged partition (a copy cut short) is named, and nothing is written
    part = next((tmp_path / "z1" / "checkpoints").glob("step_*/zero_pp_rank_0_mp_rank_00_optim_states.pt"))
    part.write_bytes(part.read_bytes()[:4096])
    assert export_main([str(tmp_path / "z1" / "checkpoints"), str(tmp_path / "damaged_hf")]) == 1
    assert f"{part}: not a readable checkpoint file (" in capsys.readouterr().err
    assert not (tmp_path / "damaged_hf").exists()


def test_export_from_a_run_whose_tokenizer_moved_names_it_and_takes_tokenizer(tmp_path, capsys, monkeypatch):
    from mtplm.data.tokenizer import train_sentencepiece
    from mtplm.conversion import hf_export

    tok = train_sentencepiece(["def f(x):\n    return x\n" * 50], tmp_path / "data" / "tokenizer", 290)
    save_model(MTPTransformer(tiny_model_config(vocab_size=290)).eval(), tmp_path / "ours")
    real = hf_export.consolidated_state_dict
    # a training checkpoint records the config the run read, data.tokenizer among it; the data has since moved
    monkeypatch.setattr(hf_export, "consolidated_state_dict", lambda src: (*real(src)[:2], {
        "data": {"tokenizer": str(tmp_path / "data" / "tokenizer.model")}}))
    tok.rename(tmp_path / "moved.model")
    assert export_main([str(tmp_path / "ours"), str(tmp_path / "hf")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"mtp-export-hf: the run's tokenizer {tmp_path}/data/tokenizer.model (its data.tokenizer) is no "
                   f"longer at that path; pass --tokenizer PATH, the SentencePiece .model the run trained with"), err
    assert not (tmp_path / "hf").exists()
    moved = tmp_path / "moved.model"
    assert export_main([str(tmp_path / "ours"), str(tmp_path / "hf"), "--tokenizer", str(moved)]) == 0
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == moved.read_bytes()


def test_import_and_export_check_the_output_folder_before_converting(tmp_path, capsys):
    """The output is refused before the source is read: a conversion takes minutes on a large model."""
    (tmp_path / "src").mkdir()  # not a model at all: reading it would fail, so a refusal of it came first
    (tmp_path / "file").write_text("")
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "notes.txt").write_text("mine")
    for convert, marker in ((import_main, "params.json"), (export_main, "config.json")):
        assert convert([str(tmp_path / "src"), str(tmp_path / "file")]) == 1
        assert capsys.readouterr().err.strip().endswith(f"output {tmp_path}/file: is an existing file, not a folder")
        assert convert([str(tmp_path / "src"), str(tmp_path / "kept")]) == 1
        err = capsys.readouterr().err.strip()
        assert f"output {tmp_path}/kept: an existing folder that is not an earlier output of this kind (no {marker})" \
            in err, err
    assert (tmp_path / "kept" / "notes.txt").read_text() == "mine"


def test_bad_inputs_are_named(tmp_path, capsys):
    (tmp_path / "ckpt").mkdir()
    assert export_main([str(tmp_path / "ckpt"), str(tmp_path / "out")]) == 1
    assert "not a training checkpoint (no mtp_config.json)" in capsys.readouterr().err
    assert import_main([str(tmp_path / "ckpt"), str(tmp_path / "out")]) == 1
    assert "no config.json" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
