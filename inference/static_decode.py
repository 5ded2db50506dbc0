"""Self-speculative and plain decoding with a compiled, static-shape step (generate(compile=True)).

Eager decoding on a GPU is bound by operator dispatch: a step of a small model is ~500 operators whose launch
costs more than their arithmetic. Here a step has the same shapes at every call, so torch.compile traces it once
per (batch, draft heads, cache length) and replays it:

- the KV caches are allocated once, to a cache length bucket, and attention reads every slot under a mask
  (slot <= query position), so the attended length never changes; keys are written at tensor-valued positions;
- the step's width is always k + 1: drafts that would pass the context are still verified, into k spare slots
  past it, and never emitted (so the statistics may count them where eager decoding, which cuts them, does not);
- finished sequences stay in the batch (their rows compute and are ignored; their positions are clamped into
  the cache) rather than leave it;
- the step's state (pending token and drafts, cached lengths) is updated in place on the device, and the host
  reads one small tensor per step: each sequence's accepted count, next token and drafts.

On CUDA the step is compiled with mode="reduce-overhead": one CUDA graph per configuration, replayed; the caches,
the state and the stacked head weights are marked as static addresses so the graph reads and writes them in
place instead of copying them in. A CPU has no CUDA graphs: the default mode compiles the step with inductor,
whose fused C++ kernels replace the per-operator dispatch. Greedy verification and drafting run inside the
compiled step; sampling draws from a torch.Generator, which stays eager, after a compiled forward. The prefill
(its width is the longest prompt's) stays eager: once per generate() call.
"""

from __future__ import annotations

import torch

from .kv_cache import ModelKVCache

CACHE_BUCKET = 128  # cache lengths are rounded up to a multiple of this, so calls of similar length share a graph
RECOMPILE_LIMIT = 64  # graphs per step function: batch sizes x draft heads x cache lengths x greedy/sampling


class StaticState:
    """The caches and per-step state of one (batch, draft heads, cache length) configuration, kept across
    generate() calls: the compiled step reads them at fixed addresses (a CUDA graph cannot follow a new one)."""

    def __init__(self, model, batch: int, k: int, slots: int, cuda: bool):
        self.cache = ModelKVCache(model, batch, slots)
        device = self.cache.lengths.device
        self.tokens = torch.zeros(batch, k + 1, dtype=torch.long, device=device)  # pending token + k drafts
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)  # positions cached (the pending one's)
        self.positions = torch.zeros(batch, k + 1, dtype=torch.long, device=device)  # the step's write positions
        if cuda:
            for t in [self.tokens, self.lengths, self.positions] + [x for layer in self.cache.layers
                                                                     for x in (layer.k, layer.v)]:
                torch._dynamo.mark_static_address(t)

    def bind(self) -> None:
        """Every cache writes at the step's positions tensor and is read whole (the eager prefill resets both)."""
        for layer in self.cache.layers:
            layer.write_positions, layer.used = self.positions, self.cache.max_len


def advance(state: StaticState, n_acc: torch.Tensor, pending: torch.Tensor, drafts: torch.Tensor) -> torch.Tensor:
    """Accept n_acc drafts of each row: the next step's input and cached lengths, in place. Returns what the host
    reads, (B, 2 + k): [accepted count, next token, next drafts]."""
    state.tokens.copy_(torch.cat([pending.unsqueeze(1), drafts], dim=1))
    state.lengths.add_(n_acc + 1)
    return torch.cat([n_acc.unsqueeze(1), state.tokens], dim=1)


