"""Self-speculative decoding with the MTP heads (Gloeckle et al. 2024, Sec. 3.2; Stern et al. 2018).

One forward of the trunk and heads 1..k+1 over [pending token, k drafts] does two jobs: head 1 verifies the
drafts (its prediction at each position is what plain decoding would have produced there), and heads 2..k+1
at the last accepted position propose the next k drafts. Each sequence accepts its own longest agreeing
prefix, plus head 1's own next token, and its caches are rolled back past the rejected drafts, so a batch
advances raggedly. With k = 0 this is plain decoding with head 1, on the same cache machinery.

Greedy decoding is lossless: the output equals plain greedy decoding token for token. Sampling is lossless
in distribution: a draft x proposed by head j with distribution q is accepted with probability
min(1, p(x)/q(x)) against head 1's distribution p, and on rejection the token is drawn from
normalize(max(0, p - q)) (Leviathan et al. 2023; Chen et al. 2023), temperature and top-p applied to both.

A sequence never grows past the model's context (max_seq_len tokens, prompt included): positions beyond it were
never trained on. A longer prompt is refused, or cut from the left with a warning (prompt_overflow); a sequence
that reaches the limit leaves the batch as if it had met a stop token, and no draft is placed past it.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .kv_cache import ModelKVCache
from .stacked_heads import StackedHeads


@dataclass
class GenerationStats:
    forwards: int = 0  # model forwards (prefill included)
    sequence_steps: int = 0  # sum over sequences of decoding forwards while the sequence was active
    tokens: int = 0  # tokens generated, over all sequences
    proposed: list[int] = field(default_factory=list)  # drafts proposed at draft position j
    accepted: list[int] = field(default_factory=list)  # ... and accepted
    seconds: float = 0.0
    # Why each sequence ended, in prompt order: "stop" (a stop token), "length" (max_new_tokens) or "context"
    # (it reached the model's max_seq_len).
    finish_reasons: list[str] = field(default_factory=list)
    # Drafts accepted at each decoding step of each sequence, in prompt order. Step i of a sequence with prompt
    # length P drafted from position P - 1 + sum(1 + a for a in its steps before i): the position whose head-1
    # token was pending (inference/acceptance.py checks the teacher-forced run lengths there against these).
    step_accepted: list[list[int]] = field(default_factory=list)

    def __add__(self, other: GenerationStats) -> GenerationStats:
        """Totals over several generate() calls (batches) with the same number of draft heads."""
        return GenerationStats(self.forwards + other.forwards, self.sequence_steps + other.sequence_steps,
                               self.tokens + other.tokens, [a + b for a, b in zip(self.proposed, other.proposed)],
                               [a + b for a, b in zip(self.accepted, other.accepted)], self.seconds + other.seconds,
                               self.finish_reasons + other.finish_reasons, self.step_accepted + other.step_accepted)

    @property
    def context_limited(self) -> int:
        """Sequences stopped by the model's context rather than by a stop token or max_new_tokens."""
        return self.finish_reasons.count("context")

    @property
    def tokens_per_forward(self) -> float:
        """The paper's "average accepted": tokens a sequence gains per decoding forward."""
        return self.tokens / max(self.sequence_steps, 1)

    @property
    def acceptance(self) -> list[float]:
        return [a / p if p else float("nan") for a, p in zip(self.accepted, self.proposed)]

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


PROMPT_OVERFLOW = ("error", "truncate-left")


class ContextOverflowError(ValueError):
    """A prompt leaves no room to generate within the model's context (max_seq_len)."""


