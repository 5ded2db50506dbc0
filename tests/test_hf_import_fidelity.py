"""Imports reproduce the source model's logits or refuse: rope scaling against transformers, every config field
classified, feed-forward widths solved exactly, damaged checkpoints named in one line."""

import dataclasses
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_model_config
from mtplm.inference.kv_cache import ModelKVCache
from mtplm.inference.speculative import MTPGenerator
from mtplm.model.config import ModelConfig, RopeScaling, ffn_rule_for, meta_ffn_width
from mtplm.model.transformer import MTPTransformer, rotary_frequencies
from mtplm.model.weights import load_model
from mtplm.conversion import import_config
from mtplm.conversion.hf_export import export_hf
from mtplm.conversion.hf_import import main as import_main
from test_speculative import assert_ragged_cached_logits

transformers = pytest.importorskip("transformers")

# head_dim 16, theta 10000: wavelengths 6.3, 20, 63, 199, ... With original_max_position_embeddings 64,
# low_freq_factor 1 and high_freq_factor 4 the first is kept, the next two are blended and the rest divided by
# the factor; sequences of 160 tokens run well past the original context.
T = 160
ROPE = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64},
}


def hf_llama(path, rope_scaling=None, **overrides):
    kw = dict(vocab_size=150, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0,
              rope_scaling=dict(rope_scaling) if rope_scaling else None)  # transformers edits the dict it is given
    kw.update(overrides)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)).eval()
    model.save_pretrained(path)
    return model


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("rope", list(ROPE))
def test_rope_scaling_imports_and_exports_to_transformers_logits(tmp_path, rope):
    hf = hf_llama(tmp_path / "llama", ROPE[rope])
    assert import_main([str(tmp_path / "llama"), str(tmp_path / "ours")]) == 0
    ours = load_model(tmp_path / "ours").eval()
    x = torch.randint(0, 150, (2, T))
    assert (logits(ours, x) - logits(hf, x)).abs().max() <= 1e-4
    if rope != "default":
        assert dataclasses.asdict(ours.cfg.rope_scaling) == {
            "low_freq_factor": None, "high_freq_factor": None, "original_max_position_embeddings": None,
            **ROPE[rope]}
        plain = dataclasses.replace(ours.cfg, rope_scaling=RopeScaling())
        unscaled = MTPTransformer(plain).eval()
        unscaled.load_state_dict(ours.state_dict())
        assert (logits(unscaled, x) - logits(hf, x)).abs().max() > 1e-3  # the scaling matters at these positions
    # and back: the exported config.json carries the scaling, so transformers computes our logits
    export_hf(tmp_path / "ours", tmp_path / "hf2", dtype="fp32")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf2", dtype=torch.float32).eval()
    assert (logits(back, x) - logits(ours, x)).abs().max() <= 1e-4
    if rope != "default":
        saved = json.loads((tmp_path / "hf2" / "config.json").read_text())
        assert (saved.get("rope_scaling") or saved["rope_parameters"]).items() >= ROPE[rope].items()


def test_llama3_bands_are_all_exercised():
    cfg = tiny_model_config(rope_scaling=RopeScaling(**ROPE["llama3"]))
    plain = rotary_frequencies(dataclasses.replace(cfg, rope_scaling=RopeScaling()))
    ratio = plain / rotary_frequencies(cfg)
    assert ratio[0] == 1 and ratio[-1] == 8 and ((ratio > 1) & (ratio < 8)).sum() == 2


def meta_apply_scaling(freqs):
    """Meta's llama3 apply_scaling (use_scaled_rope), one frequency at a time in Python floats."""
    out = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < 8192 / 4:
            out.append(f)
        elif wavelen > 8192 / 1:
            out.append(f / 8)
        else:
            smooth = (8192 / wavelen - 1) / (4 - 1)
            out.append((1 - smooth) * f / 8 + smooth * f)
    return torch.tensor(out)


