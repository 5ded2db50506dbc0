"""Activation checkpointing of the trunk, applied from outside the model.

The trunk's blocks are recomputed in backward in units of `interval` consecutive blocks: only each unit's input
is kept during the forward, and one unit's activations are alive at a time in the backward (interval 1: every
block's input kept; larger: fewer kept inputs, a bigger unit to recompute — about sqrt(blocks) minimises memory).
torch.utils.checkpoint runs non-reentrant, so it composes with ZeRO-3's parameter hooks; parameter names are
unchanged, so checkpoints and exports are unaffected. Heads are not recomputed: the sequential loss already
keeps only one head's activations alive at a time. The pipeline layout uses DeepSpeed's own interval instead
(see pipeline.py), with the same meaning.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint


def apply_activation_checkpointing(model, interval: int = 1) -> int:
    """Wrap model.trunk (training forwards only; cached decoding is untouched); returns the number of units."""
    blocks = list(model.layers[:-1])
    plain_trunk = model.trunk

    def run_unit(unit):
        def run(h, cos, sin):
            for block in unit:
                h = block(h, (cos, sin))
            return h
        return run

    @functools.wraps(plain_trunk)
    def trunk(tokens, rope, caches=None, attn_mask=None):
        if caches is not None or attn_mask is not None or not torch.is_grad_enabled():
            return plain_trunk(tokens, rope, caches, attn_mask)
        h = model.tok_embeddings(tokens)
        for start in range(0, len(blocks), interval):
            h = checkpoint(run_unit(blocks[start:start + interval]), h, *rope, use_reentrant=False)
        return h

    model.trunk = trunk
    return -(-len(blocks) // interval)