def step(gen, state: StaticState, k: int, sample: bool):
    """One decoding forward over state.tokens. Greedy: verifies, drafts and advances, returning advance()'s
    tensor; sampling: returns head 1's logits and the heads' hidden states for the eager draws."""
    cache, tokens = state.cache, state.tokens
    B, W = tokens.shape
    slots = cache.max_len
    device = tokens.device
    # Rows of finished sequences keep stepping; the clamp keeps their writes inside their own rows of the caches.
    positions = (state.lengths.unsqueeze(1) + torch.arange(W, device=device)).clamp(max=slots - 1)
    state.positions.copy_(positions)
    mask = torch.arange(slots, device=device).view(1, 1, 1, slots) <= positions.view(B, 1, W, 1)
    logits, hidden = gen._forward(cache, tokens, k + 1, (positions, mask))
    if sample:
        return logits, hidden
    rows = torch.arange(B, device=device)
    n_acc, pending = gen._verify(logits, tokens[:, 1:], None, rows, False, 1.0, 1.0, None)
    drafts, _ = gen._draft(hidden, rows, n_acc, k, False, 1.0, 1.0, None)
    return advance(state, n_acc, pending, drafts)


class StaticDecoder:
    """The compiled step of one MTPGenerator and its states."""

    def __init__(self, gen):
        self.gen = gen
        self.cuda = next(gen.model.parameters()).is_cuda
        if self.cuda:
            for t in vars(gen.heads).values():  # the stacked head weights: read in place by the CUDA graphs
                if isinstance(t, torch.Tensor):
                    torch._dynamo.mark_static_address(t)
        # Every configuration is its own graph of the one step function; past the limit torch would fall back to
        # eager without a word.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        # fullgraph: a graph break would split the step and bring the dispatch back; fail instead.
        self.step = torch.compile(step, mode="reduce-overhead" if self.cuda else None, fullgraph=True, dynamic=False)
        self.states: dict[tuple[int, int, int], StaticState] = {}

    def state(self, batch: int, k: int, longest_prompt: int, max_new_tokens: int) -> StaticState:
        # A sequence writes at most to position min(prompt + max_new_tokens, context) - 2 + k (its pending token
        # sits before its last generated one, its k drafts after it): k spare slots past the context.
        need = -(-(longest_prompt + max_new_tokens) // CACHE_BUCKET) * CACHE_BUCKET
        slots = min(need, self.gen.max_seq_len) + k
        key = (batch, k, slots)
        if key not in self.states:
            self.states[key] = StaticState(self.gen.model, batch, k, slots, self.cuda)
        return self.states[key]

    def decode(self, prompts, progress, k: int, temperature: float, top_p: float, generator) -> None:
        gen, sample = self.gen, temperature > 0
        B = len(prompts)
        state = self.state(B, k, max(len(p) for p in prompts), progress.max_new_tokens)
        stats = progress.stats
        pending, drafts, q = gen.prefill(state.cache, prompts, k, sample, temperature, top_p, generator)
        state.bind()
        state.lengths.copy_(state.cache.lengths)
        state.tokens.copy_(torch.cat([pending.unsqueeze(1), drafts], dim=1))
        stats.forwards += 1
        stats.sequence_steps += B
        fed = state.tokens.tolist()  # each row's step input, on the host: its drafts are what gets accepted
        for b in range(B):
            progress.emit(b, fed[b][0])
        rows = torch.arange(B, device=state.tokens.device)
        while not all(progress.done):
            active = [b for b in range(B) if not progress.done[b]]
            k_row = {b: min(k, progress.left(b)) for b in active}  # drafts within the context
            if self.cuda:
                torch.compiler.cudagraph_mark_step_begin()
            if sample:
                logits, hidden = self.step(gen, state, k, True)
                n_acc, pending = gen._verify(logits, state.tokens[:, 1:], q, rows, True, temperature, top_p,
                                             generator)
                drafts, q = gen._draft(hidden, rows, n_acc, k, True, temperature, top_p, generator)
                result = advance(state, n_acc, pending, drafts)
            else:
                result = self.step(gen, state, k, False)
            result = result.tolist()  # the step's one synchronisation
            stats.forwards += 1
            stats.sequence_steps += len(active)
            for b in active:
                progress.step(b, result[b][0], fed[b][1:], result[b][1], k_row[b])
            fed = [r[1:] for r in result]
