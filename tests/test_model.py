"""The model: shapes, causality of every head, n=1 as a plain LM, parameter-matched layouts, FLOP counts."""

import copy

import pytest
import torch

from conftest import tiny_model_config
from mtplm.model.flops import count_params, flops_per_token
from mtplm.model.transformer import MTPTransformer


def test_layout_follows_meta_names_and_counts():
    cfg = tiny_model_config(n_layers=6, n_future_tokens=4)
    m = MTPTransformer(cfg)
    assert len(m.layers) == 3 and len(m.extra_heads) == 3  # n_layers - n + 1 main blocks, n - 1 extra heads
    names = set(dict(m.named_parameters()))
    assert {"tok_embeddings.weight", "norm.weight", "output.weight", "layers.2.attention.wq.weight",
            "extra_heads.2.feed_forward.w3.weight"} <= names
    assert sum(p.numel() for p in m.parameters()) == count_params(cfg).total


def test_parameter_count_is_matched_across_n():
    counts = {n: sum(p.numel() for p in MTPTransformer(tiny_model_config(n_layers=6, n_future_tokens=n)).parameters())
              for n in (1, 2, 4)}
    assert len(set(counts.values())) == 1, counts


def test_output_shapes():
    m = MTPTransformer(tiny_model_config(vocab_size=200))  # padded to 256 internally
    x = torch.randint(0, 200, (2, 9))
    assert m.output.weight.shape[0] == 256
    assert m(x).logits.shape == (2, 9, 200)
    assert m(x, all_heads=True).logits.shape == (4, 2, 9, 200)
    out = m(x, torch.randint(0, 200, (2, 12)))
    assert out.loss.ndim == 0 and out.head_losses.shape == (4,) and out.logits is None


@pytest.mark.parametrize("loss_impl", ["naive", "sequential"])
def test_no_head_sees_its_target(loss_impl):
    """d logits[t] / d input[j] must be zero for j > t for every head: head k at position t predicts
    token t + k, so seeing any later input would leak its target."""
    m = MTPTransformer(tiny_model_config(), loss_impl=loss_impl).eval()
    T = 8
    emb = m.tok_embeddings(torch.randint(0, 200, (1, T))).detach().requires_grad_()
    rope = m.rope(torch.arange(T).unsqueeze(0))
    h = emb
    for layer in m.layers[:-1]:
        h = layer(h, rope)
    for k in range(m.n_future_tokens):
        logits = m.unembed(m.head_forward(k, h, rope))
        for t in range(T):
            (g,) = torch.autograd.grad(logits[0, t].sum(), emb, retain_graph=True)
            assert torch.all(g[0, t + 1:] == 0), f"head {k + 1} at position {t} sees a later token"
            assert g[0, t].abs().max() > 0


def test_changing_a_future_token_leaves_earlier_logits_unchanged():
    m = MTPTransformer(tiny_model_config()).eval()
    x = torch.randint(0, 200, (1, 10))
    y = x.clone()
    y[0, 6] = (y[0, 6] + 1) % 200
    a, b = m(x, all_heads=True).logits, m(y, all_heads=True).logits
    assert torch.equal(a[:, :, :6], b[:, :, :6])
    assert not torch.allclose(a[:, :, 6:], b[:, :, 6:])


def test_head_one_alone_is_a_plain_next_token_model():
    """Trunk + head 1 of an n=4 model, copied into an n=1 model of n_layers - 3 blocks, gives the same logits."""
    mtp = MTPTransformer(tiny_model_config(n_layers=6, n_future_tokens=4)).eval()
    plain = MTPTransformer(tiny_model_config(n_layers=3, n_future_tokens=1)).eval()
    sd = {k: v for k, v in mtp.state_dict().items() if not k.startswith("extra_heads.")}
    plain.load_state_dict(sd, strict=True)
    x = torch.randint(0, 200, (2, 11))
    assert torch.equal(mtp(x).logits, plain(x).logits)
    # and n=1 training is the ordinary next-token cross-entropy
    labels = torch.randint(0, 200, (2, 11))
    ref = torch.nn.functional.cross_entropy(plain(x).logits.flatten(0, 1), labels.flatten())
    for impl in ("naive", "sequential"):
        plain.loss_impl = impl
        assert torch.allclose(plain(x, labels).loss, ref, atol=1e-6)


