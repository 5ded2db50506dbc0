"""The sequential, chunked MTP loss against the naive reference: loss and every parameter's gradient."""

import copy

import pytest
import torch

from conftest import tiny_model_config
from mtplm.model.mtp_loss import default_chunk_tokens, head_targets
from mtplm.model.transformer import MTPTransformer
from mtplm.model.transformer import apply_activation_checkpointing


def grads_after(model, x, labels, scale=1.0, **kw):
    model.zero_grad(set_to_none=True)
    out = model(x, labels, grad_scale=scale, **kw)
    (out.loss * scale).backward()
    # A parameter with no gradient (a head of weight 0 in the sequential path) counts as a zero gradient.
    return out, {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters()}


def assert_same_grads(ref, got, rel=1e-5):
    assert ref.keys() == got.keys()
    for name in ref:
        scale = ref[name].abs().max().clamp(min=1e-12)
        diff = (ref[name] - got[name]).abs().max() / scale
        assert diff <= rel, f"{name}: max abs difference {diff:.2e} relative to the gradient scale"


@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize("chunk", [None, 5, 10_000])
def test_sequential_chunked_matches_naive(n, chunk):
    weights = [1.0, 0.3, 0.3, 0.3][:n] if n > 1 else []
    cfg = tiny_model_config(n_future_tokens=n, n_layers=n + 2, head_loss_weights=weights)
    naive = MTPTransformer(cfg, loss_impl="naive")
    seq = copy.deepcopy(naive)
    seq.loss_impl, seq.ce_chunk_tokens = "sequential", chunk
    x = torch.randint(0, 200, (3, 13))
    labels = torch.randint(0, 200, (3, 13 + 1))  # shorter than T + n - 1: the last positions of heads >= 3 are masked
    labels[0, 4] = labels[2, :3] = cfg.ignore_index  # and some masked positions inside
    ref_out, ref = grads_after(naive, x, labels)
    out, got = grads_after(seq, x, labels)
    assert torch.allclose(out.loss, ref_out.loss, rtol=1e-6, atol=1e-6)
    assert torch.allclose(out.head_losses, ref_out.head_losses, rtol=1e-6, atol=1e-6)
    assert_same_grads(ref, got)


def test_masking_matches_per_head_targets():
    labels = torch.arange(10).view(1, 10)
    t = head_targets(labels, seq_len=8, n=4, ignore_index=-1)
    assert t[0, 0].tolist() == list(range(8))
    assert t[3, 0].tolist() == [3, 4, 5, 6, 7, 8, 9, -1]  # head 4 has no target for the last position


def test_gradient_scale_is_applied_and_checked():
    cfg = tiny_model_config(n_future_tokens=2, n_layers=4)
    naive = MTPTransformer(cfg, loss_impl="naive")
    seq = copy.deepcopy(naive)
    seq.loss_impl = "sequential"
    x, labels = torch.randint(0, 200, (2, 9)), torch.randint(0, 200, (2, 10))
    _, ref = grads_after(naive, x, labels, scale=0.25)
    _, got = grads_after(seq, x, labels, scale=0.25)
    assert_same_grads(ref, got)
    # A backward that scales the loss differently from what the forward was told must fail loudly.
    out = seq(x, labels, grad_scale=1.0)
    with pytest.raises(RuntimeError, match="grad_scale"):
        (out.loss * 0.5).backward()


def test_no_grad_computes_losses_only():
    cfg = tiny_model_config()
    m = MTPTransformer(cfg)
    x, labels = torch.randint(0, 200, (2, 9)), torch.randint(0, 200, (2, 12))
    with torch.no_grad():
        out = m(x, labels)
    assert all(p.grad is None for p in m.parameters())
    m.loss_impl = "naive"
    with torch.no_grad():
        ref = m(x, labels)
    assert torch.allclose(out.head_losses, ref.head_losses, atol=1e-6)


def test_tied_embeddings_and_zero_weight_head():
    cfg = tiny_model_config(tie_embeddings=True, head_loss_weights=[1.0, 0.0, 0.5, 0.2])
    naive = MTPTransformer(cfg, loss_impl="naive")
    seq = copy.deepcopy(naive)
    seq.loss_impl, seq.ce_chunk_tokens = "sequential", 7
    x, labels = torch.randint(0, 200, (2, 9)), torch.randint(0, 200, (2, 12))
    _, ref = grads_after(naive, x, labels)
    _, got = grads_after(seq, x, labels)
    assert_same_grads(ref, got)