def fit_prompt(prompt: list[int], max_seq_len: int, overflow: str = "error", name: str = "prompt",
               warn: Callable[[str], None] | None = None) -> list[int]:
    """The prompt if it leaves room for at least one generated token within max_seq_len; else refused
    (overflow="error") or its last max_seq_len - 1 tokens, with a warning (overflow="truncate-left")."""
    if overflow not in PROMPT_OVERFLOW:
        raise ValueError(f"prompt_overflow: expected one of {', '.join(PROMPT_OVERFLOW)}, got {overflow!r}")
    room = max_seq_len - 1
    if len(prompt) <= room:
        return prompt
    what = (f"{name} has {len(prompt)} tokens, more than the {room} a prompt may have: the model's context "
            f"(max_seq_len) is {max_seq_len} tokens and one must be left to generate")
    if overflow == "error":
        raise ContextOverflowError(f"{what}; shorten it, or keep its last {room} tokens with prompt_overflow "
                                   f"'truncate-left' (mtp-generate --prompt-overflow truncate-left)")
    (warn or (lambda m: warnings.warn(m, stacklevel=4)))(f"{what}; kept its last {room} tokens")
    return prompt[-room:]


def filtered_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p  # the smallest set whose mass reaches top_p
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


class Progress:
    """The host's side of a generate() call: each sequence's tokens, why it ended, and the statistics."""

    def __init__(self, prompts: list[list[int]], max_new_tokens: int, max_seq_len: int, k: int, stop_tokens=(),
                 stop_when: Callable[[list[int]], bool] | None = None):
        B = len(prompts)
        self.stop_when = stop_when
        self.out: list[list[int]] = [[] for _ in range(B)]
        self.done, self.reasons = [False] * B, [""] * B
        self.room = [max_seq_len - len(p) for p in prompts]  # tokens each sequence may generate within the context
        self.max_new_tokens = max_new_tokens
        self.stop = set(int(s) for s in stop_tokens)
        self.stats = GenerationStats(proposed=[0] * k, accepted=[0] * k, step_accepted=[[] for _ in range(B)])

    def left(self, b: int) -> int:
        """Tokens sequence b may still add within the context after its pending one: drafts beyond are void."""
        return self.room[b] - len(self.out[b])

    def emit(self, b: int, tok: int) -> None:
        if self.done[b]:
            return
        if tok in self.stop:
            self.done[b], self.reasons[b] = True, "stop"
            return
        self.out[b].append(tok)
        self.stats.tokens += 1
        if self.stop_when is not None and self.stop_when(self.out[b]):
            self.done[b], self.reasons[b] = True, "stop"
        elif len(self.out[b]) >= self.max_new_tokens:
            self.done[b], self.reasons[b] = True, "length"
        elif len(self.out[b]) >= self.room[b]:
            self.done[b], self.reasons[b] = True, "context"

    def step(self, b: int, a: int, drafted: list[int], tok: int, k_step: int) -> None:
        """Sequence b's step judged the drafts `drafted`, of which the first k_step lie within the context: it
        accepted a of them, then head 1 gave tok."""
        judged = min(a, k_step)
        for j in range(k_step):  # draft j was judged only if drafts before it were accepted
            self.stats.proposed[j] += int(j <= judged)
            self.stats.accepted[j] += int(j < judged)
        self.stats.step_accepted[b].append(judged)
        for j in range(a):
            self.emit(b, drafted[j])
        self.emit(b, tok)


