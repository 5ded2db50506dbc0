"""The model config of an import, from Hugging Face's config.json or Meta's params.json, field by field.

An import either reproduces the source model's logits or refuses before writing anything. So every field of
transformers' LlamaConfig (and of PretrainedConfig's general ones) and of Meta's ModelArgs is listed below as
mapped onto ModelConfig, without effect on the logits, or allowed with certain values only; a value the model
cannot reproduce, and any key not listed, is refused with its name and value.
"""

from __future__ import annotations

from pathlib import Path

from mtplm.model.config import LLAMA3_ROPE_DEFAULTS, META_ROPE_SCALING_FACTOR, ModelConfig, RopeScaling, ffn_rule_for

# --- Hugging Face config.json --------------------------------------------------------------------------------

HF_MAPPED = {  # read by hf_model_config
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings",
    "initializer_range", "rope_theta", "rope_parameters", "rope_scaling", "model_type", "architectures",
}
# Values the model reproduces; any other value is refused. (hidden_act "swish" is SiLU in transformers too.)
HF_REQUIRED = {
    "hidden_act": ("silu", "swish"), "attention_bias": (False,), "mlp_bias": (False,), "partial_rotary_factor": (1, 1.0),
    "is_encoder_decoder": (False,), "add_cross_attention": (False,), "tie_encoder_decoder": (False,),
    "pruned_heads": ({}, None), "quantization_config": (None,), "auto_map": (None,),
}
HF_NO_EFFECT = {
    # generation, tokens and runtime switches: not part of the function from tokens to logits
    "use_cache", "pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "decoder_start_token_id",
    "output_hidden_states", "output_attentions", "return_dict", "torchscript", "is_decoder", "use_bfloat16",
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty",
    "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
    "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens", "tf_legacy_loss",
    # bookkeeping and task metadata
    "transformers_version", "_name_or_path", "_commit_hash", "dtype", "torch_dtype", "id2label", "label2id",
    "num_labels", "problem_type", "finetuning_task", "tokenizer_class", "prefix", "task_specific_params",
    "chunk_size_feed_forward", "cross_attention_hidden_size", "_attn_implementation", "attn_implementation",
    # pretraining_tp > 1 only splits transformers' matmuls into slices (same result); dropout acts in training only
    "pretraining_tp", "attention_dropout",
}
ROPE_KEYS = {  # keys of rope_scaling / rope_parameters per rope_type
    "default": {"rope_type", "type", "rope_theta", "partial_rotary_factor"},
    "linear": {"rope_type", "type", "rope_theta", "partial_rotary_factor", "factor"},
    "llama3": {"rope_type", "type", "rope_theta", "partial_rotary_factor", "factor", *LLAMA3_ROPE_DEFAULTS},
}


def _refuse(where, key: str, value, why: str):
    raise ValueError(f"{where}: {key} = {value!r} {why}; this import reproduces the source model exactly or not at all")


def hf_rope(hf: dict, where) -> tuple[float, RopeScaling]:
    """(rope_theta, scaling) as transformers reads them: rope_scaling (transformers 4) over rope_parameters (5)."""
    key = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    rope = hf.get(key) or {}
    if not isinstance(rope, dict):
        _refuse(where, key, rope, "is not a mapping")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ROPE_KEYS:
        _refuse(where, f"{key}.rope_type", rope_type, f"is not supported (supported: {', '.join(ROPE_KEYS)})")
    for k in sorted(set(rope) - ROPE_KEYS[rope_type]):
        _refuse(where, f"{key}.{k}", rope[k], f"is not a parameter of rope_type {rope_type!r} here")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        _refuse(where, f"{key}.partial_rotary_factor", rope["partial_rotary_factor"], "is not supported (only 1.0)")
    theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    if rope_type == "default":
        return theta, RopeScaling()
    for k in ("factor", "low_freq_factor", "high_freq_factor") if rope_type == "llama3" else ("factor",):
        if k not in rope:  # transformers needs it too: no default is filled in here
            _refuse(where, key, rope, f"lacks {k}, which rope_type {rope_type!r} requires")
    try:
        if rope_type == "linear":
            return theta, RopeScaling("linear", rope.get("factor"))
        return theta, RopeScaling(
            "llama3", rope.get("factor"), rope.get("low_freq_factor"), rope.get("high_freq_factor"),
            # transformers' fallback when the pretraining length is not given
            rope.get("original_max_position_embeddings", hf.get("max_position_embeddings", 2048)))
    except ValueError as e:
        raise ValueError(f"{where}: {key}: {e}") from None


