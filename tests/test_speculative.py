"""Self-speculative decoding against plain decoding: token-for-token for greedy, in distribution for sampling."""

import copy

import pytest
import torch

from mtplm.inference.kv_cache import LayerKVCache, ModelKVCache
from mtplm.inference.speculative import ContextOverflowError, MTPGenerator, filtered_probs
from mtplm.inference.stacked_heads import StackedHeads
from mtplm.model.config import ModelConfig
from mtplm.model.transformer import MTPTransformer

V = 32


def motif_batch(g, bs=16, T=48):
    """Noisy repetitions of short random motifs: the heads learn to see several tokens ahead."""
    rows = []
    for _ in range(bs):
        motif = torch.randint(0, V, (int(torch.randint(3, 7, (1,), generator=g)),), generator=g)
        s = motif.repeat(30)[: T + 4]
        noise = torch.rand(T + 4, generator=g) < 0.05
        rows.append(torch.where(noise, torch.randint(0, V, (T + 4,), generator=g), s))
    return torch.stack(rows)


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    cfg = ModelConfig(dim=64, n_layers=6, n_heads=4, n_kv_heads=2, vocab_size=V, multiple_of=16, n_future_tokens=4,
                      max_seq_len=256, vocab_pad_multiple=8)
    model = MTPTransformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        b = motif_batch(g)
        model(b[:, :48], b[:, 1:]).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def reference_greedy(model, prompt, n):
    """No cache at all: the full sequence through the model for every token."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def random_prompts(g, count):
    b = motif_batch(g, bs=count, T=40)
    return [b[i, : int(torch.randint(2, 30, (1,), generator=g))].tolist() for i in range(count)]


@pytest.mark.parametrize("n_run", [1, 3, 4])
def test_stacked_heads_equal_each_heads_own_block(trained, n_run):
    """The batched heads against the model's blocks run one by one, each with its own cache: a ragged
    prefill, then a step of 3 tokens per sequence from different lengths."""
    cfg = trained.cfg
    g = torch.Generator().manual_seed(n_run)
    stacked = ModelKVCache(trained, 2, 64)
    own = [LayerKVCache(2, cfg.kv_heads, 64, cfg.head_dim, torch.float32, "cpu") for _ in range(n_run)]
    heads = StackedHeads(trained)
    for new_tokens, lengths in ((20, [0, 0]), (3, [17, 11])):
        stacked.lengths = torch.tensor(lengths)
        positions, mask = stacked.prepare(new_tokens)
        for layer in own:
            layer.write_positions, layer.used = positions, stacked.heads.used
        rope = trained.rope(positions)
        h = torch.randn(2, new_tokens, cfg.dim, generator=g)
        with torch.no_grad():
            got = heads(h, rope, stacked.heads, mask, n_run)
            want = torch.stack([trained.head_forward(j, h, rope, own[j], mask) for j in range(n_run)])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def assert_ragged_cached_logits(gen, cache, seqs, want, schedule):
    """Feed two sequences through the KV caches in steps of the given per-row widths (a ragged batch: the
    shorter row's extra tokens are padding the next step overwrites); head 1's logits equal `want` there."""
    starts = [0, 0]
    with torch.no_grad():
        for row_steps in schedule:
            width = max(row_steps)
            step = torch.stack([seqs[b, starts[b]:starts[b] + width] for b in range(2)])
            got, _ = gen._forward(cache, step, 4)
            for b, n in enumerate(row_steps):
                torch.testing.assert_close(got[b, :n], want[b, starts[b]:starts[b] + n], atol=1e-4, rtol=1e-4)
            starts = [s + n for s, n in zip(starts, row_steps)]
            cache.lengths = torch.tensor(starts)


def test_cached_logits_equal_cache_free_logits(trained):
    """Prefill, then steps of several tokens, through the KV caches (grouped-query attention read in place, two
    sequences at different lengths): head 1's logits equal the model's on the whole sequence, to rounding."""
    gen = MTPGenerator(trained)
    seqs = torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = trained(seqs).logits
    assert_ragged_cached_logits(gen, ModelKVCache(trained, 2, 32), seqs, want, ([12, 9], [3, 5], [6, 2]))


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_greedy_speculative_equals_plain_greedy(trained, batch):
    g = torch.Generator().manual_seed(batch)
    gen = MTPGenerator(trained)
    tokens = steps = 0
    for _ in range(3):
        prompts = random_prompts(g, batch)  # ragged prompt lengths
        plain, _ = gen.generate(prompts, 40, draft_heads=0)
        for k in (1, 2, 3):
            spec, stats = gen.generate(prompts, 40, draft_heads=k)
            assert spec == plain, f"k={k}"
        tokens, steps = tokens + stats.tokens, steps + stats.sequence_steps
    assert tokens / steps > 1.3  # the heads do draft usefully on this data
    assert plain[0] == reference_greedy(trained, prompts[0], 40)  # and the cache machinery is exact


def test_batch_drafts_like_each_sequence_alone(trained):
    """Greedy drafts depend on nothing but the sequence: a ragged batch, whose finished sequences leave it (and
    its caches) along the way, proposes and accepts exactly what each prompt does alone. Lossless output alone
    would not show a head cache mixed up between sequences; the acceptance counts do."""
    gen = MTPGenerator(trained)
    prompts = random_prompts(torch.Generator().manual_seed(9), 6)
    stop = [gen.generate(prompts[:1], 30)[0][0][10]]
    batched, stats = gen.generate(prompts, 30, draft_heads=3, stop_tokens=stop)
    alone = [gen.generate([p], 30, draft_heads=3, stop_tokens=stop) for p in prompts]
    assert batched == [out[0] for out, _ in alone]
    assert stats.sequence_steps < len(prompts) * stats.forwards  # sequences did leave the batch early
    total = sum((s for _, s in alone[1:]), alone[0][1])
    assert (stats.tokens, stats.sequence_steps, stats.proposed, stats.accepted) == \
        (total.tokens, total.sequence_steps, total.proposed, total.accepted)


def test_cache_keeps_rows_of_every_stacked_head():
    cache = ModelKVCache(MTPTransformer(ModelConfig(dim=32, n_layers=4, n_heads=2, vocab_size=V, n_future_tokens=3,
                                                    multiple_of=16, vocab_pad_multiple=8)), 3, 8)
    for layer in cache.layers:
        layer.k.normal_(), layer.v.normal_()
    before = [(layer.k.clone(), layer.v.clone()) for layer in cache.layers]
    cache.lengths = torch.tensor([4, 5, 6])
    cache.keep(torch.tensor([2, 0]))
    assert cache.lengths.tolist() == [6, 4]
    for layer, (k, v) in zip(cache.trunk, before):
        assert torch.equal(layer.k, k[[2, 0]]) and torch.equal(layer.v, v[[2, 0]])
    k, v = before[-1]  # heads stacked head-major: head j's sequence b in row 3 * j + b
    rows = [2, 0, 5, 3, 8, 6]
    assert torch.equal(cache.heads.k, k[rows]) and torch.equal(cache.heads.v, v[rows])


def test_rollback_after_rejections_equals_decoding_from_scratch(trained):
    """Heads re-initialised at random propose mostly wrong drafts: nearly every step rolls the caches back,
    and the output must still be exactly what cache-free decoding gives."""
    bad = copy.deepcopy(trained)
    torch.manual_seed(1)
    for head in bad.extra_heads:
        for p in head.parameters():
            torch.nn.init.normal_(p, 0, 1.0)  # noise that swamps the residual stream (0.2 still drafts well)
    gen = MTPGenerator(bad)
    prompts = random_prompts(torch.Generator().manual_seed(5), 4)
    out, stats = gen.generate(prompts, 30, draft_heads=3)
    assert stats.acceptance[0] < 0.5
    for p, o in zip(prompts, out):
        assert o == reference_greedy(bad, p, 30)


def test_stop_tokens_and_max_length(trained):
    gen = MTPGenerator(trained)
    prompts = random_prompts(torch.Generator().manual_seed(7), 5)
    plain, _ = gen.generate(prompts, 25, draft_heads=0)
    stop = plain[0][5]
    out, _ = gen.generate(prompts, 25, draft_heads=3, stop_tokens=[stop])
    for full, got in zip(plain, out):
        cut = full.index(stop) if stop in full else len(full)
        assert got == full[:cut]
    short, _ = gen.generate(prompts, 3, draft_heads=3)
    assert [len(s) for s in short] == [3] * 5
    with pytest.raises(ValueError, match="draft_heads must be between 0 and 3"):
        gen.generate(prompts, 3, draft_heads=4)


def exact_marginals(model, prompt, temperature, top_p):
    """Exact distributions of generated tokens 1, 2 and 3 under plain sampling, by enumeration."""
    with torch.no_grad():
        def dist(prefixes):
            x = torch.tensor([prompt + list(p) for p in prefixes])
            return filtered_probs(model(x).logits[:, -1], temperature, top_p).double()
        p1 = dist([()])[0]
        p2_given = dist([(a,) for a in range(V)])  # (V, V)
        joint12 = p1[:, None] * p2_given
        p3_given = dist([(a, b) for a in range(V) for b in range(V)]).view(V, V, V)
        p3 = (joint12[:, :, None] * p3_given).sum((0, 1))
    return p1, joint12.sum(0), p3, p2_given


def test_speculative_sampling_is_lossless_in_distribution(trained):
    prompt = motif_batch(torch.Generator().manual_seed(3), bs=1, T=40)[0, :12].tolist()
    temperature, top_p, n = 1.0, 0.95, 4000
    p1, p2, p3, _ = exact_marginals(trained, prompt, temperature, top_p)
    gen = MTPGenerator(trained)
    out, stats = gen.generate([prompt] * n, 3, draft_heads=3, temperature=temperature, top_p=top_p, seed=11)
    assert stats.acceptance[0] < 1.0  # rejections did happen, so the residual path is exercised
    samples = torch.tensor(out)
    # Noise of an empirical distribution over 32 outcomes from 4000 samples: total variation ~0.02-0.04.
    for pos, exact in enumerate((p1, p2, p3)):
        empirical = torch.bincount(samples[:, pos], minlength=V).double() / n
        tv = 0.5 * (empirical - exact).abs().sum().item()
        assert tv < 0.06, f"token {pos + 1}: total variation {tv:.3f} from the exact distribution"
    # The test has power: taking head 2's draft distribution as if it were the target is far off.
    with torch.no_grad():
        x = torch.tensor([prompt])
        q2 = filtered_probs(trained(x, all_heads=True).logits[1, 0, -1], temperature, top_p).double()
    assert 0.5 * (q2 - p2).abs().sum().item() > 0.1


def with_context(model, max_seq_len):
    short = copy.deepcopy(model)
    short.cfg.max_seq_len = max_seq_len
    return short


@pytest.fixture
def positions_fed(monkeypatch):
    """Every KV cache's size, and the largest position any forward wrote, over the generate() calls."""
    seen = {"allocated": 0, "position": -1}

    class Recording(ModelKVCache):
        def __init__(self, model, batch, max_len, *a, **kw):
            super().__init__(model, batch, max_len, *a, **kw)
            seen["allocated"] = max(seen["allocated"], max_len)

        def prepare(self, n_new):
            positions, mask = super().prepare(n_new)
            seen["position"] = max(seen["position"], int(positions.max()))
            return positions, mask

    monkeypatch.setattr("mtplm.inference.speculative.ModelKVCache", Recording)
    return seen


def test_generation_stops_exactly_at_the_context_limit(trained, positions_fed):
    """With room for more new tokens than the context holds, every sequence ends at max_seq_len tokens, prompt
    included, marked "context"; speculative greedy equals plain greedy up to the limit, and no draft (nor cache
    slot) lies past it."""
    L = 40
    model = with_context(trained, L)
    gen = MTPGenerator(model)
    long = motif_batch(torch.Generator().manual_seed(15), bs=1, T=40)[0].tolist()
    prompts = random_prompts(torch.Generator().manual_seed(12), 5) + [long[: L - 1], long[: L - 3]]
    plain, stats = gen.generate(prompts, 100, draft_heads=0)
    assert [len(p) + len(o) for p, o in zip(prompts, plain)] == [L] * len(prompts)
    assert stats.finish_reasons == ["context"] * len(prompts) and stats.context_limited == len(prompts)
    assert plain[0] == reference_greedy(model, prompts[0], L - len(prompts[0]))
    for k in (1, 2, 3):
        spec, s = gen.generate(prompts, 100, draft_heads=k)
        assert spec == plain and s.finish_reasons == stats.finish_reasons, f"k={k}"
        assert s.tokens / s.sequence_steps > 1.2  # the limit does not stop drafting early
    assert positions_fed["position"] == L - 1  # a draft may sit in the last slot, never past it
    assert positions_fed["allocated"] <= L


def test_mixed_lengths_stop_each_at_its_own_limit(trained):
    """A batch where one sequence ends by max_new_tokens, one by a stop token and the others by the context:
    each leaves the batch at its own limit and gets what it gets alone."""
    L = 40
    gen = MTPGenerator(with_context(trained, L))
    g = torch.Generator().manual_seed(13)
    prompts = [motif_batch(g, bs=1, T=40)[0, :n].tolist() for n in (5, 12, 20, 35, 39)]
    stop = gen.generate(prompts[1:2], 30)[0][0][8]
    plain, stats = gen.generate(prompts, 30, draft_heads=0, stop_tokens=[stop])
    spec, s3 = gen.generate(prompts, 30, draft_heads=3, stop_tokens=[stop])
    alone = [gen.generate([p], 30, draft_heads=3, stop_tokens=[stop])[0][0] for p in prompts]
    assert spec == plain == alone
    assert stats.finish_reasons[:2] == ["length", "stop"] and len(plain[0]) == 30
    assert stats.finish_reasons[2:] == s3.finish_reasons[2:] == ["context"] * 3
    assert [len(o) for o in plain[2:]] == [L - 20, L - 35, L - 39]


def test_prompt_past_the_context_is_refused_or_cut_from_the_left(trained):
    L = 40
    gen = MTPGenerator(with_context(trained, L))
    g = torch.Generator().manual_seed(14)
    fits, too_long, just_over = (motif_batch(g, bs=1, T=70)[0, :n].tolist() for n in (10, 60, L))
    with pytest.raises(ContextOverflowError, match=r"prompt 1 has 60 tokens, more than the 39 .*\(max_seq_len\) is 40"):
        gen.generate([fits, too_long], 5)
    with pytest.raises(ContextOverflowError, match="prompt 0 has 40 tokens"):  # no room left to generate
        gen.generate([just_over], 5)
    for k in (0, 3):
        with pytest.warns(UserWarning) as caught:
            out, stats = gen.generate([fits, too_long, just_over], 5, draft_heads=k, prompt_overflow="truncate-left")
        assert [str(w.message) for w in caught] == [
            "prompt 1 has 60 tokens, more than the 39 a prompt may have: the model's context (max_seq_len) is 40 "
            "tokens and one must be left to generate; kept its last 39 tokens",
            "prompt 2 has 40 tokens, more than the 39 a prompt may have: the model's context (max_seq_len) is 40 "
            "tokens and one must be left to generate; kept its last 39 tokens"]
        want, _ = gen.generate([fits, too_long[-(L - 1):], just_over[-(L - 1):]], 5, draft_heads=k)
        assert out == want and [len(o) for o in out] == [5, 1, 1]
        assert stats.finish_reasons == ["length", "context", "context"]
    with pytest.raises(ValueError, match="prompt_overflow: expected one of error, truncate-left, got 'cut'"):
        gen.generate([fits], 5, prompt_overflow="cut")