def test_gqa_equals_repeated_kv_heads():
    """A GQA model equals the full multi-head model whose K/V heads are the GQA ones repeated."""
    gqa = MTPTransformer(tiny_model_config(n_kv_heads=2, n_future_tokens=2)).eval()
    mha = MTPTransformer(tiny_model_config(n_kv_heads=4, n_future_tokens=2)).eval()
    sd = copy.deepcopy(gqa.state_dict())
    hd = gqa.cfg.head_dim
    for k in list(sd):
        if k.endswith(("attention.wk.weight", "attention.wv.weight")):
            sd[k] = sd[k].view(2, hd, -1).repeat_interleave(2, dim=0).reshape(4 * hd, -1)
    mha.load_state_dict(sd)
    x = torch.randint(0, 200, (2, 7))
    assert torch.allclose(gqa(x, all_heads=True).logits, mha(x, all_heads=True).logits, atol=1e-5)


def test_tied_embeddings_share_one_tensor():
    m = MTPTransformer(tiny_model_config(tie_embeddings=True))
    assert m.output.weight is m.tok_embeddings.weight
    assert count_params(m.cfg).total == sum(p.numel() for p in m.parameters())


def test_flops_split_trunk_and_heads():
    cfg = tiny_model_config(n_layers=8, n_future_tokens=4)
    f4 = flops_per_token(cfg, seq_len=32)
    f1 = flops_per_token(tiny_model_config(n_layers=8, n_future_tokens=1), seq_len=32)
    assert f4.training == pytest.approx(3 * (f4.trunk_forward + f4.heads_forward))
    # parameter-matched: the same block count, but n=4 pays three more unembeddings
    unembed = 2 * cfg.dim * cfg.padded_vocab_size
    assert f4.training - f1.training == pytest.approx(3 * 3 * unembed)


@pytest.mark.parametrize("override, message", [
    ({"rope_type": "yarn", "factor": 2}, "model.rope_scaling.rope_type: must be one of default, linear, llama3"),
    ({"rope_type": "linear", "factor": 0.5}, "model.rope_scaling.factor: must be a number >= 1, got 0.5"),
    ({"rope_type": "linear", "factor": 2, "low_freq_factor": 1}, "model.rope_scaling.low_freq_factor: is used by"),
    ({"factor": 2}, "model.rope_scaling.factor: must be 1 with rope_type default"),
    ({"rope_type": "llama3", "factor": 8, "high_freq_factor": 1}, "high_freq_factor: must be greater than"),
    ({"rope_type": "llama3", "factor": 8, "original_max_position_embeddings": 0}, "must be an integer >= 1, got 0"),
    ({"beta": 1}, "unknown key model.rope_scaling.beta"),
])
def test_rope_scaling_is_a_validated_training_config_field(override, message):
    from mtplm.model.config import ConfigError
    from mtplm.pretrain.config import TrainConfig, load_config

    args = [a for k, v in override.items() for a in (f"--model.rope_scaling.{k}", str(v))]
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(TrainConfig, None, args)
    with pytest.raises(ConfigError, match="model.rope_scaling"):  # params.json / mtp_config.json path
        tiny_model_config(rope_scaling=override)


def test_rope_scaling_round_trips_through_saved_configs():
    import dataclasses

    from mtplm.model.config import ModelConfig, RopeScaling
    from mtplm.pretrain.config import TrainConfig, load_config

    args = ["--model.rope_scaling.rope_type", "llama3", "--model.rope_scaling.factor", "8"]
    cfg = load_config(TrainConfig, None, args).model
    assert cfg.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)  # Meta's constants fill the rest
    assert ModelConfig(**dataclasses.asdict(cfg)) == cfg
    assert tiny_model_config(rope_scaling=None).rope_scaling == RopeScaling()  # null in a JSON config: none
