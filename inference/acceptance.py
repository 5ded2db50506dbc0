"""Teacher-forced draft acceptance: how well the extra heads would draft, measured without decoding.

For heads' greedy tokens g[k] (head k+1's argmax, 0-based k) at every position t of a sequence, draft k >= 1
proposed at t is accepted when g[k][t] == g[0][t + k] (the token head 1 itself produces at t + k, which is
what greedy self-speculative decoding verifies it against) and drafts 1..k-1 were accepted. The run length at
t is the number of drafts accepted there, and 1 + min(run, k) the tokens one decoding forward would gain from
t with k drafts. On text that is the model's own greedy continuation, the run length at a position where a
decoding step began is exactly the number of drafts the decoder accepted at that step
(tests/test_acceptance.py); on other text it estimates it, averaged over positions.

Draft k at t is judged only where position t + k exists in the sequence. Counts are sums, so they add over
batches and data-parallel ranks (AcceptanceCounts); the figures are ratios of the totals.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AcceptanceCounts:
    """Totals over positions, one entry per draft position / draft count j = 1..n-1 (index j - 1).

    accepted[j-1]: positions where draft j was accepted; judged[j-1]: where it was judged (drafts before it
    accepted, and t + j inside the sequence); gained[k-1]: sum of min(run, k) over positions with t + k inside
    the sequence; positions[k-1]: how many such positions."""

    accepted: torch.Tensor
    judged: torch.Tensor
    gained: torch.Tensor
    positions: torch.Tensor

    def as_tensor(self) -> torch.Tensor:
        """(4, n-1) float64, for summing across ranks (all_reduce) and back with from_tensor."""
        return torch.stack([self.accepted, self.judged, self.gained, self.positions]).double()

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> AcceptanceCounts:
        return cls(*t.double().cpu().unbind(0))

    def __add__(self, other: AcceptanceCounts) -> AcceptanceCounts:
        return AcceptanceCounts.from_tensor(self.as_tensor().cpu() + other.as_tensor().cpu())

    @property
    def acceptance(self) -> list[float]:
        """Per draft position j: accepted / judged (conditional on the earlier drafts accepted, as the decoder
        reports it)."""
        return [float(a / p) if p else float("nan") for a, p in zip(self.accepted, self.judged)]

    @property
    def tokens_per_forward(self) -> list[float]:
        """For k = 1..n-1 drafts: the mean of 1 + min(run, k) over positions."""
        return [1.0 + float(g / c) if c else float("nan") for g, c in zip(self.gained, self.positions)]

    def metrics(self) -> dict:
        return {"acceptance": self.acceptance, "tokens_per_forward": self.tokens_per_forward}


def run_lengths(head_argmax: torch.Tensor) -> torch.Tensor:
    """head_argmax: (n, B, T) greedy tokens of heads 1..n at every position. Returns (B, T) accepted drafts at
    every position, with up to n-1 drafts (fewer near the end, where t + k leaves the sequence)."""
    n, B, T = head_argmax.shape
    run = torch.zeros(B, T, dtype=torch.long, device=head_argmax.device)
    alive = torch.ones(B, T, dtype=torch.bool, device=head_argmax.device)
    for k in range(1, n):
        ok = torch.zeros_like(alive)
        if k < T:
            ok[:, : T - k] = head_argmax[k][:, : T - k] == head_argmax[0][:, k:]
        alive &= ok
        run += alive
    return run


def acceptance_counts(head_argmax: torch.Tensor) -> AcceptanceCounts:
    """Counts of accepted and judged drafts and tokens gained per forward, from (n, B, T) greedy tokens."""
    n, B, T = head_argmax.shape
    run = run_lengths(head_argmax)
    t = torch.arange(T, device=run.device)
    accepted, judged, gained, positions = [], [], [], []
    for k in range(1, n):
        inside = (t + k < T).expand(B, T)
        judged.append((inside & (run >= k - 1)).sum())
        accepted.append((run >= k).sum())
        gained.append(run.clamp(max=k)[inside].sum())
        positions.append(inside.sum())
    if n == 1:
        empty = torch.zeros(0, dtype=torch.float64)
        return AcceptanceCounts(empty, empty, empty, empty)
    return AcceptanceCounts(*(torch.stack(xs).double().cpu() for xs in (accepted, judged, gained, positions)))


def draft_acceptance(head_logits: torch.Tensor) -> tuple[torch.Tensor, AcceptanceCounts]:
    """head_logits: (n, B, T, V) logits of every head. Returns (run lengths (B, T), AcceptanceCounts)."""
    argmax = head_logits.argmax(-1)
    return run_lengths(argmax), acceptance_counts(argmax)
