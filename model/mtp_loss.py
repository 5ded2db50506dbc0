"""Multi-token prediction losses: the naive reference and the sequential, chunked path, held by one MTPLoss
object that the model owns (and that the pipeline's last stage shares).

The naive path computes every head's logits at once and leaves the backward to autograd; its peak
memory grows as n * tokens * vocabulary.

The sequential path is the paper's (Sec. 2, Fig. 2) and goes one step further. The trunk output h
is detached; each head in turn runs its block forward, then its cross-entropy chunk by chunk over
tokens (the unembedding of one chunk, its loss and its backward, as Liger-Kernel's fused linear
cross-entropy does), then its block backward, which adds into dL/dh. All of that happens inside the
forward of one autograd node, so the caller sees a single loss and a single backward: the node's
backward hands dL/dh to the trunk. Peak memory is one head's activations plus one chunk's logits,
whatever n is.

The contract of the sequential path, since head gradients exist before the caller's backward runs:
- The caller says in advance which factor its backward will apply to the loss (`grad_scale`: 1 / gradient
  accumulation steps, times any fp16 loss scale). The node's backward checks that the factor it receives is
  that one and raises otherwise, since parameter gradients would then be silently wrong.
- Head gradients are written only by a forward in training mode with grad enabled. In eval() mode (or under
  no_grad) the forward computes losses only and leaves every gradient alone; back-propagating such a loss
  raises, naming the mode, instead of training the trunk alone.
- The order is forward, backward, optimizer step, and zero_grad before the next forward. A loop that clears
  gradients between the forward and its backward (forward; zero_grad(); backward()) would drop every head,
  norm and unembedding gradient; the node's backward sees that the gradients the forward wrote are gone and
  raises with the reason instead of returning a trunk-only gradient. Under DeepSpeed the engine owns the
  gradients (ZeRO reduces and frees them as soon as they are ready, before the backward) and always runs
  that order, so the engine seam turns this check off (MTPLoss.engine_owns_grads).
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


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

    MTPLoss's default cross_entropy; tensor parallelism swaps in a vocabulary-parallel one.
    """
    return F.cross_entropy(logits[:, :vocab_size].float(), targets, ignore_index=ignore_index, reduction="sum")