class MTPGenerator:
    def __init__(self, model):
        self.model = model.eval()
        self.n_heads = model.cfg.n_future_tokens
        self.max_seq_len = model.cfg.max_seq_len
        self.heads = StackedHeads(model)  # a copy of the head weights: build a new generator after training more
        self._static = None  # the compiled decoder (generate(compile=True)), built on first use

    def _forward(self, cache: ModelKVCache, tokens: torch.Tensor, n_heads: int, prepared=None):
        """Trunk + heads 1..n_heads on tokens (B, T); returns head 1's logits (B, T, V) and every head's
        hidden states (n_heads, B, T, d) (unembedded later, only where a draft is needed). prepared: the
        positions and mask, when the caller has set the caches' write positions (the static step)."""
        m = self.model
        positions, mask = cache.prepare(tokens.shape[1]) if prepared is None else prepared
        rope = m.rope(positions)
        h = m.trunk(tokens, rope, cache.trunk, mask)
        hidden = self.heads(h, rope, cache.heads, mask, n_heads)
        return m.unembed(hidden[0]), hidden

    def _choose(self, logits, sample: bool, temperature: float, top_p: float, gen):
        if not sample:
            return logits.argmax(-1), None
        probs = filtered_probs(logits, temperature, top_p)
        flat = probs.reshape(-1, probs.shape[-1])
        return torch.multinomial(flat, 1, generator=gen).view(probs.shape[:-1]), probs

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, draft_heads: int | None = None,
                 temperature: float = 0.0, top_p: float = 1.0, stop_tokens=(), seed: int | None = None,
                 prompt_overflow: str = "error", compile: bool = False,
                 stop_when: Callable[[list[int]], bool] | None = None):
        """Returns (generated token lists without the prompts or stop tokens, GenerationStats). A prompt longer
        than max_seq_len - 1 tokens raises ContextOverflowError, or with prompt_overflow="truncate-left" is cut
        to its last max_seq_len - 1 tokens with a warning; no sequence grows past max_seq_len tokens.
        compile: run the decoding steps as one compiled, static-shape function (inference/static_decode.py);
        the same greedy output, and the statistics may count drafts past the context that plain mode skips.
        stop_when: called with a sequence's generated tokens after each token it gains (stop strings, which
        tokens cannot express); True ends the sequence there, keeping that token, so plain and speculative
        decoding end on the same token."""
        k = self.n_heads - 1 if draft_heads is None else draft_heads
        if not 0 <= k <= self.n_heads - 1:
            raise ValueError(f"draft_heads must be between 0 and {self.n_heads - 1} (the model's extra heads), got {k}")
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        prompts = [fit_prompt(p, self.max_seq_len, prompt_overflow, f"prompt {i}") for i, p in enumerate(prompts)]
        device = next(self.model.parameters()).device
        gen = torch.Generator(device=device)
        gen.manual_seed(0 if seed is None else seed)
        progress = Progress(prompts, max_new_tokens, self.max_seq_len, k, stop_tokens, stop_when)
        t0 = time.perf_counter()
        if compile:
            if self._static is None:
                from .static_decode import StaticDecoder

                self._static = StaticDecoder(self)
            self._static.decode(prompts, progress, k, temperature, top_p, gen)
        else:
            self._decode(prompts, progress, k, temperature, top_p, gen)
        stats = progress.stats
        stats.seconds = time.perf_counter() - t0
        stats.finish_reasons = progress.reasons
        return progress.out, stats

    def prefill(self, cache: ModelKVCache, prompts: list[list[int]], k: int, sample: bool, temperature: float,
                top_p: float, gen):
        """The prompts (right-padded) through the model: their first tokens (pending, B), the first drafts (B, k)
        and the drafts' distributions (sampling)."""
        device = cache.lengths.device
        lens = torch.tensor([len(p) for p in prompts], device=device)
        tokens = torch.zeros(len(prompts), int(lens.max()), dtype=torch.long, device=device)
        for b, p in enumerate(prompts):  # right padding: pads sit after each prompt and are overwritten later
            tokens[b, : len(p)] = torch.tensor(p, device=device)
        cache.lengths = torch.zeros_like(lens)
        logits, hidden = self._forward(cache, tokens, k + 1)
        cache.lengths = lens
        rows = torch.arange(len(prompts), device=device)
        pending, _ = self._choose(logits[rows, lens - 1], sample, temperature, top_p, gen)
        drafts, q = self._draft(hidden, rows, lens - 1, k, sample, temperature, top_p, gen)
        return pending, drafts, q

    def _decode(self, prompts, progress: Progress, k, temperature, top_p, gen):
        """Eager decoding: finished sequences leave the batch and its caches, and the drafts are cut where they
        would pass the context, so each forward's shapes are those of the work left."""
        sample = temperature > 0
        device = next(self.model.parameters()).device
        B, P = len(prompts), max(len(p) for p in prompts)
        # A sequence in the batch has fewer than max_new_tokens generated, all but the pending one cached, and a
        # step writes the pending token and k drafts after them, never past the context (see k_step below).
        cache = ModelKVCache(self.model, B, min(P + progress.max_new_tokens + k, self.max_seq_len))
        stats = progress.stats
        pending, drafts, q = self.prefill(cache, prompts, k, sample, temperature, top_p, gen)
        stats.forwards += 1
        stats.sequence_steps += B  # the prefill yields each sequence's first token
        for b, tok in enumerate(pending.tolist()):
            progress.emit(b, tok)
        alive = list(range(B))  # the prompt of each row of the batch
        while True:
            keep = [r for r, b in enumerate(alive) if not progress.done[b]]
            if not keep:
                break
            if len(keep) < len(alive):  # finished sequences leave the batch and the caches
                kept = torch.tensor(keep, device=device)
                cache.keep(kept)
                pending, drafts, q = pending[kept], drafts[kept], None if q is None else q[kept]
                alive = [alive[r] for r in keep]
            n_rows = len(alive)
            rows = torch.arange(n_rows, device=device)
            # The pending token sits at position prompt + generated - 1; drafts after it stop at the last position
            # of the context (the KV caches end there), for the whole step: only the last steps of a sequence
            # near the limit draft less.
            k_step = min([k] + [progress.left(b) for b in alive])
            drafts, q = drafts[:, :k_step], None if q is None else q[:, :k_step]
            step_in = torch.cat([pending.unsqueeze(1), drafts], dim=1)  # (rows, k_step + 1)
            logits, hidden = self._forward(cache, step_in, k + 1)
            stats.forwards += 1
            stats.sequence_steps += n_rows
            n_acc, new_pending = self._verify(logits, drafts, q, rows, sample, temperature, top_p, gen)
            # Bookkeeping is in Python lists, moved from the device once per step: per-element reads of device
            # tensors would each synchronise with a GPU.
            for b, a, drafted, tok in zip(alive, n_acc.tolist(), drafts.tolist(), new_pending.tolist()):
                progress.step(b, a, drafted, tok, k_step)
            # Positions L .. L+a now hold the pending token and the accepted drafts; the rest is rolled back.
            cache.lengths = cache.lengths + n_acc + 1
            pending = new_pending
            drafts, q = self._draft(hidden, rows, n_acc, k, sample, temperature, top_p, gen)

    def _verify(self, logits, drafts, q, rows, sample, temperature, top_p, gen):
        """Head 1's logits (rows, k + 1, V) at [pending, drafts] judge the drafts (rows, k), proposed with
        distributions q (sampling); rows is arange(rows). Returns each row's number of accepted drafts and the
        token after them."""
        n_rows, k = drafts.shape
        if not sample:
            greedy = logits.argmax(-1)  # (rows, k + 1)
            n_acc = (drafts == greedy[:, :k]).long().cumprod(dim=1).sum(dim=1)
            return n_acc, greedy[rows, n_acc]
        p = filtered_probs(logits, temperature, top_p)  # (rows, k + 1, V)
        if k == 0:
            return torch.zeros_like(rows), torch.multinomial(p[:, 0], 1, generator=gen).squeeze(1)
        idx = drafts.unsqueeze(-1)
        ratio = (p[:, :k].gather(-1, idx) / q.gather(-1, idx).clamp_min(1e-20)).squeeze(-1)
        u = torch.rand(n_rows, k, generator=gen, device=drafts.device)
        n_acc = (u < ratio.clamp(max=1.0)).long().cumprod(dim=1).sum(dim=1)
        # Head 1 at the position after the last accepted draft; after a rejection, the residual max(0, p - q).
        final_p = p[rows, n_acc]
        residual = (final_p - q[rows, n_acc.clamp(max=k - 1)]).clamp_min(0)
        residual = residual / residual.sum(-1, keepdim=True).clamp_min(1e-20)
        final_p = torch.where((n_acc < k).unsqueeze(-1), residual, final_p)
        return n_acc, torch.multinomial(final_p, 1, generator=gen).squeeze(1)

    def _draft(self, hidden, rows, at, k, sample, temperature, top_p, gen):
        """Heads 2..k+1 at position `at` of each sequence propose the tokens after the pending one."""
        if k == 0:
            return torch.zeros(len(rows), 0, dtype=torch.long, device=rows.device), None
        logits = self.model.unembed(hidden[1:, rows, at].transpose(0, 1))  # (B, k, V)
        return self._choose(logits, sample, temperature, top_p, gen)
