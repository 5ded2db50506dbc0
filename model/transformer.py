"""A Llama-style decoder with multi-token prediction heads (Gloeckle et al. 2024).

Layout and weight names follow Meta's released MTP checkpoints:

    tok_embeddings -> layers[0 .. L-2]  (the shared trunk)
                   -> layers[L-1]       (head 1: next token)
                   -> extra_heads[j]    (head j+2: token t+j+2), each reading the trunk output
    every head     -> norm -> output    (one final norm and one unembedding shared by all heads)

With n_future_tokens = 1 there are no extra heads and this is a plain Llama model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from torch.utils.checkpoint import checkpoint

from .mtp_loss import MTPLoss


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_normalize(x, self.eps) * self.weight


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in fp32 (as Meta's reference does) and cast back, so bf16 runs stay stable.
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


def rotary_frequencies(cfg: ModelConfig, device=None) -> torch.Tensor:
    """The rotation frequency of each channel pair, (head_dim/2,) in fp32, with cfg.rope_scaling applied
    (computed in the order transformers' Llama does, so an export reproduces our logits)."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d))
    s = cfg.rope_scaling
    if s.rope_type == "default":
        return inv_freq
    if s.rope_type == "linear":
        return inv_freq / s.factor
    # llama3: long wavelengths (slow pairs, which encode far positions) are stretched by `factor`, short ones
    # (local detail) are kept, and those between are blended by where their wavelength falls.
    wavelen = 2 * math.pi / inv_freq
    context = s.original_max_position_embeddings
    smooth = (context / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    scaled = torch.where(wavelen > context / s.low_freq_factor, inv_freq / s.factor, inv_freq)
    between = (wavelen >= context / s.high_freq_factor) & (wavelen <= context / s.low_freq_factor)
    return torch.where(between, (1 - smooth) * scaled / s.factor + smooth * scaled, scaled)


def rotary_tables(positions: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape (B or 1, T, head_dim/2) for integer positions of shape (B or 1, T)."""
    angles = positions.to(torch.float32).unsqueeze(-1) * rotary_frequencies(cfg, positions.device)
    return angles.cos(), angles.sin()


def rope_for(x: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin for positions 0 .. T-1 of a sequence x of shape (B, T, ...): what a training forward uses."""
    return rotary_tables(torch.arange(x.shape[1], device=x.device).unsqueeze(0), cfg)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x0, x1), (x2, x3), ... as Meta's complex-number formulation does.

    x: (B, T, H, D); cos/sin: (B or 1, T, D/2). Hugging Face's Llama rotates halves instead, which is
    why the export permutes the rows of wq and wk.
    """
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


# Every weight is initialised inside the __init__ of the module that owns it (nn.Linear and nn.Embedding call
# reset_parameters there). DeepSpeed's zero.Init partitions a module's parameters the moment its __init__
# returns, so anything set afterwards, from outside, would be lost on a ZeRO-3 construction. Every module that
# owns parameters can redo that initialisation with reset_parameters(), drawing the same random numbers when
# called in construction order: a model built on the meta device is initialised that way
# (pretrain/parallel/lean_init.py).


class Linear(nn.Linear):
    """Bias-free, weights drawn from N(0, std); rows from `zero_rows_from` on are zero (padded vocabulary)."""

    def __init__(self, in_dim: int, out_dim: int, std: float, zero_rows_from: int | None = None):
        self.std, self.zero_rows_from = std, zero_rows_from
        super().__init__(in_dim, out_dim, bias=False)

    def reset_parameters(self) -> None:
        normal_init_(self.weight, self.std, self.zero_rows_from)


class Embedding(nn.Embedding):
    """Token embedding drawn from N(0, std); rows from `zero_rows_from` on are zero (padded vocabulary)."""

    def __init__(self, num_embeddings: int, dim: int, std: float, zero_rows_from: int | None = None):
        self.std, self.zero_rows_from = std, zero_rows_from
        super().__init__(num_embeddings, dim)

    def reset_parameters(self) -> None:
        normal_init_(self.weight, self.std, self.zero_rows_from)


def normal_init_(weight: torch.Tensor, std: float, zero_rows_from: int | None) -> None:
    with torch.no_grad():
        nn.init.normal_(weight, 0.0, std)
        if zero_rows_from is not None:  # padded vocabulary rows are never used; zeros make exports round-trip
            weight[zero_rows_from:].zero_()


def residual_std(cfg: ModelConfig) -> float:
    """GPT-2/Megatron: output projections into the residual stream get std / sqrt(2 * depth)."""
    return cfg.init_std / (2 * cfg.n_layers) ** 0.5


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.head_dim = cfg.head_dim  # head counts follow from the weights' shapes, which tensor parallelism splits
        self.wq = Linear(cfg.dim, cfg.n_heads * cfg.head_dim, cfg.init_std)
        self.wk = Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, cfg.init_std)
        self.wv = Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, cfg.init_std)
        self.wo = Linear(cfg.n_heads * cfg.head_dim, cfg.dim, residual_std(cfg))

    def forward(self, x, rope, cache=None, attn_mask=None):
        """cache, when given, has `update(k, v) -> (k_all, v_all)` and then attn_mask must be given
        (boolean, True where attention is allowed, shape broadcastable to (B, H, T, S))."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, -1, self.head_dim)
        k = self.wk(x).view(B, T, -1, self.head_dim)
        v = self.wv(x).view(B, T, -1, self.head_dim)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        out = attend(*(t.transpose(1, 2) for t in (q, k, v)), cache, attn_mask)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


def attend(q, k, v, cache=None, attn_mask=None) -> torch.Tensor:
    """Causal attention of q (B, heads, T, D) over k, v (B, kv_heads, T, D), after the cache's past keys and
    values when a cache is given (then attn_mask must be given too)."""
    rep = q.shape[1] // k.shape[1]  # grouped-query attention: each key/value head serves rep query heads
    if cache is not None:
        k, v = cache.update(k, v)
        # Decoding: fold the rep query heads of each key/value head into the query length, so the cache is read
        # in place rather than copied rep times at every step (and every SDPA backend, masked ones too, takes it).
        B, H, T, D = q.shape
        mask = attn_mask.repeat(1, 1, rep, 1) if rep > 1 else attn_mask
        out = F.scaled_dot_product_attention(q.reshape(B, H // rep, rep * T, D), k, v, attn_mask=mask)
        return out.reshape(B, H, T, D)
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    if attn_mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = Linear(cfg.dim, cfg.ffn_hidden_dim, cfg.init_std)
        self.w2 = Linear(cfg.ffn_hidden_dim, cfg.dim, residual_std(cfg))
        self.w3 = Linear(cfg.dim, cfg.ffn_hidden_dim, cfg.init_std)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)
        # Set from outside to recompute part of the block in backward (selective activation checkpointing):
        # called as recompute(fn, x, rope) -> fn(x, rope), in training forwards only (grad on, no KV cache).
        self.recompute = None

    def forward(self, x, rope, cache=None, attn_mask=None):
        if self.recompute is not None and cache is None and attn_mask is None and torch.is_grad_enabled():
            return self.recompute(self._forward, x, rope)
        return self._forward(x, rope, cache, attn_mask)

    def _forward(self, x, rope, cache=None, attn_mask=None):
        x = x + self.attention(self.attention_norm(x), rope, cache, attn_mask)
        return x + self.feed_forward(self.ffn_norm(x))


def _run_blocks(blocks, h, cos, sin):
    for block in blocks:
        h = block(h, (cos, sin))
    return h


def apply_activation_checkpointing(model: "MTPTransformer", interval: int = 1) -> int:
    """Turn on a built model's activation_checkpoint_interval option; returns the number of recomputed units."""
    model.activation_checkpoint_interval = interval
    return -(-model.cfg.n_trunk_layers // interval)


@dataclass
class MTPOutput:
    loss: torch.Tensor | None = None  # weighted sum of the head losses (what is back-propagated)
    head_losses: torch.Tensor | None = None  # (n,) mean cross-entropy of each head, detached
    logits: torch.Tensor | None = None  # (B, T, V) for head 1, or (n, B, T, V) with all_heads=True
    head_argmax: torch.Tensor | None = None  # (n, B, T) every head's greedy token, with head_argmax=True


class MTPTransformer(nn.Module):
    """The model. Options besides the shape:

    loss_impl, ce_chunk_tokens: the MTP loss (`self.loss`, an MTPLoss: sequential or naive, chunk size); tensor
        parallelism swaps its cross-entropy and a data-parallel engine sets its grad-ready hook.
    activation_checkpoint_interval: 0 keeps every activation; k > 0 recomputes the trunk in backward in units of
        k consecutive blocks (only each unit's input is kept; one unit's activations are alive at a time in the
        backward; about sqrt(blocks) minimises memory). Training forwards only (grad enabled, no KV cache);
        non-reentrant torch.utils.checkpoint, so it composes with ZeRO-3's parameter hooks, and parameter names
        are unchanged. The heads are never recomputed: the sequential loss keeps one head's activations alive
        at a time anyway.
    """

    def __init__(self, cfg: ModelConfig, loss_impl: str = "sequential", ce_chunk_tokens: int | None = None,
                 activation_checkpoint_interval: int = 0):
        super().__init__()
        self.cfg = cfg
        self.loss = MTPLoss(loss_impl, ce_chunk_tokens)
        self.activation_checkpoint_interval = activation_checkpoint_interval
        vocab = cfg.padded_vocab_size
        self.tok_embeddings = Embedding(vocab, cfg.dim, cfg.init_std, zero_rows_from=cfg.vocab_size)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_main_layers))
        self.extra_heads = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_future_tokens - 1))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = Linear(cfg.dim, vocab, cfg.init_std, zero_rows_from=cfg.vocab_size)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    @property
    def n_future_tokens(self) -> int:
        return self.cfg.n_future_tokens

    @property
    def loss_impl(self) -> str:
        return self.loss.impl

    @loss_impl.setter
    def loss_impl(self, impl: str) -> None:
        self.loss.impl = impl

    @property
    def ce_chunk_tokens(self) -> int | None:
        return self.loss.chunk_tokens

    @ce_chunk_tokens.setter
    def ce_chunk_tokens(self, tokens: int | None) -> None:
        self.loss.chunk_tokens = tokens

    def head_block(self, k: int) -> TransformerBlock:
        """The transformer block of head k (0-based: 0 predicts the next token)."""
        return self.layers[-1] if k == 0 else self.extra_heads[k - 1]

    def rope(self, positions: torch.Tensor):
        return rotary_tables(positions, self.cfg)

    def trunk(self, tokens, rope, caches=None, attn_mask=None):
        """Embedding and the shared blocks; returns the input of every head's block."""
        h = self.tok_embeddings(tokens)
        blocks = self.layers[:-1]
        interval = self.activation_checkpoint_interval
        if interval and caches is None and attn_mask is None and torch.is_grad_enabled():
            for start in range(0, len(blocks), interval):
                h = checkpoint(_run_blocks, blocks[start:start + interval], h, *rope, use_reentrant=False)
            return h
        for i, layer in enumerate(blocks):
            h = layer(h, rope, None if caches is None else caches[i], attn_mask)
        return h

    def head_forward(self, k, h, rope, cache=None, attn_mask=None):
        """Head k's block on the trunk output, before the shared norm."""
        return self.head_block(k)(h, rope, cache, attn_mask)

    def unembed(self, x: torch.Tensor) -> torch.Tensor:
        """Shared norm and unembedding; padded vocabulary rows are sliced off."""
        return self.output(self.norm(x))[..., : self.cfg.vocab_size]

    def forward(self, tokens, labels=None, *, all_heads: bool = False, return_logits: bool | None = None,
                grad_scale: float = 1.0, head_argmax: bool = False) -> MTPOutput:
        """tokens: (B, T) inputs. labels: (B, >= T) where labels[:, j] is the token after position j, so head k
        (1-based) at position t is trained on labels[:, t + k - 1]; positions past the end of labels, and
        labels equal to ignore_index, are masked. A sample of seq_len + n tokens gives every head a target.

        grad_scale: the factor the caller's backward will apply to the loss (1 / gradient accumulation steps,
        times the fp16 loss scale). The sequential path computes head gradients inside this call and needs it.
        head_argmax: with labels, also every head's greedy token at every position (draft acceptance at
        validation, inference/acceptance.py), taken from the logits the loss computes.
        """
        B, T = tokens.shape
        rope = rope_for(tokens, self.cfg)
        h = self.trunk(tokens, rope)
        if return_logits is None:
            return_logits = labels is None
        out = MTPOutput()
        n_heads = self.n_future_tokens if (all_heads or labels is not None) else 1

        if head_argmax and labels is not None:
            out.head_argmax = torch.empty(self.n_future_tokens, B, T, dtype=torch.long, device=tokens.device)
        if labels is not None and not return_logits:
            out.loss, out.head_losses = self.loss(self, h, rope, labels, grad_scale, out.head_argmax)
            return out

        padded_logits = self.loss.logits(self, h, rope, n_heads)
        if labels is not None:
            out.loss, out.head_losses = self.loss.naive(self, padded_logits, labels, out.head_argmax)
        if return_logits:
            logits = padded_logits[..., : self.cfg.vocab_size]
            out.logits = logits if all_heads else logits[0]
        return out