def greedy_tokens(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Every position's greedy token from (..., padded_vocab) logits; padded vocabulary rows are excluded.

    MTPLoss's default greedy; tensor parallelism swaps in a vocabulary-parallel one.
    """
    return logits[..., :vocab_size].argmax(-1)


class LossHeads(Protocol):
    """What MTPLoss needs of the module holding the heads: the model, or the pipeline's last stage."""

    cfg: ModelConfig
    norm: nn.Module  # the shared final norm (has .weight)
    output: nn.Module  # the shared unembedding (has .weight), padded vocabulary rows included
    training: bool

    def head_forward(self, k: int, h: torch.Tensor, rope) -> torch.Tensor:
        """Head k's block (0-based: 0 predicts the next token) on the trunk output h, before the norm."""


class MTPLoss:
    """The MTP loss of a model: which implementation, its chunk size, the cross-entropy, the grad-ready hook.

    impl: "sequential" (memory-flat in n, the default) or "naive" (all logits at once, the reference).
    chunk_tokens: tokens per cross-entropy chunk of the sequential path; None picks default_chunk_tokens.
    cross_entropy: (padded logits, targets, vocab_size, ignore_index) -> summed loss; tensor parallelism swaps in
        the vocabulary-parallel one.
    greedy: (padded logits, vocab_size) -> greedy tokens, for draft acceptance; likewise swapped.
    grad_ready_hook: called as hook(params, ready) around the sequential heads' inner backward passes, so a
        data-parallel engine reduces the shared norm's and unembedding's gradients only after their last
        contribution; set by the DeepSpeed engine seam.
    engine_owns_grads: set by the engine seam; turns off the check for gradients cleared between the forward
        and its backward (see the module's docstring).
    defer_scale_check: set by a training loop that calls check_grad_scale() at its log steps. The sequential
        backward must see the loss scaled by the grad_scale its forward applied to the head gradients; reading
        the scale it received makes the host wait for the device inside the step, so with this set the
        comparison stays on the device and check_grad_scale() raises the same error later.
    """

    def __init__(self, impl: str = "sequential", chunk_tokens: int | None = None):
        self.impl, self.chunk_tokens = impl, chunk_tokens
        self.cross_entropy = cross_entropy_sum
        self.greedy = greedy_tokens
        self.grad_ready_hook = None
        self.engine_owns_grads = False
        self._written = None  # (norm weight's .grad, its version) after the last forward that wrote head gradients
        self.defer_scale_check = False
        self._scale_mismatch = None  # deferred: (received, told) of the last mismatched backward, NaN if none

    def _check_scale(self, grad_total: torch.Tensor, told: float) -> None:
        received = grad_total.detach().float()
        if not self.defer_scale_check:
            _raise_if_scale_differs(float(received), told)
            return
        told_t = torch.full_like(received, told)  # a fill, not a copy from the host
        bad = (received - told_t).abs() > 1e-5 * torch.maximum(received.abs(), told_t.abs())  # math.isclose's test
        seen = self._scale_mismatch if self._scale_mismatch is not None else torch.full_like(received, math.nan)
        self._scale_mismatch = torch.where(bad, torch.stack([received, told_t]), seen)

    def check_grad_scale(self) -> None:
        """Raises if a backward since the last call scaled the loss by other than its forward's grad_scale (with
        defer_scale_check; one read of the device)."""
        if self._scale_mismatch is not None:
            received, told = self._scale_mismatch.tolist()
            self._scale_mismatch = None
            if not math.isnan(received):
                _raise_if_scale_differs(received, told)

    @property
    def impl(self) -> str:
        return self._impl

    @impl.setter
    def impl(self, impl: str) -> None:
        if impl not in ("sequential", "naive"):
            raise ValueError(f"loss_impl must be 'sequential' or 'naive', got {impl!r}")
        self._impl = impl

    def __call__(self, heads: LossHeads, h, rope, labels, grad_scale: float = 1.0, argmax_out=None):
        """(weighted total, per-head mean losses) of every head on the trunk output h (B, T, dim).

        argmax_out: None, or an (n, B, T) long tensor that receives every head's greedy token at every position
        (validation's draft acceptance: one argmax per head per token over logits the loss computes anyway). The
        logits must hold the whole vocabulary: not with tensor parallelism, whose logits are vocabulary shards."""
        cfg = heads.cfg
        if self.impl == "naive":
            return self.naive(heads, self.logits(heads, h, rope, cfg.n_future_tokens), labels, argmax_out)
        targets = head_targets(labels, h.shape[1], cfg.n_future_tokens, cfg.ignore_index)
        return _SequentialHeads.apply(h, heads, self, rope, targets, float(grad_scale), torch.is_grad_enabled(),
                                      argmax_out)

    @staticmethod
    def logits(heads: LossHeads, h, rope, n: int) -> torch.Tensor:
        """(n, B, T, padded V) logits of heads 1..n on the trunk output h, all at once (the naive path)."""
        return torch.stack([heads.output(heads.norm(heads.head_forward(k, h, rope))) for k in range(n)])

    def naive(self, heads: LossHeads, padded_logits: torch.Tensor, labels: torch.Tensor, argmax_out=None):
        """padded_logits (n, B, T, padded V) and labels as in __call__ -> (weighted total, per-head mean losses)."""
        cfg = heads.cfg
        targets = head_targets(labels, padded_logits.shape[2], cfg.n_future_tokens, cfg.ignore_index)
        if argmax_out is not None:
            argmax_out.copy_(self.greedy(padded_logits.detach(), cfg.vocab_size))
        head_losses = []
        total = padded_logits.new_zeros((), dtype=torch.float32)
        for k in range(padded_logits.shape[0]):
            valid = (targets[k] != cfg.ignore_index).sum()
            loss_sum = self.cross_entropy(padded_logits[k].flatten(0, 1), targets[k].flatten(), cfg.vocab_size,
                                          cfg.ignore_index)
            loss_k = loss_sum / valid.clamp(min=1)
            head_losses.append(loss_k.detach())
            total = total + cfg.loss_weights[k] * loss_k
        return total, torch.stack(head_losses)

    def _set_ready(self, params, ready: bool) -> None:
        if self.grad_ready_hook is not None:
            self.grad_ready_hook(params, ready)

    def _record_written(self, norm_w) -> None:
        self._written = (norm_w.grad, norm_w.grad._version) if norm_w.grad is not None else None

    def _check_written(self, norm_w, written) -> None:
        # The norm weight stands for every head parameter: only the heads write its gradient, every head does,
        # and whatever clears gradients clears it with the rest.
        if self.engine_owns_grads or written is None:
            return
        grad, latest = norm_w.grad, self._written  # latest: after any later forward that accumulated into them
        if grad is None or grad is not written[0] or latest[0] is not grad or grad._version != latest[1]:
            raise RuntimeError(
                "sequential MTP loss: the head, norm and unembedding gradients this forward computed were "
                "cleared before its backward (zero_grad() between the forward and backward()?); the backward "
                "would train the trunk alone. Call zero_grad() before the forward (or after the optimizer "
                "step), or use loss_impl='naive'.")


def _raise_if_scale_differs(received: float, told: float) -> None:
    if not math.isclose(received, told, rel_tol=1e-5):
        raise RuntimeError(
            f"sequential MTP loss: the backward scaled the loss by {received:g} but the forward was told "
            f"grad_scale={told:g}; head gradients were computed with the latter. Pass "
            f"grad_scale = (loss scale) / (gradient accumulation steps) to the model's forward, or use "
            f"loss_impl='naive'."
        )


def default_chunk_tokens(n_tokens: int, dim: int, vocab: int, min_chunk: int = 1024) -> int:
    """Liger-Kernel's rule (one chunk's logits about as large as the hidden states), but never below
    min_chunk tokens: every chunk re-reads and re-writes the whole unembedding gradient (vocab x dim),
    so tiny chunks turn the loss memory-bound. 1024 tokens keep that traffic a few percent of the matmuls."""
    n_chunks = max(1, math.ceil(vocab / dim))
    liger = 1 << math.ceil(math.log2(max(1, math.ceil(n_tokens / n_chunks))))
    return max(1, min(n_tokens, max(liger, min_chunk)))


class _SequentialHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, heads, loss, rope, targets, grad_scale, grad_enabled, argmax_out):
        # Function.forward always runs under no_grad; grad_enabled is the caller's mode.
        wants_grad = h.requires_grad and grad_enabled
        needs_grad = wants_grad and heads.training
        h_leaf = h.detach().requires_grad_(needs_grad)
        with torch.set_grad_enabled(needs_grad):
            head_losses, wrote = _run_heads(heads, loss, h_leaf, rope, targets, grad_scale, needs_grad, argmax_out)
        if wrote:
            loss._record_written(heads.norm.weight)
        weights = torch.tensor(heads.cfg.loss_weights, dtype=torch.float32, device=h.device)
        total = (weights * head_losses).sum()
        ctx.grad_scale, ctx.heads, ctx.loss = grad_scale, heads, loss
        ctx.eval_mode = wants_grad and not heads.training
        ctx.written = loss._written if wrote else None
        grad_h = h_leaf.grad if h_leaf.grad is not None else torch.zeros_like(h_leaf)
        ctx.save_for_backward(grad_h if needs_grad else None)
        ctx.mark_non_differentiable(head_losses)
        return total, head_losses

    @staticmethod
    def backward(ctx, grad_total, _grad_heads):
        (grad_h,) = ctx.saved_tensors
        if ctx.eval_mode:
            raise RuntimeError(
                "sequential MTP loss: this loss was computed in eval() mode, which computes losses only (no head "
                "gradients); call model.train() before a forward whose loss is back-propagated, or run "
                "evaluation under torch.no_grad().")
        ctx.loss._check_scale(grad_total, ctx.grad_scale)
        ctx.loss._check_written(ctx.heads.norm.weight, ctx.written)
        return grad_h, None, None, None, None, None, None, None


