"""Teacher-forced draft acceptance against what self-speculative decoding actually accepted."""

import pytest
import torch
from test_speculative import V, motif_batch, random_prompts

from mtplm.inference.acceptance import acceptance_counts, draft_acceptance, run_lengths
from mtplm.inference.speculative import MTPGenerator
from mtplm.model.config import ModelConfig
from mtplm.model.transformer import MTPTransformer


@pytest.fixture(scope="module")
def trained():
    """A small n=4 model trained a little on repeated motifs: its heads draft right often, not always."""
    torch.manual_seed(0)
    cfg = ModelConfig(dim=32, n_layers=5, n_heads=2, vocab_size=V, multiple_of=16, n_future_tokens=4,
                      max_seq_len=128, vocab_pad_multiple=8)
    model = MTPTransformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        b = motif_batch(g, bs=8, T=32)
        model(b[:, :32], b[:, 1:]).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def test_hand_computed_example():
    # n = 3 heads, T = 5. Head 1's tokens: 10 11 12 13 14.
    g = torch.tensor([[[10, 11, 12, 13, 14]],
                      [[11, 99, 13, 14, 7]],   # draft 1 at t is right where it equals head 1 at t + 1: t = 0, 2, 3
                      [[12, 13, 14, 5, 6]]])   # draft 2 at t right where it equals head 1 at t + 2: t = 0, 1, 2
    assert run_lengths(g).tolist() == [[2, 0, 2, 1, 0]]  # t = 1: draft 2 agrees but draft 1 did not
    c = acceptance_counts(g)
    # draft 1 judged at t = 0..3 (t + 1 < 5), accepted at 3; draft 2 judged where draft 1 was accepted and
    # t + 2 < 5 (t = 0, 2), accepted at both
    assert c.accepted.tolist() == [3, 2] and c.judged.tolist() == [4, 2]
    assert c.acceptance == [0.75, 1.0]
    # 1 draft: positions 0..3 gain 1, 0, 1, 1; 2 drafts: positions 0..2 gain 2, 0, 2
    assert c.tokens_per_forward == [1 + 3 / 4, 1 + 4 / 3]


def test_counts_add_over_batches():
    g = torch.randint(0, 3, (4, 6, 20), generator=torch.Generator().manual_seed(0))
    whole = acceptance_counts(g)
    parts = acceptance_counts(g[:, :2]) + acceptance_counts(g[:, 2:])
    assert torch.equal(whole.as_tensor(), parts.as_tensor())
    assert whole.judged[0] > whole.judged[1] > 0 and whole.accepted.sum() > 0


@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("k", [1, 3])
def test_run_lengths_equal_decoder_acceptance(trained, batch, k):
    """Each sequence's text is the model's own greedy continuation; at every position where a decoding step
    began (its pending token's predecessor), the teacher-forced run length equals the drafts the decoder
    accepted there, capped at the k drafts it had (and at the end of the text: the last step may accept
    drafts past max_new_tokens). A ragged batch (batch 5) must give each sequence the same."""
    gen = MTPGenerator(trained)
    prompts = random_prompts(torch.Generator().manual_seed(10 + batch), batch)
    outs, stats = gen.generate(prompts, 40, draft_heads=k)
    assert len(stats.step_accepted) == batch
    n_steps = full = 0
    for prompt, out, steps in zip(prompts, outs, stats.step_accepted):
        text = prompt + out
        with torch.no_grad():
            logits = trained(torch.tensor([text]), all_heads=True).logits
        run, _ = draft_acceptance(logits)
        run = run[0].tolist()
        T = len(text)
        s = len(prompt) - 1
        for a in steps:
            assert min(run[s], k) == min(a, T - 1 - s), f"position {s}"
            n_steps += 1
            full += a == k
            s += a + 1
        assert s >= T - 2  # the steps cover the whole continuation (the prefill made its first token)
    assert stats.sequence_steps == n_steps + batch  # every decoding step was checked (plus the prefills)
    assert 0 < full < n_steps  # some steps accepted every draft, some did not: the comparison has teeth