def write_meta(folder, model, mp=1, params=None):
    folder.mkdir(exist_ok=True)
    split = {"tok_embeddings": 1, "output": 0, "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "wo": 1, "w2": 1}
    V = model.cfg.vocab_size
    sd = {k: v[:V] if k in ("tok_embeddings.weight", "output.weight") else v for k, v in model.state_dict().items()}
    for r in range(mp):
        part = {}
        for k, v in sd.items():
            d = split.get(k.split(".")[-2])
            part[k] = v.chunk(mp, dim=d)[r].clone() if d is not None and mp > 1 else v.clone()
        torch.save(part, folder / f"consolidated.{r:02d}.pth")
    (folder / "params.json").write_text(json.dumps(params or model.cfg.to_params_json()))


def test_meta_use_scaled_rope_is_llama3_with_metas_constants(tmp_path):
    # theta 5e5 and head_dim 64 (Llama 3's): wavelengths from 6 to 3e6 positions straddle all three bands.
    cfg = ModelConfig(dim=128, n_layers=2, n_heads=2, vocab_size=128, multiple_of=32, rope_theta=500000.0,
                      rope_scaling=RopeScaling("llama3", 8.0))
    freqs = rotary_frequencies(cfg)
    plain = rotary_frequencies(dataclasses.replace(cfg, rope_scaling=RopeScaling()))
    torch.testing.assert_close(freqs, meta_apply_scaling(plain), rtol=1e-6, atol=0)
    ratio = plain / freqs
    assert ratio[0] == 1 and ratio[-1] == 8 and ((ratio > 1) & (ratio < 8)).any()
    model = MTPTransformer(cfg).eval()
    params = model.cfg.to_params_json()
    assert params["use_scaled_rope"] is True
    write_meta(tmp_path / "meta", model, params=params)
    assert import_main([str(tmp_path / "meta"), str(tmp_path / "ours")]) == 0
    ours = load_model(tmp_path / "ours").eval()
    assert ours.cfg.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    export_hf(tmp_path / "ours", tmp_path / "hf", dtype="fp32")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    x = torch.randint(0, 128, (1, 64))
    assert (logits(hf, x) - logits(model, x)).abs().max() <= 1e-4
    write_meta(tmp_path / "plain", model, params={**params, "use_scaled_rope": False})
    assert import_main([str(tmp_path / "plain"), str(tmp_path / "ours_plain")]) == 0
    assert load_model(tmp_path / "ours_plain").cfg.rope_scaling == RopeScaling()


@pytest.mark.parametrize("rope", ["linear", "llama3"])
def test_cached_decoding_with_scaled_rope_equals_cache_free(rope):
    """Decoding reads the rope through the model: cached steps past the original context give the cache-free
    logits, and speculative greedy decoding the cache-free greedy tokens."""
    cfg = tiny_model_config(vocab_size=64, vocab_pad_multiple=8, max_seq_len=256, init_std=0.2,
                            rope_scaling=RopeScaling(**ROPE[rope]))
    model = MTPTransformer(cfg).eval()
    gen = MTPGenerator(model)
    seqs = torch.randint(0, 64, (2, 100))
    want = logits(model, seqs)
    assert_ragged_cached_logits(gen, ModelKVCache(model, 2, 100), seqs, want, ([60, 50], [5, 7], [20, 30]))
    prompts = [seqs[0, :60].tolist(), seqs[1, :7].tolist()]
    out, _ = gen.generate(prompts, 20, draft_heads=3)
    for p, o in zip(prompts, out):
        # greedy decoding is right iff each generated token is the argmax of the cache-free logits before it
        assert logits(model, torch.tensor([p + o]))[0, len(p) - 1:-1].argmax(-1).tolist() == o


# --- every field ------------------------------------------------------------------------------------------------


def test_every_llama_config_field_is_classified():
    """A field transformers adds to LlamaConfig must be decided here (mapped, no effect, or refused)."""
    known = import_config.HF_MAPPED | import_config.HF_NO_EFFECT | set(import_config.HF_REQUIRED)
    names = {f.name for f in dataclasses.fields(transformers.LlamaConfig)} | set(transformers.LlamaConfig().to_dict())
    assert names - known == set()


REFUSED_HF = [  # (config.json key, value, what the message must name)
    ("attention_bias", True, "attention_bias = True"),
    ("mlp_bias", True, "mlp_bias = True"),
    ("hidden_act", "gelu", "hidden_act = 'gelu'"),
    ("rope_scaling", {"rope_type": "dynamic", "factor": 2.0}, "rope_scaling.rope_type = 'dynamic'"),
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
     "rope_scaling.rope_type = 'yarn'"),
    ("rope_parameters", {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8},
     "rope_parameters.rope_type = 'longrope'"),
    ("rope_scaling", {"type": "linear", "factor": 0.5}, "rope_scaling.factor: must be a number >= 1, got 0.5"),
    ("rope_scaling", {"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0}, "lacks low_freq_factor"),
    ("rope_scaling", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "attention_factor": 0.5}, "rope_scaling.attention_factor = 0.5"),
    ("rope_parameters", {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5},
     "partial_rotary_factor = 0.5"),
    ("partial_rotary_factor", 0.5, "partial_rotary_factor = 0.5"),
    ("head_dim", 32, "head_dim = 32"),
    ("model_type", "mistral", "model_type = 'mistral'"),
    ("architectures", ["LlamaForSequenceClassification"], "architectures = ['LlamaForSequenceClassification']"),
    ("quantization_config", {"quant_method": "gptq", "bits": 4}, "quantization_config = {"),
    ("auto_map", {"AutoModelForCausalLM": "custom.MyLlama"}, "auto_map = {"),
    ("pruned_heads", {"0": [1]}, "pruned_heads = {'0': [1]}"),
    ("is_encoder_decoder", True, "is_encoder_decoder = True"),
    ("sliding_window", 64, "sliding_window = 64"),
]


@pytest.mark.parametrize("key, value, named", REFUSED_HF, ids=[f"{k}={v}" for k, v, _ in REFUSED_HF])
def test_unsupported_hf_fields_are_refused_by_name(tmp_path, capsys, key, value, named):
    hf_llama(tmp_path / "llama")
    cfg_file = tmp_path / "llama" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    if key == "rope_scaling":
        cfg.pop("rope_parameters", None)
    cfg[key] = value
    cfg_file.write_text(json.dumps(cfg))
    capsys.readouterr()
    assert import_main([str(tmp_path / "llama"), str(tmp_path / "ours")]) == 1
    err = capsys.readouterr().err
    assert named in err and err.count("\n") == 1, err
    assert not (tmp_path / "ours").exists()


@pytest.mark.parametrize("key, value", [("moe_args", {"num_experts": 16}), ("vision_chunk_size", 560),
                                        ("quantization_args", {"scheme": "int4_weight_int8_dynamic_activation"}),
                                        ("lora_args", {"rank": 8, "scale": 2.0}), ("use_scaled_rope", "yes"),
                                        ("use_qk_norm", True)])
def test_unsupported_meta_fields_are_refused_by_name(tmp_path, capsys, key, value):
    model = MTPTransformer(tiny_model_config(n_future_tokens=1, n_layers=2))
    write_meta(tmp_path / "meta", model, params={**model.cfg.to_params_json(), key: value})
    assert import_main([str(tmp_path / "meta"), str(tmp_path / "ours")]) == 1
    err = capsys.readouterr().err
    assert f"{key} = {value!r}" in err and err.count("\n") == 1 and not (tmp_path / "ours").exists()


# --- feed-forward widths ----------------------------------------------------------------------------------------


def test_every_ffn_width_is_solved_exactly():
    """Meta's rule with multiple_of 1 and a multiplier reaches every width >= 1, so every (dim, width) pair must
    come back as a rule that reproduces it exactly (truncating width / base * base lost some)."""
    assert ffn_rule_for(80, 57) is not None and meta_ffn_width(80, *ffn_rule_for(80, 57)) == 57
    for dim in range(1, 161):
        for width in range(1, 4 * dim + 2):
            rule = ffn_rule_for(dim, width)
            assert rule is not None and meta_ffn_width(dim, *rule) == width, (dim, width, rule)
        assert ffn_rule_for(dim, 0) is None
    assert ffn_rule_for(4096, 11008) == (256, None)  # Llama 2 7B keeps Meta's plain rule
    assert meta_ffn_width(4096, *ffn_rule_for(4096, 14336)) == 14336  # Llama 3 8B


def test_odd_ffn_width_imports(tmp_path):
    hf = hf_llama(tmp_path / "llama", hidden_size=80, intermediate_size=57)
    assert import_main([str(tmp_path / "llama"), str(tmp_path / "ours")]) == 0
    ours = load_model(tmp_path / "ours").eval()
    assert ours.cfg.ffn_hidden_dim == 57
    x = torch.randint(0, 150, (1, 12))
    assert (logits(ours, x) - logits(hf, x)).abs().max() <= 1e-4


# --- damaged checkpoints ----------------------------------------------------------------------------------------


def one_line_error(capsys, argv):
    capsys.readouterr()
    assert import_main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_missing_meta_shards_are_named(tmp_path, capsys):
    model = MTPTransformer(tiny_model_config(n_future_tokens=1, n_layers=2))
    write_meta(tmp_path / "meta", model, mp=4)
    (tmp_path / "meta" / "consolidated.01.pth").unlink()
    err = one_line_error(capsys, [str(tmp_path / "meta"), str(tmp_path / "out")])
    assert "consolidated.01.pth is missing" in err
    write_meta(tmp_path / "meta2", model, mp=4)
    (tmp_path / "meta2" / "consolidated.02.pth").unlink()  # the last ones: nothing in the names shows it
    (tmp_path / "meta2" / "consolidated.03.pth").unlink()
    err = one_line_error(capsys, [str(tmp_path / "meta2"), str(tmp_path / "out")])
    assert "tok_embeddings.weight in consolidated.00.pth .. consolidated.01.pth joined has shape [200, 32]" in err
    assert "params.json implies [200, 64]: the checkpoint is split into 4 model-parallel shards and 2 are here" in err
    assert not (tmp_path / "out").exists()


def test_meta_vocab_size_minus_one_comes_from_the_weights(tmp_path):
    model = MTPTransformer(tiny_model_config(n_future_tokens=1, n_layers=2, vocab_size=200)).eval()
    write_meta(tmp_path / "meta", model, mp=2, params={**model.cfg.to_params_json(), "vocab_size": -1})
    assert import_main([str(tmp_path / "meta"), str(tmp_path / "ours")]) == 0
    back = load_model(tmp_path / "ours")
    assert back.cfg.vocab_size == 200
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))


