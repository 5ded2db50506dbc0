"""torch.compile applied to a built model from outside, as torchtitan does (regional compilation).

Each transformer block (trunk and heads) is compiled on its own, in place (nn.Module.compile, so parameter
names, state dicts and the hooks that ZeRO and tensor parallelism put on the block's submodules are unchanged):
every block has the same code and shapes, so one graph is compiled and reused for all of them, in seconds
rather than the minutes a whole-model graph takes, and the sequential heads' single autograd node, activation
checkpointing and the pipeline stages, which call blocks one at a time, keep working as they are. The
cross-entropy of one chunk (the sequential loss's per-chunk work: fp32 upcast, log-softmax and target pick,
forward and backward) is compiled too, so its fp32 copy of the chunk's logits is fused away.

Blocks are compiled with fullgraph=True, so a graph break inside a block is an error, not a slow path, except
under ZeRO-3: DeepSpeed gathers and releases each parameter in forward hooks on the block's submodules, which it
marks torch.compiler.disable, so the block runs as several graphs with the hooks between them (said at
start-up, see describe()).
"""

from __future__ import annotations

import torch


def apply_compile(model, fullgraph: bool = True, backend: str = "inductor") -> int:
    """Compile every transformer block and the loss's chunk cross-entropy in place; returns the block count."""
    blocks = [*model.layers, *model.extra_heads]
    for block in blocks:
        block.compile(fullgraph=fullgraph, backend=backend)
    model.loss.cross_entropy = torch.compile(model.loss.cross_entropy, fullgraph=fullgraph, backend=backend)
    return len(blocks)


def describe(zero_stage: int) -> str:
    """The start-up line of a compiled run."""
    if zero_stage == 3:
        return ("torch.compile: each block and the chunk cross-entropy; ZeRO-3: with graph breaks at DeepSpeed's "
                "parameter gather/release hooks inside every block (they cannot be traced)")
    return "torch.compile: each block (one graph, fullgraph) and the chunk cross-entropy"
