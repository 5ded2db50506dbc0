"""Activation checkpointing of the trunk blocks, applied from outside the model.

Each trunk block's forward is wrapped in torch.utils.checkpoint (non-reentrant, so it composes with
ZeRO-3's parameter hooks); parameter names are unchanged, so checkpoints and exports are unaffected.
Heads are not wrapped: the sequential loss already keeps only one head's activations alive at a time.
"""

from __future__ import annotations

import functools

from torch.utils.checkpoint import checkpoint


def apply_activation_checkpointing(model) -> int:
    wrapped = 0
    for block in model.layers[:-1]:
        inner = block.forward

        @functools.wraps(inner)
        def forward(*args, _inner=inner, **kwargs):
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward
        wrapped += 1
    return wrapped
