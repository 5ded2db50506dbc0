"""mtp-import-hf: a Hugging Face Llama folder (ours with its heads, or any Llama) or Meta's native MTP
checkpoint (params.json + consolidated.*.pth) -> our consolidated model folder.

    mtp-import-hf hf_folder out/ [--n-future-tokens 4]     # then: mtp-train ... --train.init_from out/

A plain Llama model gets n-1 new heads initialised as copies of its last block (head 1), so it can be
continued as a multi-token model; its layer count grows by n-1 (the trunk is unchanged).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from mtplm.model.config import ModelConfig
from mtplm.model.transformer import MTPTransformer
from mtplm.model.weights import save_model

from .hf_export import HEADS_FILE, MTP_CONFIG

# Meta's model-parallel shards: dimension each weight is split along (None: replicated).
_META_SPLIT = {"tok_embeddings": 1, "output": 0, "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "wo": 1, "w2": 1}


def _hf_weights(folder: Path) -> dict:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        sd = {}
        for f in files:
            sd.update(load_file(str(folder / f)))
        return sd
    single = folder / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json")
    return load_file(str(single))


def load_hf_export(path: str | Path, n_future_tokens: int | None = None) -> MTPTransformer:
    """Our model from a Hugging Face Llama folder; the heads come from mtp_heads.safetensors when present."""
    from .hf_layout import from_hf

    folder = Path(path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder}: no config.json (not a Hugging Face model folder)")
    hf_cfg = json.loads(config_file.read_text())
    if hf_cfg.get("model_type") != "llama":
        raise ValueError(f"{config_file}: model_type is {hf_cfg.get('model_type')!r}; only llama is supported")
    mtp = json.loads((folder / MTP_CONFIG).read_text()) if (folder / MTP_CONFIG).is_file() else None
    n_hf = hf_cfg["num_hidden_layers"]
    if mtp is not None and n_future_tokens in (None, mtp["n_future_tokens"]):
        cfg = ModelConfig(**mtp["model"])
    else:
        n = n_future_tokens or 1
        head_dim = hf_cfg.get("head_dim") or hf_cfg["hidden_size"] // hf_cfg["num_attention_heads"]
        if head_dim * hf_cfg["num_attention_heads"] != hf_cfg["hidden_size"]:
            raise ValueError(f"{config_file}: head_dim {head_dim} x heads != hidden_size; not supported")
        cfg = ModelConfig(
            dim=hf_cfg["hidden_size"], n_layers=n_hf + n - 1, n_heads=hf_cfg["num_attention_heads"],
            n_kv_heads=hf_cfg.get("num_key_value_heads"), vocab_size=hf_cfg["vocab_size"], multiple_of=1,
            ffn_dim_multiplier=None, norm_eps=hf_cfg.get("rms_norm_eps", 1e-5),
            rope_theta=float((hf_cfg.get("rope_parameters") or {}).get("rope_theta", hf_cfg.get("rope_theta", 10000.0))),
            max_seq_len=hf_cfg.get("max_position_embeddings", 2048), n_future_tokens=n,
            tie_embeddings=bool(hf_cfg.get("tie_word_embeddings", False)))
        # Llama's FFN width is not always Meta's rounding rule of dim: take it from the weights.
        if cfg.ffn_hidden_dim != hf_cfg["intermediate_size"]:
            cfg = _with_ffn(cfg, hf_cfg["intermediate_size"], config_file)
    heads_file = folder / HEADS_FILE
    heads = load_file(str(heads_file)) if heads_file.is_file() else {}
    sd = from_hf({k: v.float() for k, v in _hf_weights(folder).items()}, {k: v.float() for k, v in heads.items()},
                 cfg, n_hf)
    model = MTPTransformer(cfg)
    model.load_state_dict(sd, strict=True)
    return model


def _with_ffn(cfg: ModelConfig, hidden: int, where: Path) -> ModelConfig:
    """Find ffn_dim_multiplier/multiple_of that reproduce an FFN width (Meta's rule has both)."""
    for multiple_of in (1, 256, 128, 64, 32, 16, 8):
        base = int(2 * 4 * cfg.dim / 3)
        for mult in (None, hidden / base):
            kw = dict(cfg.__dict__, multiple_of=multiple_of, ffn_dim_multiplier=mult)
            candidate = ModelConfig(**kw)
            if candidate.ffn_hidden_dim == hidden:
                return candidate
    raise ValueError(f"{where}: intermediate_size {hidden} cannot be expressed with Meta's FFN rule for dim {cfg.dim}")


def load_meta_native(path: str | Path) -> MTPTransformer:
    """Meta's release format: params.json + consolidated.00.pth (.. .NN.pth for model-parallel shards)."""
    folder = Path(path)
    params = json.loads((folder / "params.json").read_text())
    known = {f for f in ModelConfig.__dataclass_fields__}
    cfg = ModelConfig(**{k: v for k, v in params.items() if k in known})
    shards = sorted(folder.glob("consolidated.*.pth"))
    if not shards:
        raise FileNotFoundError(f"{folder}: no consolidated.*.pth")
    parts = [torch.load(s, map_location="cpu", weights_only=True) for s in shards]
    sd = {}
    for name in parts[0]:
        if name.endswith("rope.freqs"):
            continue
        kind = name.split(".")[-2]
        dim = _META_SPLIT.get(kind)
        tensors = [p[name] for p in parts]
        sd[name] = tensors[0] if dim is None or len(tensors) == 1 else torch.cat(tensors, dim=dim)
    V, Vp = cfg.vocab_size, cfg.padded_vocab_size
    for key in ("tok_embeddings.weight", "output.weight"):
        if key in sd and sd[key].shape[0] < Vp:
            sd[key] = torch.cat([sd[key], sd[key].new_zeros(Vp - V, sd[key].shape[1])])
    model = MTPTransformer(cfg)
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    return model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mtp-import-hf", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="Hugging Face Llama folder, or Meta native folder (params.json + consolidated.*.pth)")
    p.add_argument("output", help="consolidated model folder to write")
    p.add_argument("--n-future-tokens", type=int, help="heads for a plain Llama model (default: keep the source's)")
    args = p.parse_args(argv)
    src = Path(args.source)
    try:
        if (src / "params.json").is_file() and list(src.glob("consolidated.*.pth")):
            model = load_meta_native(src)
        else:
            model = load_hf_export(src, args.n_future_tokens)
        extra = {"tokenizer.model": src / "tokenizer.model"} if (src / "tokenizer.model").is_file() else {}
        out = save_model(model, args.output, extra)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"mtp-import-hf: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out} (n_future_tokens={model.cfg.n_future_tokens}); continue training with "
          f"--train.init_from {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
