"""Name and layout mapping between our (Meta's) weights and Hugging Face's Llama.

Meta rotates interleaved pairs of each head's channels; Hugging Face rotates the two halves. The rows of
wq and wk are permuted accordingly (the permutation of transformers' convert_llama_weights_to_hf.py), so
the same attention scores come out. Everything else is a rename; the padded vocabulary rows are dropped.
"""

from __future__ import annotations

import torch

from mtplm.model.config import ModelConfig

# An export's extra heads and their description, beside the Llama folder (written by hf_export, read by hf_import).
HEADS_FILE = "mtp_heads.safetensors"
MTP_CONFIG = "mtp_config.json"

_BLOCK = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_BLOCK_BACK = {v: k for k, v in _BLOCK.items()}


def to_hf_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    out_dim, in_dim = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def from_hf_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    out_dim, in_dim = w.shape
    return w.view(n_heads, 2, out_dim // n_heads // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def _convert_block(sd: dict, src_prefix: str, dst_prefix: str, names: dict, rotary: dict, rotate) -> dict:
    out = {}
    for src, dst in names.items():
        w = sd[src_prefix + src]
        out[dst_prefix + dst] = rotate(w, rotary[src]) if src in rotary else w
    return out


def block_to_hf(sd: dict, src_prefix: str, dst_prefix: str, cfg: ModelConfig) -> dict:
    rotary = {"attention.wq.weight": cfg.n_heads, "attention.wk.weight": cfg.kv_heads}
    return _convert_block(sd, src_prefix, dst_prefix, _BLOCK, rotary, to_hf_rotary)


def block_from_hf(sd: dict, src_prefix: str, dst_prefix: str, cfg: ModelConfig) -> dict:
    rotary = {"self_attn.q_proj.weight": cfg.n_heads, "self_attn.k_proj.weight": cfg.kv_heads}
    return _convert_block(sd, src_prefix, dst_prefix, _BLOCK_BACK, rotary, from_hf_rotary)


def to_hf(sd: dict, cfg: ModelConfig) -> tuple[dict, dict]:
    """(LlamaForCausalLM state dict = trunk + head 1, extra heads with HF block names)."""
    V = cfg.vocab_size
    hf = {"model.embed_tokens.weight": sd["tok_embeddings.weight"][:V], "model.norm.weight": sd["norm.weight"]}
    if not cfg.tie_embeddings:
        hf["lm_head.weight"] = sd["output.weight"][:V]
    for i in range(cfg.n_main_layers):
        hf.update(block_to_hf(sd, f"layers.{i}.", f"model.layers.{i}.", cfg))
    heads = {}
    for j in range(cfg.n_future_tokens - 1):
        heads.update(block_to_hf(sd, f"extra_heads.{j}.", f"extra_heads.{j}.", cfg))
    return hf, heads


def from_hf(hf: dict, heads: dict, cfg: ModelConfig, n_hf_layers: int) -> dict:
    """Our state dict (padded vocabulary) from HF weights; heads missing from `heads` start as copies of
    the last HF layer (head 1), so a plain Llama model can be continued with new heads."""
    Vp = cfg.padded_vocab_size

    def pad(w):
        return torch.cat([w, w.new_zeros(Vp - w.shape[0], w.shape[1])]) if w.shape[0] < Vp else w

    sd = {"tok_embeddings.weight": pad(hf["model.embed_tokens.weight"]), "norm.weight": hf["model.norm.weight"]}
    sd["output.weight"] = pad(hf["lm_head.weight"]) if "lm_head.weight" in hf else sd["tok_embeddings.weight"]
    for i in range(n_hf_layers):
        sd.update(block_from_hf(hf, f"model.layers.{i}.", f"layers.{i}.", cfg))
    for j in range(cfg.n_future_tokens - 1):
        if f"extra_heads.{j}.self_attn.q_proj.weight" in heads:
            sd.update(block_from_hf(heads, f"extra_heads.{j}.", f"extra_heads.{j}.", cfg))
        else:
            sd.update(block_from_hf(hf, f"model.layers.{n_hf_layers - 1}.", f"extra_heads.{j}.", cfg))
    return sd
