"""Model shape, laid out like Meta's params.json for its multi-token prediction checkpoints."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from mtplm.config import ConfigError  # noqa: F401 (re-exported: the model's own validation raises it)

ROPE_TYPES = ("default", "linear", "llama3")
# Meta's constants for Llama 3.1's rope scaling (params.json `use_scaled_rope: true`).
LLAMA3_ROPE_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
META_ROPE_SCALING_FACTOR = 8.0


@dataclass
class RopeScaling:
    """Rotary frequency scaling for contexts beyond pretraining; the rope_scaling of transformers' Llama.

    default: none (factor 1).
    linear: every frequency divided by factor (position interpolation).
    llama3: Llama 3.1's rule: wavelengths longer than original_max_position_embeddings / low_freq_factor are
        divided by factor, those shorter than original_max_position_embeddings / high_freq_factor are kept, and
        those between are interpolated. Unset llama3 fields take Meta's constants (1, 4, 8192); Meta's
        params.json `use_scaled_rope: true` is llama3 with factor 8 and those constants.
    """

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None

    def __post_init__(self) -> None:
        if self.rope_type == "llama3":
            for key, value in LLAMA3_ROPE_DEFAULTS.items():
                if getattr(self, key) is None:
                    setattr(self, key, value)
        self.validate()

    def validate(self) -> None:
        def need(cond: bool, key: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"model.rope_scaling.{key}: {msg}")

        def number(key: str) -> bool:
            v = getattr(self, key)
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        need(self.rope_type in ROPE_TYPES, "rope_type", f"must be one of {', '.join(ROPE_TYPES)}, got {self.rope_type!r}")
        need(number("factor") and self.factor >= 1, "factor", f"must be a number >= 1, got {self.factor!r}")
        if self.rope_type != "llama3":
            need(self.rope_type == "linear" or self.factor == 1, "factor",
                 f"must be 1 with rope_type default (no scaling), got {self.factor}")
            for key in LLAMA3_ROPE_DEFAULTS:
                need(getattr(self, key) is None, key, f"is used by rope_type llama3 only, not {self.rope_type}")
            return
        for key in ("low_freq_factor", "high_freq_factor"):
            need(number(key) and getattr(self, key) > 0, key, f"must be a number > 0, got {getattr(self, key)!r}")
        need(self.high_freq_factor > self.low_freq_factor, "high_freq_factor",
             f"must be greater than low_freq_factor ({self.low_freq_factor}), got {self.high_freq_factor}")
        omp = self.original_max_position_embeddings
        need(isinstance(omp, int) and not isinstance(omp, bool) and omp >= 1, "original_max_position_embeddings",
             f"must be an integer >= 1, got {omp!r}")


def meta_ffn_width(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's Llama rule: 2/3 of 4*dim, scaled, rounded up to a multiple of multiple_of."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * -(-hidden // multiple_of)


def ffn_rule_for(dim: int, width: int) -> tuple[int, float | None] | None:
    """(multiple_of, ffn_dim_multiplier) with which Meta's rule gives exactly `width` at `dim`, or None.

    The plain rule (no multiplier) with one of Meta's multiple_of values is preferred. Otherwise multiple_of=1 and
    a multiplier: int(mult * base) == width for every mult in [width / base, (width + 1) / base), and the middle
    of that interval stays inside it whatever the float rounding (its ends do not: int(57 / 213 * 213) is 56).
    """
    for multiple_of in (4096, 2048, 1024, 512, 256, 128, 64, 32, 16, 8, 4, 2, 1):
        if meta_ffn_width(dim, multiple_of, None) == width:
            return multiple_of, None
    base = int(2 * 4 * dim / 3)
    if width >= 1 and base >= 1:
        mult = (2 * width + 1) / (2 * base)
        if meta_ffn_width(dim, 1, mult) == width:
            return 1, mult
    return None


@dataclass
class ModelConfig:
    dim: int = 4096
    # Every transformer block, heads included (Meta's convention): the main stack holds
    # n_main_layers = n_layers - n_future_tokens + 1 blocks, the last of which is head 1.
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    vocab_size: int = 32000
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Imported from Hugging Face's rope_scaling or Meta's use_scaled_rope; rope_type default is none.
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
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
        if self.rope_scaling is None:
            self.rope_scaling = RopeScaling()
        if isinstance(self.rope_scaling, dict):  # from JSON (params.json, mtp_config.json)
            known = {f.name for f in fields(RopeScaling)}
            unknown = sorted(set(self.rope_scaling) - known)
            if unknown:
                raise ConfigError(f"model.rope_scaling: unknown keys {', '.join(unknown)}; valid keys: "
                                  f"{', '.join(sorted(known))}")
            self.rope_scaling = RopeScaling(**self.rope_scaling)
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
        need(isinstance(self.rope_scaling, RopeScaling), "rope_scaling",
             f"must be a mapping of rope_type, factor, ..., got {self.rope_scaling!r}")
        self.rope_scaling.validate()
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
    def n_main_layers(self) -> int:
        """Blocks of the main stack, Meta's `layers`: the trunk and head 1 (a Hugging Face export's
        num_hidden_layers); the other n - 1 heads are `extra_heads`."""
        return self.n_trunk_layers + 1

    @property
    def ffn_hidden_dim(self) -> int:
        return meta_ffn_width(self.dim, self.multiple_of, self.ffn_dim_multiplier)

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
        if self.rope_scaling.rope_type != "default":
            if self.rope_scaling != RopeScaling("llama3", META_ROPE_SCALING_FACTOR):
                raise ConfigError(f"model.rope_scaling: {self.rope_scaling} has no params.json form (Meta's only "
                                  f"scaling is use_scaled_rope: llama3 with factor {META_ROPE_SCALING_FACTOR}, "
                                  f"low_freq_factor 1, high_freq_factor 4, original_max_position_embeddings 8192)")
            out["use_scaled_rope"] = True
        return out
