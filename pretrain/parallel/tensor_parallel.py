"""Megatron-style tensor parallelism, applied to a built model from outside (model/ knows nothing of it).

Every transformer block (trunk and heads) is split as in Megatron-LM: wq/wk/wv and w1/w3 by output rows
(column-parallel: each rank owns whole attention heads and a slice of the feed-forward width), wo and w2 by
input columns (row-parallel, their outputs summed across ranks). The embedding and the shared unembedding are
split by vocabulary rows, and the cross-entropy is computed on the vocabulary shards, so no rank ever holds a
full row of logits. Norm weights are replicated; their gradients come out identical on every rank because the
gradient entering each column-parallel layer is all-reduced.

The same layers serve the data-parallel layout and the pipeline layout: the process group comes from
DeepSpeed's pipe/data/model topology (see layout.py). The cut is made on the meta device under
ZeRO-0/1/2 (lean_init.py then draws each full weight from the same seed and keeps the rank's slice) and on the
built weights under ZeRO-3, so a tensor-parallel run starts from exactly the single-process model.

Imports deepspeed for zero.GatheredParameters: a model built under ZeRO-3 is cut, and its shards gathered for
saving, one partitioned module or parameter at a time.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

# Which dimension of each weight is split: 0 = output rows (column-parallel), 1 = input columns (row-parallel).
# Matched on the last two name components; anything absent (norms) is replicated.
_PARTITION_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "wo": 1, "w2": 1, "tok_embeddings": 0, "output": 0}


def partition_dim(name: str) -> int | None:
    """The split dimension of a parameter by its state-dict name, or None if replicated."""
    parts = name.split(".")
    if parts[-1] != "weight" or len(parts) < 2:
        return None
    return _PARTITION_DIM.get(parts[-2])


@dataclass(frozen=True)
class TensorParallel:
    group: object  # torch.distributed process group of the ranks sharing one model replica's tensors
    rank: int
    world: int


class _CopyToTensorParallel(torch.autograd.Function):
    """Identity forward; the backward sums the input gradient over the tensor-parallel ranks."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTensorParallel(torch.autograd.Function):
    """Sum over the tensor-parallel ranks forward; identity backward (every rank computes the same loss
    from the sum, so each receives the same gradient for its own part)."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _shard(full: torch.Tensor, dim: int, tp: TensorParallel) -> nn.Parameter:
    p = nn.Parameter(full.detach().chunk(tp.world, dim=dim)[tp.rank].clone())
    # DeepSpeed counts a parameter marked this way on every rank when it computes the global gradient norm
    # (replicated ones only on tensor-parallel rank 0); partition_dim is Megatron's name for the split.
    p.tensor_model_parallel = True
    p.partition_dim = dim
    return p


class ColumnParallelLinear(nn.Module):
    """y[..., rank's rows] = x W_rank^T. Input replicated on every rank; output split along its last dim.

    copy_input=False when the caller already routes the input through _CopyToTensorParallel once for several
    layers (q/k/v, w1/w3): their input gradients then add up locally and cross ranks in one all-reduce."""

    def __init__(self, full: nn.Linear, tp: TensorParallel, weight: nn.Parameter | None = None,
                 copy_input: bool = True):
        super().__init__()
        self.tp, self.copy_input = tp, copy_input
        self.weight = weight if weight is not None else _shard(full.weight, 0, tp)

    def forward(self, x):
        if self.copy_input:
            x = _CopyToTensorParallel.apply(x, self.tp.group)
        return F.linear(x, self.weight)


class RowParallelLinear(nn.Module):
    """y = sum over ranks of x[..., rank's columns] W_rank^T. Input split; output replicated."""

    def __init__(self, full: nn.Linear, tp: TensorParallel):
        super().__init__()
        self.tp = tp
        self.weight = _shard(full.weight, 1, tp)

    def forward(self, x):
        return _ReduceFromTensorParallel.apply(F.linear(x, self.weight), self.tp.group)


class VocabParallelEmbedding(nn.Module):
    """Each rank holds a contiguous block of vocabulary rows; tokens outside it contribute zeros to the sum."""

    def __init__(self, full: nn.Embedding, tp: TensorParallel):
        super().__init__()
        self.tp = tp
        self.weight = _shard(full.weight, 0, tp)
        self.vocab_start = tp.rank * self.weight.shape[0]

    def forward(self, tokens):
        local = tokens - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return _ReduceFromTensorParallel.apply(out, self.tp.group)


def vocab_parallel_cross_entropy_sum(logits, targets, vocab_size, ignore_index, *, tp: TensorParallel):
    """Summed cross-entropy of (N, padded_vocab / world) logit shards, in fp32: the softmax normaliser and the
    target logit are assembled with two all-reduces of N numbers each instead of gathering N x vocab."""
    shard = logits.shape[-1]
    start = tp.rank * shard
    logits = logits.float()
    if start + shard > vocab_size:  # padded vocabulary rows never take part in the softmax
        padded = torch.arange(start, start + shard, device=logits.device) >= vocab_size
        logits = logits.masked_fill(padded, float("-inf"))
    # The shift only keeps exp() finite; it cancels exactly, so it carries no gradient.
    shift = logits.detach().max(dim=-1).values
    dist.all_reduce(shift, op=dist.ReduceOp.MAX, group=tp.group)
    sum_exp = _ReduceFromTensorParallel.apply((logits - shift.unsqueeze(-1)).exp().sum(-1), tp.group)
    local_t = targets - start
    mine = (local_t >= 0) & (local_t < shard)
    picked = logits.gather(-1, local_t.clamp(0, shard - 1).unsqueeze(-1)).squeeze(-1)
    target_logit = _ReduceFromTensorParallel.apply(torch.where(mine, picked, 0.0), tp.group)
    loss = sum_exp.log() + shift - target_logit
    return torch.where(targets != ignore_index, loss, 0.0).sum()


def vocab_parallel_greedy_tokens(logits, vocab_size, *, tp: TensorParallel):
    """Every position's greedy token from (..., padded_vocab / world) logit shards: each rank's best token and
    its logit, then the best over the ranks, with two all-gathers of N numbers instead of gathering N x vocab.
    A tie goes to the lowest token, as argmax over the whole vocabulary does (shards are in vocabulary order)."""
    shard = logits.shape[-1]
    start = tp.rank * shard
    logits = logits.float()
    if start + shard > vocab_size:  # padded vocabulary rows are never a token
        padded = torch.arange(start, start + shard, device=logits.device) >= vocab_size
        logits = logits.masked_fill(padded, float("-inf"))
    best, token = logits.max(dim=-1)
    bests = [torch.empty_like(best) for _ in range(tp.world)]
    tokens = [torch.empty_like(token) for _ in range(tp.world)]
    dist.all_gather(bests, best.contiguous(), group=tp.group)
    dist.all_gather(tokens, (token + start).contiguous(), group=tp.group)
    winner = torch.stack(bests).argmax(dim=0, keepdim=True)  # the first, i.e. lowest, shard among equals
    return torch.stack(tokens).gather(0, winner).squeeze(0)


def parallelize_block(block, tp: TensorParallel) -> None:
    """Split one TransformerBlock in place."""
    attn, ffn = block.attention, block.feed_forward
    for name in ("wq", "wk", "wv"):
        setattr(attn, name, ColumnParallelLinear(getattr(attn, name), tp, copy_input=False))
    attn.wo = RowParallelLinear(attn.wo, tp)
    ffn.w1 = ColumnParallelLinear(ffn.w1, tp, copy_input=False)
    ffn.w3 = ColumnParallelLinear(ffn.w3, tp, copy_input=False)
    ffn.w2 = RowParallelLinear(ffn.w2, tp)

    # One all-reduce of the input gradient per sub-layer, as Megatron's fused QKV and h-to-4h layers have;
    # a forward pre-hook keeps the model's module tree (and so its parameter names) unchanged.
    def copy_input(module, args):
        return (_CopyToTensorParallel.apply(args[0], tp.group), *args[1:])

    attn.register_forward_pre_hook(copy_input)
    ffn.register_forward_pre_hook(copy_input)


def parallelize_unembedding(model, tp: TensorParallel, tied_weight: nn.Parameter | None = None) -> None:
    """The shared unembedding as vocabulary shards, and the model's loss as the vocabulary-parallel one."""
    model.output = ColumnParallelLinear(model.output, tp, weight=tied_weight)
    model.loss.cross_entropy = functools.partial(vocab_parallel_cross_entropy_sum, tp=tp)
    model.loss.greedy = functools.partial(vocab_parallel_greedy_tokens, tp=tp)


def apply_tensor_parallel(model, tp: TensorParallel):
    """Split an MTPTransformer in place across tp.world ranks; returns it. No-op for a world of one.

    A model built under ZeRO-3's zero.Init is cut one module at a time: the module's weights are gathered, cut,
    and the new shards partitioned over the data-parallel ranks at once, so a rank never holds more than one
    module's full weights besides its partitions."""
    if tp.world == 1:
        return model
    import deepspeed

    gathered = deepspeed.zero.GatheredParameters  # a no-op on parameters that are not partitioned
    zero_param = model.norm.weight if hasattr(model.norm.weight, "ds_id") else None  # replicated: never replaced

    def partition_new_shards(module):
        # What deepspeed.initialize would do to them later, done now: any partitioned parameter converts others.
        if zero_param is not None:
            zero_param.convert_to_zero_parameters(param_list=[p for p in module.parameters() if not hasattr(p, "ds_id")])

    for block in [*model.layers, *model.extra_heads]:
        with gathered(list(block.parameters())):
            parallelize_block(block, tp)
        partition_new_shards(block)
    with gathered([model.tok_embeddings.weight]):
        model.tok_embeddings = VocabParallelEmbedding(model.tok_embeddings, tp)
    partition_new_shards(model.tok_embeddings)
    tied = model.tok_embeddings.weight if model.cfg.tie_embeddings else None
    with gathered([] if tied is not None else [model.output.weight]):  # tied: the old embedding, dropped unread
        parallelize_unembedding(model, tp, tied)
    partition_new_shards(model.output)
    return model


def gather_full_state_dict(module: nn.Module, tp: TensorParallel, keep: bool = True,
                           master: Callable[[nn.Parameter], torch.Tensor | None] | None = None
                           ) -> dict[str, torch.Tensor]:
    """Collective over the tensor-parallel group (and, under ZeRO-3, the data-parallel group): the module's
    state dict with every shard re-assembled (on CPU); ranks with keep=False only take part and return {}.
    ZeRO-3 partitions are gathered one parameter at a time, so no rank holds the whole model on the device.
    master(p), where given: the optimizer's fp32 master of p (the rank's tensor shard), to take in place of its
    bf16/fp16 working copy (pretrain/engine.py's fp32_master; collective over the data-parallel group under
    ZeRO-1/2)."""
    import deepspeed

    out = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        with deepspeed.zero.GatheredParameters([p]):
            t = master(p) if master is not None else None
            t = p.detach() if t is None else t
            if tp.world > 1 and getattr(p, "tensor_model_parallel", False):
                parts = [torch.empty_like(t) for _ in range(tp.world)]
                dist.all_gather(parts, t.contiguous(), group=tp.group)
                t = torch.cat(parts, dim=p.partition_dim)
            if keep:
                out[name] = t.cpu().clone()
    return out


def merge_tensor_parallel_shards(shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Offline: state dicts of tensor-parallel ranks 0..world-1 -> one full state dict (split by name)."""
    merged = {}
    for name, first in shards[0].items():
        dim = partition_dim(name) if len(shards) > 1 else None
        merged[name] = first if dim is None else torch.cat([sd[name] for sd in shards], dim=dim)
    return merged