def hf_model_config(hf: dict, n_future_tokens: int, where: Path) -> ModelConfig:
    """Our config for a Hugging Face Llama (its layers + n_future_tokens - 1 new heads), or ValueError naming
    the first field the model cannot reproduce."""
    if hf.get("model_type") != "llama":
        _refuse(where, "model_type", hf.get("model_type"), "is not supported (only llama)")
    for key in sorted(set(hf) - HF_MAPPED - HF_NO_EFFECT - set(HF_REQUIRED)):
        _refuse(where, key, hf[key], "is not a field of transformers' LlamaConfig that this import knows")
    for key, allowed in HF_REQUIRED.items():
        if key in hf and hf[key] not in allowed:
            _refuse(where, key, hf[key], f"is not supported (only {' or '.join(repr(a) for a in allowed)})")
    archs = hf.get("architectures") or ["LlamaForCausalLM"]
    if archs != ["LlamaForCausalLM"]:
        _refuse(where, "architectures", archs, "is not supported (only ['LlamaForCausalLM'])")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if not isinstance(hf.get(key), int) or hf[key] < 1:
            _refuse(where, key, hf.get(key), "must be an integer >= 1")
    dim, heads = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or dim // heads
    if head_dim * heads != dim:
        _refuse(where, "head_dim", head_dim, f"x num_attention_heads ({heads}) != hidden_size ({dim}), not supported")
    theta, scaling = hf_rope(hf, where)
    width = hf["intermediate_size"]
    rule = ffn_rule_for(dim, width)
    if rule is None:
        _refuse(where, "intermediate_size", width, f"cannot be expressed with Meta's FFN rule for hidden_size {dim}")
    try:
        return ModelConfig(
            dim=dim, n_layers=hf["num_hidden_layers"] + n_future_tokens - 1, n_heads=heads,
            n_kv_heads=hf.get("num_key_value_heads"), vocab_size=hf["vocab_size"], multiple_of=rule[0],
            ffn_dim_multiplier=rule[1], norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=scaling,
            max_seq_len=hf.get("max_position_embeddings", 2048), n_future_tokens=n_future_tokens,
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)), init_std=hf.get("initializer_range", 0.02))
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


# --- Meta params.json -----------------------------------------------------------------------------------------

META_MAPPED = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
               "norm_eps", "rope_theta", "use_scaled_rope", "max_seq_len", "n_future_tokens"}
META_NO_EFFECT = {"max_batch_size"}  # the KV cache capacity of Meta's generator
META_REQUIRED = {"vision_chunk_size": (-1,), "vision_num_cross_attention_layers": (-1,), "quantization_args": (None,),
                 "lora_args": (None,)}
META_IF_TEXT_ONLY = {"vision_max_num_chunks"}  # read only by the vision model, refused above


def meta_model_config(params: dict, vocab_from_weights: int, where: Path) -> ModelConfig:
    """Our config from Meta's params.json. vocab_size -1 (Llama 2's release) means the embedding's row count, as
    Meta's loader sizes it."""
    for key in sorted(set(params) - META_MAPPED - META_NO_EFFECT - set(META_REQUIRED) - META_IF_TEXT_ONLY):
        _refuse(where, key, params[key], "is not a field of Meta's params.json that this import knows")
    for key, allowed in META_REQUIRED.items():
        if key in params and params[key] not in allowed:
            _refuse(where, key, params[key], f"is not supported (only {' or '.join(repr(a) for a in allowed)})")
    kw = {k: v for k, v in params.items() if k in META_MAPPED - {"use_scaled_rope"}}
    if kw.get("vocab_size", -1) == -1:
        kw["vocab_size"] = vocab_from_weights
    scaled = params.get("use_scaled_rope", False)
    if scaled not in (True, False):
        _refuse(where, "use_scaled_rope", scaled, "must be true or false")
    if scaled:  # Meta's apply_scaling: llama3 with these constants
        kw["rope_scaling"] = RopeScaling("llama3", META_ROPE_SCALING_FACTOR)
    try:
        return ModelConfig(**kw)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None
