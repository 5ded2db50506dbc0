"""Multi-token prediction losses: the naive reference and the sequential, chunked path.

The naive path computes every head's logits at once and leaves the backward to autograd; its peak
memory grows as n * tokens * vocabulary.

The sequential path is the paper's (Sec. 2, Fig. 2) and goes one step further. The trunk output h
is detached; each head in turn runs its block forward, then its cross-entropy chunk by chunk over
tokens (the unembedding of one chunk, its loss and its backward, as Liger-Kernel's fused linear
cross-entropy does), then its block backward, which adds into dL/dh. All of that happens inside the
forward of one autograd node, so the caller sees a single loss and a single backward: the node's
backward hands dL/dh to the trunk. Peak memory is one head's activations plus one chunk's logits,
whatever n is.

Because head gradients are produced before the caller's backward runs, the caller must say in
advance which factor its backward will apply to the loss (`grad_scale`: 1 / gradient accumulation
steps, times any fp16 loss scale). The node's backward checks that the factor it receives is that
one and fails loudly otherwise, since parameter gradients would then be silently wrong.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def head_targets(labels: torch.Tensor, seq_len: int, n: int, ignore_index: int) -> torch.Tensor:
    """(n, B, T) targets: head k (0-based) at position t gets labels[:, t + k], or ignore_index past the end."""
    B, L = labels.shape
    need = seq_len + n - 1
    if L < need:
        pad = labels.new_full((B, need - L), ignore_index)
        labels = torch.cat([labels, pad], dim=1)
    return torch.stack([labels[:, k : k + seq_len] for k in range(n)])


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int, ignore_index: int):
    """Summed cross-entropy of (N, padded_vocab) logits, in fp32; padded vocabulary rows are excluded.

    This is the model's default `loss_fn`; tensor parallelism swaps in a vocabulary-parallel one.
    """
    return F.cross_entropy(logits[:, :vocab_size].float(), targets, ignore_index=ignore_index, reduction="sum")


def naive_mtp_loss(model, padded_logits: torch.Tensor, targets: torch.Tensor):
    """padded_logits (n, B, T, padded V), targets (n, B, T) -> (weighted total, per-head mean losses)."""
    cfg = model.cfg
    head_losses = []
    total = padded_logits.new_zeros((), dtype=torch.float32)
    for k in range(padded_logits.shape[0]):
        valid = (targets[k] != cfg.ignore_index).sum()
        loss_sum = model.loss_fn(padded_logits[k].flatten(0, 1), targets[k].flatten(), cfg.vocab_size, cfg.ignore_index)
        loss_k = loss_sum / valid.clamp(min=1)
        head_losses.append(loss_k.detach())
        total = total + cfg.loss_weights[k] * loss_k
    return total, torch.stack(head_losses)


def default_chunk_tokens(n_tokens: int, dim: int, vocab: int, min_chunk: int = 1024) -> int:
    """Liger-Kernel's rule (one chunk's logits about as large as the hidden states), but never below
    min_chunk tokens: every chunk re-reads and re-writes the whole unembedding gradient (vocab x dim),
    so tiny chunks turn the loss memory-bound. 1024 tokens keep that traffic a few percent of the matmuls."""
    n_chunks = max(1, math.ceil(vocab / dim))
    liger = 1 << math.ceil(math.log2(max(1, math.ceil(n_tokens / n_chunks))))
    return max(1, min(n_tokens, max(liger, min_chunk)))


class _SequentialHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, model, rope, targets, grad_scale, grad_enabled, argmax_out):
        # Function.forward always runs under no_grad; grad_enabled is the caller's mode.
        needs_grad = h.requires_grad and grad_enabled
        h_leaf = h.detach().requires_grad_(needs_grad)
        with torch.set_grad_enabled(needs_grad):
            head_losses = _run_heads(model, h_leaf, rope, targets, grad_scale, needs_grad, argmax_out)
        weights = torch.tensor(model.cfg.loss_weights, dtype=torch.float32, device=h.device)
        total = (weights * head_losses).sum()
        ctx.grad_scale = grad_scale
        grad_h = h_leaf.grad if h_leaf.grad is not None else torch.zeros_like(h_leaf)
        ctx.save_for_backward(grad_h if needs_grad else None)
        ctx.mark_non_differentiable(head_losses)
        return total, head_losses

    @staticmethod
    def backward(ctx, grad_total, _grad_heads):
        (grad_h,) = ctx.saved_tensors
        received = float(grad_total)
        if not math.isclose(received, ctx.grad_scale, rel_tol=1e-5):
            raise RuntimeError(
                f"sequential MTP loss: the backward scaled the loss by {received:g} but the forward was told "
                f"grad_scale={ctx.grad_scale:g}; head gradients were computed with the latter. Pass "
                f"grad_scale = (loss scale) / (gradient accumulation steps) to the model's forward, or use "
                f"loss_impl='naive'."
            )
        return grad_h, None, None, None, None, None, None


def padded_head_logits(heads, h, rope, n: int) -> torch.Tensor:
    """(n, B, T, padded V) logits of heads 1..n on the trunk output h, all at once (the naive path)."""
    return torch.stack([heads.output(heads.norm(heads.head_forward(k, h, rope))) for k in range(n)])


def mtp_loss(heads, h, rope, labels, loss_impl: str = "sequential", grad_scale: float = 1.0, argmax_out=None):
    """(weighted total, per-head mean losses) of every head on the trunk output h (B, T, dim).

    heads: the model, or anything with its head interface (cfg, head_forward, norm, output, loss_fn,
    ce_chunk_tokens, grad_ready_hook), such as the last stage of a pipeline.
    argmax_out: None, or an (n, B, T) long tensor that receives every head's greedy token at every position
    (validation's draft acceptance: one argmax per head per token over logits the loss computes anyway). The
    logits must hold the whole vocabulary: not with tensor parallelism, whose logits are vocabulary shards."""
    cfg = heads.cfg
    targets = head_targets(labels, h.shape[1], cfg.n_future_tokens, cfg.ignore_index)
    if loss_impl == "sequential":
        return sequential_mtp_loss(heads, h, rope, targets, grad_scale, argmax_out)
    padded_logits = padded_head_logits(heads, h, rope, cfg.n_future_tokens)
    if argmax_out is not None:
        argmax_out.copy_(padded_logits[..., : cfg.vocab_size].argmax(-1))
    return naive_mtp_loss(heads, padded_logits, targets)


def sequential_mtp_loss(model, h, rope, targets, grad_scale: float = 1.0, argmax_out=None):
    """Loss of all heads, computed and back-propagated one head at a time. Returns (total, head_losses)."""
    return _SequentialHeads.apply(h, model, rope, targets, float(grad_scale), torch.is_grad_enabled(), argmax_out)


def _set_ready(model, params, ready: bool) -> None:
    if model.grad_ready_hook is not None:
        model.grad_ready_hook(params, ready)


def _run_heads(model, h_leaf, rope, targets, grad_scale, needs_grad, argmax_out=None):
    cfg = model.cfg
    n = targets.shape[0]
    weights = cfg.loss_weights
    norm_w, out_w = model.norm.weight, model.output.weight
    # A tied unembedding gets its last gradient from the embedding, in the trunk's backward.
    out_last_use_here = not cfg.tie_embeddings
    n_tokens = targets[0].numel()
    chunk = model.ce_chunk_tokens or default_chunk_tokens(n_tokens, cfg.dim, cfg.padded_vocab_size)
    valid = [int((targets[k] != cfg.ignore_index).sum()) for k in range(n)]
    coefs = [weights[k] / max(valid[k], 1) if valid[k] else 0.0 for k in range(n)]
    # Shared parameters may be reduced only after their last gradient: in the last head that has one.
    last_active = max((k for k in range(n) if coefs[k] > 0), default=-1)
    head_losses = []
    for k in range(n):
        last_head, coef = k == last_active, coefs[k]
        tgt = targets[k].reshape(-1)
        z = model.norm(model.head_forward(k, h_leaf, rope)).reshape(n_tokens, -1)
        z_detached = z.detach()
        grad_z = torch.zeros_like(z) if needs_grad else None
        loss_sum = torch.zeros((), dtype=torch.float32, device=h_leaf.device)
        starts = range(0, n_tokens, chunk)
        for i, s in enumerate(starts):
            e = min(s + chunk, n_tokens)
            z_chunk = z_detached[s:e].requires_grad_(needs_grad)
            logits = model.output(z_chunk)
            chunk_loss = model.loss_fn(logits, tgt[s:e], cfg.vocab_size, cfg.ignore_index)
            loss_sum += chunk_loss.detach()
            if argmax_out is not None:
                argmax_out[k].view(-1)[s:e] = logits.detach()[:, : cfg.vocab_size].argmax(-1)
            if needs_grad and coef > 0:
                _set_ready(model, [out_w], out_last_use_here and last_head and i == len(starts) - 1)
                torch.autograd.backward(chunk_loss * (coef * grad_scale))
                grad_z[s:e] = z_chunk.grad
            del logits, chunk_loss
        if needs_grad and coef > 0:
            _set_ready(model, [norm_w], last_head)
            torch.autograd.backward(z, grad_z)
        head_losses.append(loss_sum / max(valid[k], 1))
        del z, z_detached, grad_z
    if needs_grad:
        _set_ready(model, [norm_w, out_w], True)
    return torch.stack(head_losses)