def _run_heads(heads, loss, h_leaf, rope, targets, grad_scale, needs_grad, argmax_out=None):
    """Per-head mean losses, and whether any head gradient was written."""
    cfg = heads.cfg
    n = targets.shape[0]
    weights = cfg.loss_weights
    norm_w, out_w = heads.norm.weight, heads.output.weight
    # A tied unembedding gets its last gradient from the embedding, in the trunk's backward.
    out_last_use_here = not cfg.tie_embeddings
    n_tokens = targets[0].numel()
    chunk = loss.chunk_tokens or default_chunk_tokens(n_tokens, cfg.dim, cfg.padded_vocab_size)
    # Counts stay on the device (no host synchronisation inside the step): a head whose targets are all masked
    # gets coefficient weight / 1 on a loss and gradients of zero.
    valid = (targets != cfg.ignore_index).flatten(1).sum(1).clamp(min=1)
    coefs = torch.tensor(weights, dtype=torch.float32, device=h_leaf.device) / valid
    # Shared parameters may be reduced only after their last gradient: in the last head that has one.
    last_active = max((k for k in range(n) if weights[k] > 0), default=-1)
    head_losses = []
    for k in range(n):
        last_head, coef, active = k == last_active, coefs[k], weights[k] > 0
        tgt = targets[k].reshape(-1)
        z = heads.norm(heads.head_forward(k, h_leaf, rope)).reshape(n_tokens, -1)
        z_detached = z.detach()
        grad_z = torch.zeros_like(z) if needs_grad else None
        loss_sum = torch.zeros((), dtype=torch.float32, device=h_leaf.device)
        starts = range(0, n_tokens, chunk)
        for i, s in enumerate(starts):
            e = min(s + chunk, n_tokens)
            z_chunk = z_detached[s:e].requires_grad_(needs_grad)
            logits = heads.output(z_chunk)
            chunk_loss = loss.cross_entropy(logits, tgt[s:e], cfg.vocab_size, cfg.ignore_index)
            loss_sum += chunk_loss.detach()
            if argmax_out is not None:
                argmax_out[k].view(-1)[s:e] = loss.greedy(logits.detach(), cfg.vocab_size)
            if needs_grad and active:
                loss._set_ready([out_w], out_last_use_here and last_head and i == len(starts) - 1)
                torch.autograd.backward(chunk_loss * (coef * grad_scale))
                grad_z[s:e] = z_chunk.grad
            del logits, chunk_loss
        if needs_grad and active:
            loss._set_ready([norm_w], last_head)
            torch.autograd.backward(z, grad_z)
        head_losses.append(loss_sum / valid[k])
        del z, z_detached, grad_z
    if needs_grad:
        loss._set_ready([norm_w, out_w], True)
    return torch.stack(head_losses), needs_grad and last_active >= 0
