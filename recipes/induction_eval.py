"""Teacher-forced accuracy of one token at given positions, on the model's own forward (head 1's logits), and
what the wrong answers were: a copy of some earlier name's second token (a model that copies without matching the
name's first token guesses among the names seen, right 1/k of the time with k names) or something else."""

from __future__ import annotations

import torch


def next_token_hits(model, sequences: list[list[int]], positions: list[list[int]], batch_size: int = 16,
                    pad_id: int = 0) -> list[list[bool]]:
    """For every sequence and every position p given for it: does head 1's greedy token at p equal token p+1?"""
    predicted = next_token_predictions(model, sequences, positions, batch_size, pad_id)
    return [[t == s[p + 1] for p, t in zip(ps, ts)] for s, ps, ts in zip(sequences, positions, predicted)]


@torch.no_grad()
def next_token_predictions(model, sequences: list[list[int]], positions: list[list[int]], batch_size: int = 16,
                           pad_id: int = 0) -> list[list[int]]:
    """For every sequence and every position p given for it, head 1's greedy token at p (its prediction of token
    p+1 from tokens 0..p). Sequences are batched right-padded; attention is causal, so padding after a sequence
    does not change its logits."""
    model.eval()
    device = next(model.parameters()).device
    out: list[list[int]] = []
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
            out.append([int(predicted[i, p]) for p in ps])
    return out


def copy_diagnosis(sequence: list[int], position: int, predicted: int, lead_tokens) -> tuple[bool, float]:
    """(is the prediction the second token of some earlier name, the accuracy of copying one of the k earlier
    names at random: 1/k). A name is a lead token followed by its second token."""
    earlier = {sequence[q]: sequence[q + 1] for q in range(position) if sequence[q] in lead_tokens}
    return predicted in set(earlier.values()), 1 / len(earlier)
