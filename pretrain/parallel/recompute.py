"""Selective activation checkpointing, applied to a built model from outside (the block's `recompute` hook).

"full" recomputation (the model's activation_checkpoint_interval) keeps only each unit's input and reruns the
whole unit in backward: about a third more compute. "selective" keeps what is expensive to recompute, the
outputs of every matmul and of the attention kernel, and recomputes the cheap elementwise work between them
(RMSNorm's fp32 intermediates, rotary's fp32 copies, the SwiGLU gate, residual adds), as torchtitan's op-level
mode does: a few percent more compute for most of the memory that the elementwise ops hold. It is
torch.utils.checkpoint's selective policy (non-reentrant, so it composes with ZeRO-3's parameter hooks and with
torch.compile, which applies the same policy inside the compiled graph).
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

_aten = torch.ops.aten
# Outputs kept: matmuls and every attention kernel a backend may pick.
SAVED_OPS = frozenset(op for op in (
    _aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.linear.default,
    _aten._scaled_dot_product_flash_attention.default, _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default, _aten._scaled_dot_product_flash_attention_for_cpu.default,
))


def _policy(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def selective_checkpoint(fn, *args):
    return checkpoint(fn, *args, use_reentrant=False,
                      context_fn=functools.partial(create_selective_checkpoint_contexts, _policy))


def apply_selective_recompute(model) -> int:
    """Every trunk block of a built model recomputes selectively (the heads never recompute: the sequential loss
    keeps one head's activations alive at a time). Returns the number of blocks."""
    blocks = model.layers[:-1]
    for block in blocks:
        block.recompute = selective_checkpoint
    return len(blocks)
