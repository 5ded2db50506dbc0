"""Model shape, laid out like Meta's params.json for its multi-token prediction checkpoints."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type, or impossible. The message names the key."""


@dataclass
class ModelConfig:
    dim: int = 4096
    # Every transformer block, heads included (Meta's convention): the main stack holds
    # n_layers - n_future_tokens + 1 blocks, the last of which is head 1.
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    vocab_size: int = 32000
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    n_future_tokens: int = 1
    tie_embeddings: bool = False
    # Loss weight per head, head 1 first; empty means all 1 (the paper's plain sum).
    head_loss_weights: list[float] = field(default_factory=list)
    ignore_index: int = -100
    init_std: float = 0.02
    # The unembedding is padded to a multiple of this (tensor parallelism and GEMM speed want it);
    # padded rows never win a softmax or an argmax and are dropped on export.
    vocab_pad_multiple: int = 64

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def need(cond: bool, key: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"model.{key}: {msg}")

        for key in ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of", "max_seq_len", "vocab_pad_multiple"):
            need(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        need(self.n_future_tokens >= 1, "n_future_tokens", f"must be >= 1, got {self.n_future_tokens}")
        need(
            self.n_layers >= self.n_future_tokens,
            "n_layers",
            f"counts every block including the {self.n_future_tokens} heads, so it must be >= n_future_tokens "
            f"({self.n_future_tokens}), got {self.n_layers}",
        )
        need(self.dim % self.n_heads == 0, "n_heads", f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        need((self.dim // self.n_heads) % 2 == 0, "n_heads", "head dimension dim/n_heads must be even for rotary embeddings")
        kv = self.kv_heads
        need(1 <= kv <= self.n_heads, "n_kv_heads", f"must be between 1 and n_heads ({self.n_heads}), got {kv}")
        need(self.n_heads % kv == 0, "n_kv_heads", f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({kv})")
        need(self.norm_eps > 0, "norm_eps", f"must be > 0, got {self.norm_eps}")
        need(self.rope_theta > 0, "rope_theta", f"must be > 0, got {self.rope_theta}")
        if self.ffn_dim_multiplier is not None:
            need(self.ffn_dim_multiplier > 0, "ffn_dim_multiplier", f"must be > 0, got {self.ffn_dim_multiplier}")
        if self.head_loss_weights:
            need(
                len(self.head_loss_weights) == self.n_future_tokens,
                "head_loss_weights",
                f"has {len(self.head_loss_weights)} entries but n_future_tokens is {self.n_future_tokens}",
            )
            need(all(w >= 0 for w in self.head_loss_weights), "head_loss_weights", "weights must be >= 0")
            need(any(w > 0 for w in self.head_loss_weights), "head_loss_weights", "at least one weight must be > 0")

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def n_trunk_layers(self) -> int:
        """Blocks shared by all heads (the main stack minus its last block, which is head 1)."""
        return self.n_layers - self.n_future_tokens

    @property
    def ffn_hidden_dim(self) -> int:
        # Meta's Llama rule: 2/3 of 4*dim, scaled, rounded up to a multiple of multiple_of.
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    @property
    def padded_vocab_size(self) -> int:
        return self.vocab_pad_multiple * math.ceil(self.vocab_size / self.vocab_pad_multiple)

    @property
    def loss_weights(self) -> list[float]:
        return list(self.head_loss_weights) if self.head_loss_weights else [1.0] * self.n_future_tokens

    def to_params_json(self) -> dict:
        """Meta's params.json keys, as in the released MTP checkpoints."""
        out = {
            "dim": self.dim,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "n_kv_heads": self.kv_heads,
            "vocab_size": self.vocab_size,
            "multiple_of": self.multiple_of,
            "ffn_dim_multiplier": self.ffn_dim_multiplier,
            "norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "n_future_tokens": self.n_future_tokens,
        }
        return out
