"""train.compile (pretrain/parallel/compile.py): compiled blocks train exactly like eager ones, in-process for every
activation-checkpointing policy, and under the real trainer for each parallel layout (test_compile_layouts.py).
Kept tiny (dim 32): inductor compiles for the CPU with gcc, and one block graph serves every block and test."""

import copy

import pytest
import torch
from torch._dynamo.utils import counters

from conftest import tiny_model_config
from mtplm.model.transformer import MTPTransformer, apply_activation_checkpointing
from mtplm.pretrain.parallel.compile import apply_compile
from mtplm.pretrain.parallel.recompute import apply_selective_recompute

CFG = tiny_model_config(dim=32, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=64, n_future_tokens=2,
                        max_seq_len=32)
STEPS, T = 3, 16


def batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, CFG.vocab_size, (2, T + 2), generator=g) for _ in range(STEPS)]


def train_losses(model) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, eps=1e-5)
    losses = []
    for batch in batches():
        out = model(batch[:, :T], batch[:, 1:])
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(out.loss))
    return losses


def with_policy(model, policy):
    if policy == "full":
        apply_activation_checkpointing(model, 1)
    elif policy == "selective":
        apply_selective_recompute(model)
    return model


@pytest.fixture(scope="module")
def eager():
    torch.manual_seed(0)
    model = MTPTransformer(CFG)
    start = copy.deepcopy(model.state_dict())
    return start, train_losses(model), model.state_dict()


@pytest.mark.parametrize("policy", ["none", "full", "selective"])
def test_compiled_training_equals_eager(eager, policy):
    start, ref_losses, ref_state = eager
    model = MTPTransformer(CFG)
    model.load_state_dict(start)
    with_policy(model, policy)
    assert apply_compile(model) == CFG.n_layers
    counters.clear()
    losses = train_losses(model)
    # fullgraph=True makes a graph break inside a block an error; nothing was compiled around a break either.
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert losses == pytest.approx(ref_losses, rel=1e-5, abs=1e-6)
    state = model.state_dict()
    assert state.keys() == ref_state.keys()  # compiled in place: Meta's parameter names are unchanged
    for k, v in ref_state.items():
        torch.testing.assert_close(state[k], v, rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("policy", ["full", "selective"])
def test_recompute_policies_train_like_keeping_everything(eager, policy):
    start, ref_losses, ref_state = eager
    model = MTPTransformer(CFG)
    model.load_state_dict(start)
    assert train_losses(with_policy(model, policy)) == pytest.approx(ref_losses, rel=1e-6)
    for k, v in ref_state.items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=1e-6, atol=1e-7, msg=k)


def test_compile_backend_is_a_validated_config_field():
    from mtplm.pretrain.config import ConfigError, TrainConfig, from_dict

    with pytest.raises(ConfigError, match=r"^train.compile_backend: 'inductr' is not a torch.compile backend"):
        from_dict(TrainConfig, {"train": {"compile": True, "compile_backend": "inductr"}})
