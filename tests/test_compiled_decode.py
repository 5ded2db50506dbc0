"""The compiled, static-shape decoding step (generate(compile=True)) against eager decoding, on the CPU.

Compiling on a CPU takes tens of seconds per configuration, so one small model and one generator (whose compiled
step every test shares) serve all the tests: batch 1 and 8, plain and 2 drafts: four compilations."""

import pytest
import torch
from torch._dynamo.utils import counters

from mtplm.inference.speculative import MTPGenerator
from mtplm.model.config import ModelConfig
from mtplm.model.transformer import MTPTransformer
from test_speculative import V, motif_batch, random_prompts

L = 64  # the context: some sequences below stop at it, so the k spare slots past it get drafts written


@pytest.fixture(scope="module")
def gen():
    """A model with one trunk block and 3 heads, trained on motifs so that its heads draft usefully."""
    torch.manual_seed(0)
    cfg = ModelConfig(dim=32, n_layers=4, n_heads=2, n_kv_heads=1, vocab_size=V, multiple_of=16, n_future_tokens=3,
                      max_seq_len=L, vocab_pad_multiple=8)
    model = MTPTransformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(120):
        b = motif_batch(g)
        model(b[:, :48], b[:, 1:]).loss.backward()
        opt.step()
        opt.zero_grad()
    return MTPGenerator(model.eval())


def prompts_for(batch, seed):
    """Ragged prompts; with 8, one of them ends 10 tokens before the context."""
    prompts = random_prompts(torch.Generator().manual_seed(seed), batch)
    if batch == 8:
        prompts[3] = motif_batch(torch.Generator().manual_seed(seed), bs=1, T=60)[0, : L - 10].tolist()
    return prompts


@pytest.mark.parametrize("batch", [1, 8])
def test_compiled_greedy_equals_eager_plain_and_speculative(gen, batch):
    prompts = prompts_for(batch, batch)
    stop = []
    if batch == 8:  # a stop token of the first sequence's, not one of the sequence that runs into the context
        free, _ = gen.generate(prompts, 30, draft_heads=0)
        stop = [t for row in free[:3] for t in row if t not in free[3]][:1]
        assert stop, "no token to stop at: pick other prompts"
    plain, eager_stats = gen.generate(prompts, 30, draft_heads=0, stop_tokens=stop)
    graphs = counters["stats"]["unique_graphs"]
    compiled_plain, plain_stats = gen.generate(prompts, 30, draft_heads=0, stop_tokens=stop, compile=True)
    compiled_spec, spec_stats = gen.generate(prompts, 30, draft_heads=2, stop_tokens=stop, compile=True)
    assert compiled_plain == plain and compiled_spec == plain
    assert plain_stats.finish_reasons == spec_stats.finish_reasons == eager_stats.finish_reasons
    if batch == 8:
        assert eager_stats.finish_reasons[3] == "context" and "stop" in eager_stats.finish_reasons
    assert spec_stats.tokens_per_forward > 1.3  # drafts were accepted: the caches advanced by several slots
    assert plain_stats.sequence_steps == eager_stats.sequence_steps > spec_stats.sequence_steps
    # one graph per configuration (at most: another test may have compiled it), not one per step
    assert counters["stats"]["unique_graphs"] - graphs <= 2


def test_warm_compiled_step_never_recompiles(gen):
    """After a first call, other prompts (other lengths, other stop tokens, other batch contents) in the same
    configuration reuse the compiled step: any recompilation raises."""
    gen.generate(prompts_for(8, 1), 30, draft_heads=2, compile=True)
    graphs = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed in (2, 3):
            prompts = random_prompts(torch.Generator().manual_seed(seed), 8)  # shorter: the cache's bucket absorbs it
            out, stats = gen.generate(prompts, 25, draft_heads=2, stop_tokens=[seed], compile=True)
            assert out == gen.generate(prompts, 25, draft_heads=2, stop_tokens=[seed])[0]
            assert stats.forwards > 10
    assert counters["stats"]["unique_graphs"] == graphs


def test_static_sampling_draws_eagerly_after_the_step(gen, monkeypatch):
    """Sampling: the static step's forward, then eager draws (verification, drafts, the state's advance).
    Uncompiled here (its forward is the greedy graph's, compiled above; a sampling graph would cost another
    compilation); top-p that keeps one token makes it greedy."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    static = MTPGenerator(gen.model)
    prompts = prompts_for(8, 4)
    plain, _ = gen.generate(prompts, 20, draft_heads=0)
    sampled, stats = static.generate(prompts, 20, draft_heads=2, temperature=1.0, top_p=1e-6, seed=1, compile=True)
    assert sampled == plain and stats.tokens_per_forward > 1.3