@pytest.mark.parametrize("interval, units", [(1, 3), (2, 2), (3, 1)])
def test_with_activation_checkpointing_of_the_trunk(interval, units):
    cfg = tiny_model_config(n_layers=7)
    naive = MTPTransformer(cfg, loss_impl="naive")
    seq = copy.deepcopy(naive)
    seq.loss_impl = "sequential"
    assert apply_activation_checkpointing(seq, interval) == units
    calls = {i: 0 for i in range(len(seq.layers))}
    for i, block in enumerate(seq.layers):
        # a pre-hook: the recompute stops early, once the last saved tensor is rebuilt, before forward hooks
        block.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    x, labels = torch.randint(0, 200, (2, 9)), torch.randint(0, 200, (2, 12))
    _, ref = grads_after(naive, x, labels)
    _, got = grads_after(seq, x, labels)
    assert_same_grads(ref, got)
    assert set(dict(seq.named_parameters())) == set(dict(naive.named_parameters()))  # names unchanged
    # every trunk block is recomputed in backward; head 1's block (the last of seq.layers) is not
    assert calls == {0: 2, 1: 2, 2: 2, 3: 1}


def test_bf16_close_to_naive_bf16():
    cfg = tiny_model_config()
    naive = MTPTransformer(cfg, loss_impl="naive").to(torch.bfloat16)
    seq = copy.deepcopy(naive)
    seq.loss_impl, seq.ce_chunk_tokens = "sequential", 6
    x, labels = torch.randint(0, 200, (2, 9)), torch.randint(0, 200, (2, 12))
    ref_out, ref = grads_after(naive, x, labels)
    out, got = grads_after(seq, x, labels)
    assert torch.allclose(out.loss, ref_out.loss, rtol=1e-2)
    assert_same_grads(ref, got, rel=5e-2)  # bf16 rounding of separately summed head contributions


def test_default_chunk_keeps_chunk_logits_near_hidden_size():
    n_tokens, dim, vocab = 8192, 1024, 32000
    chunk = default_chunk_tokens(n_tokens, dim, vocab)
    assert chunk * vocab <= 4 * n_tokens * dim  # a chunk's logits stay a few times the hidden states
    assert chunk * 8 <= n_tokens  # and far below one head's logits
    assert default_chunk_tokens(100, dim, vocab) == 100


def test_zero_grad_between_forward_and_backward_raises():
    """The common order forward; zero_grad(); backward() would drop every head, norm and unembedding gradient
    that the sequential forward wrote: the backward refuses, whichever way the gradients were cleared."""
    m = MTPTransformer(tiny_model_config())
    x, labels = torch.randint(0, 200, (2, 9)), torch.randint(0, 200, (2, 12))
    for set_to_none in (True, False):
        m.zero_grad()
        out = m(x, labels)
        m.zero_grad(set_to_none=set_to_none)
        with pytest.raises(RuntimeError, match="cleared before its backward"):
            out.loss.backward()
    # The right order, and two forwards back-propagated together, are untouched by the check.
    m.zero_grad()
    m(x, labels).loss.backward()
    m.zero_grad()
    (m(x, labels).loss + m(x, labels).loss).backward()


def test_eval_mode_forward_leaves_gradients_alone_and_refuses_backward():
    """A forward with labels in eval() mode outside no_grad computes losses only: no gradient leaks into the next
    training step, and back-propagating it raises instead of training the trunk alone."""
    cfg = tiny_model_config()
    m = MTPTransformer(cfg)
    x, labels = torch.randint(0, 200, (2, 9)), torch.randint(0, 200, (2, 12))
    m.eval()
    out = m(x, labels)
    assert all(p.grad is None for p in m.parameters())
    with pytest.raises(RuntimeError, match="eval\\(\\) mode"):
        out.loss.backward()
    naive = copy.deepcopy(m)
    naive.loss_impl = "naive"
    assert torch.allclose(out.head_losses, naive(x, labels).head_losses, atol=1e-6)
    # the step after it trains exactly like one without it
    m.train()
    _, got = grads_after(m, x, labels)
    _, ref = grads_after(naive.train(), x, labels)
    assert_same_grads(ref, got)
