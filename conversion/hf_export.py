"""mtp-export-hf: a training checkpoint (or consolidated model) -> a Hugging Face Llama folder plus its heads.

    mtp-export-hf runs/1b/checkpoints runs/1b/hf [--tokenizer tok.model] [--dtype bf16] [--max-shard-size 5GB]

The folder loads with AutoModelForCausalLM as trunk + head 1, the plain next-token model (as Meta's release
does). The extra heads go to mtp_heads.safetensors with mtp_config.json, for self-speculative decoding and
for mtp-import-hf. Everything is written to a temporary folder and renamed when complete.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from mtplm.model.weights import atomic_folder, check_output_folder

from .consolidate import consolidated_state_dict
from .hf_layout import HEADS_FILE, MTP_CONFIG, to_hf

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def hf_rope_scaling(cfg) -> dict | None:
    """transformers' rope_scaling for our model's (read as rope_parameters by transformers 5)."""
    s = cfg.rope_scaling
    if s.rope_type == "default":
        return None
    keys = ("factor",) if s.rope_type == "linear" else ("factor", "low_freq_factor", "high_freq_factor",
                                                         "original_max_position_embeddings")
    return {"rope_type": s.rope_type, **{k: getattr(s, k) for k in keys}}


def llama_config(cfg, dtype: torch.dtype, eod_id: int | None, bos_id: int | None):
    from transformers import LlamaConfig

    return LlamaConfig(rope_scaling=hf_rope_scaling(cfg),
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_hidden_dim,
        num_hidden_layers=cfg.n_main_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.kv_heads, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
        max_position_embeddings=cfg.max_seq_len, tie_word_embeddings=cfg.tie_embeddings,
        hidden_act="silu", attention_bias=False, mlp_bias=False, eos_token_id=eod_id, bos_token_id=bos_id,
        torch_dtype=dtype)


def export_hf(src: str | Path, out_dir: str | Path, tokenizer: str | Path | None = None, dtype: str = "bf16",
              max_shard_size: str = "5GB") -> Path:
    from transformers import GenerationConfig, LlamaForCausalLM

    from mtplm.data.tokenizer import BYTE_TOKENIZER, load_tokenizer

    check_output_folder(out_dir, marker="config.json")  # before the slow part: gathering the weights
    sd, cfg, train_cfg = consolidated_state_dict(src)
    tok_path = tokenizer or train_cfg.get("data", {}).get("tokenizer")
    if not tokenizer and tok_path and tok_path != BYTE_TOKENIZER and not Path(tok_path).is_file():
        raise FileNotFoundError(f"the run's tokenizer {tok_path} (its data.tokenizer) is no longer at that path; "
                                f"pass --tokenizer PATH, the SentencePiece .model the run trained with")
    if tok_path is None and (Path(src) / "tokenizer.model").is_file():
        tok_path = Path(src) / "tokenizer.model"
    tok = load_tokenizer(tok_path) if tok_path else None
    eod = tok.eod_id if tok is not None else None
    bos = tok.bos_id if tok is not None else None
    torch_dtype = DTYPES[dtype]
    hf_sd, heads = to_hf(sd, cfg)

    with atomic_folder(out_dir, marker="config.json") as tmp:
        config = llama_config(cfg, torch_dtype, eod, bos)
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
        weights = {k: v.to(torch_dtype) for k, v in hf_sd.items()}
        if cfg.tie_embeddings:  # one tensor under both names; save_pretrained stores it once
            weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
        model.load_state_dict(weights, strict=True, assign=True)
        if cfg.tie_embeddings:
            model.tie_weights()
        model.save_pretrained(tmp, max_shard_size=max_shard_size, safe_serialization=True)
        GenerationConfig(eos_token_id=eod, bos_token_id=bos, pad_token_id=eod).save_pretrained(tmp)
        if heads:
            save_file({k: v.to(torch_dtype).contiguous() for k, v in heads.items()}, str(tmp / HEADS_FILE),
                      metadata={"format": "pt"})
        (tmp / MTP_CONFIG).write_text(json.dumps({
            "n_future_tokens": cfg.n_future_tokens, "heads_file": HEADS_FILE if heads else None,
            "model": dataclasses.asdict(cfg)}, indent=2) + "\n")
        if tok is not None and tok.path is not None:
            shutil.copyfile(tok.path, tmp / "tokenizer.model")
            (tmp / "tokenizer_config.json").write_text(json.dumps({
                "tokenizer_class": "LlamaTokenizer", "add_bos_token": False, "add_eos_token": False,
                "legacy": False, "add_prefix_space": False, "model_max_length": cfg.max_seq_len,
                "bos_token": None if bos is None else tok.sp.id_to_piece(bos),
                "eos_token": tok.sp.id_to_piece(eod), "unk_token": tok.sp.id_to_piece(tok.sp.unk_id()),
            }, indent=2) + "\n")
    return Path(out_dir)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mtp-export-hf", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="checkpoints folder, step_* folder, or consolidated model folder")
    p.add_argument("output")
    p.add_argument("--tokenizer", help="SentencePiece .model (default: the one the run trained with)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--max-shard-size", default="5GB")
    args = p.parse_args(argv)
    try:
        out = export_hf(args.checkpoint, args.output, args.tokenizer, args.dtype, args.max_shard_size)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"mtp-export-hf: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
