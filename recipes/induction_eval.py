"""Teacher-forced accuracy of one token at given positions, on the model's own forward (head 1's logits)."""

from __future__ import annotations

import torch


@torch.no_grad()
def next_token_hits(model, sequences: list[list[int]], positions: list[list[int]], batch_size: int = 16,
                    pad_id: int = 0) -> list[list[bool]]:
    """For every sequence and every position p given for it: does head 1's greedy token at p (its prediction
    of token p+1 from tokens 0..p) equal token p+1? Sequences are batched right-padded; attention is causal,
    so padding after a sequence does not change its logits."""
    model.eval()
    device = next(model.parameters()).device
    hits: list[list[bool]] = []
    for start in range(0, len(sequences), batch_size):
        seqs, poss = sequences[start:start + batch_size], positions[start:start + batch_size]
        width = max(len(s) for s in seqs)
        batch = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        for i, s in enumerate(seqs):
            batch[i, : len(s)] = torch.tensor(s)
        predicted = model(batch.to(device)).logits.argmax(-1).cpu()
        for i, (s, ps) in enumerate(zip(seqs, poss)):
            if any(not 0 <= p < len(s) - 1 for p in ps):
                raise ValueError(f"sequence {start + i}: positions must lie in 0..{len(s) - 2}, got {ps}")
            hits.append([int(predicted[i, p]) == s[p + 1] for p in ps])
    return hits