def test_hf_shape_disagreements_are_named(tmp_path, capsys):
    hf_llama(tmp_path / "llama")
    cfg_file = tmp_path / "llama" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**cfg, "intermediate_size": 128}))
    err = one_line_error(capsys, [str(tmp_path / "llama"), str(tmp_path / "out")])
    assert "model.layers.0.mlp.gate_proj.weight in model.safetensors has shape [96, 64], config.json implies " \
           "[128, 64] (and 5 more problems)" in err
    cfg_file.write_text(json.dumps(cfg))
    weights = load_file(str(tmp_path / "llama" / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if k != "lm_head.weight"}, str(tmp_path / "llama" / "model.safetensors"))
    err = one_line_error(capsys, [str(tmp_path / "llama"), str(tmp_path / "out")])
    assert "tensor lm_head.weight is missing (config.json implies shape [150, 64])" in err
    save_file({**weights, "score.weight": weights["lm_head.weight"].clone()}, str(tmp_path / "llama" / "model.safetensors"))
    err = one_line_error(capsys, [str(tmp_path / "llama"), str(tmp_path / "out")])
    assert "unexpected tensor score.weight in model.safetensors" in err
    assert not (tmp_path / "out").exists()


def test_missing_hf_shard_is_named(tmp_path, capsys):
    hf = hf_llama(tmp_path / "llama")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="60KB")
    shards = sorted((tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[1].unlink()
    err = one_line_error(capsys, [str(tmp_path / "sharded"), str(tmp_path / "out")])
    assert f"names {shards[1].name}, missing from" in err


def test_pipeline_stages_use_the_models_rope():
    from mtplm.pretrain.parallel.pipeline import rope_for

    model = MTPTransformer(tiny_model_config(rope_scaling=RopeScaling(**ROPE["llama3"])))
    h = torch.zeros(1, 100, model.cfg.dim)
    for got, want in zip(rope_for(h, model.cfg), model.rope(torch.arange(100).unsqueeze(0))):
        assert torch.equal(got, want)
