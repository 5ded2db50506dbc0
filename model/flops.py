"""Parameter and FLOP counts, trunk and heads separately, for throughput and MFU logging.

FLOPs count multiply-adds as 2 and follow the PaLM/Megatron convention: matmul FLOPs of every linear layer
plus attention scores (QK^T and AV, without the causal halving); a training step costs 3x the forward.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import ModelConfig


def block_params(cfg: ModelConfig) -> int:
    attn = cfg.dim * cfg.head_dim * (cfg.n_heads + 2 * cfg.kv_heads) + cfg.n_heads * cfg.head_dim * cfg.dim
    ffn = 3 * cfg.dim * cfg.ffn_hidden_dim
    norms = 2 * cfg.dim
    return attn + ffn + norms


@dataclass
class ParamCounts:
    embedding: int
    trunk_blocks: int  # the shared blocks before the heads
    heads: int  # n head blocks (head 1 is the main stack's last block)
    shared_head: int  # final norm + unembedding (zero extra if tied to the embedding)
    total: int


def count_params(cfg: ModelConfig) -> ParamCounts:
    vocab = cfg.padded_vocab_size
    embedding = vocab * cfg.dim
    trunk = cfg.n_trunk_layers * block_params(cfg)
    heads = cfg.n_future_tokens * block_params(cfg)
    shared = cfg.dim + (0 if cfg.tie_embeddings else vocab * cfg.dim)
    return ParamCounts(embedding, trunk, heads, shared, embedding + trunk + heads + shared)


@dataclass
class FlopCounts:
    trunk_forward: float  # per token
    heads_forward: float  # per token, all n heads with their unembedding
    training: float  # per token, forward + backward of everything (3x forward)


def flops_per_token(cfg: ModelConfig, seq_len: int, n_heads_used: int | None = None) -> FlopCounts:
    n = cfg.n_future_tokens if n_heads_used is None else n_heads_used
    linear = block_params(cfg) - 2 * cfg.dim  # norm weights do no matmul
    attention = 2 * 2 * seq_len * cfg.n_heads * cfg.head_dim  # scores and weighted values
    per_block = 2 * linear + attention
    unembed = 2 * cfg.dim * cfg.padded_vocab_size
    trunk = cfg.n_trunk_layers * per_block
    heads = n * (per_block + unembed)
    return FlopCounts(trunk, heads, 3.0 * (trunk + heads))
