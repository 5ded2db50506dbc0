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
from mtplm.model.weights import check_output_folder, save_model

from .hf_layout import HEADS_FILE, MTP_CONFIG, from_hf, to_hf
from .import_config import hf_model_config, meta_model_config

# Meta's model-parallel shards: dimension each weight is split along (None: replicated).
_META_SPLIT = {"tok_embeddings": 1, "output": 0, "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "wo": 1, "w2": 1}
# Derived buffers some checkpoints carry; the model computes them.
_DERIVED = ("rotary_emb.inv_freq", "rope.freqs")


def _read_safetensors(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error type for damaged files
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


def _hf_weights(folder: Path) -> tuple[dict, dict]:
    """(tensors, file each tensor came from)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise ValueError(f"{index}: not a safetensors index (no weight_map: {e})") from None
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names {', '.join(missing)}, missing from {folder}")
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json")
    sd, origin = {}, {}
    for f in files:
        part = _read_safetensors(folder / f)
        sd.update(part)
        origin.update(dict.fromkeys(part, f))
    return sd, origin


def _shapes(tensors: dict) -> dict:
    return {k: tuple(v.shape) for k, v in tensors.items()}


def check_shapes(found: dict, expected: dict, origin, implied_by: str, hint=None) -> None:
    """Every expected tensor present with its shape, nothing else: else one line naming the first problem (and
    how many others), instead of load_state_dict's screenful. origin(name) says where a tensor was read from."""
    problems = []
    for name, shape in expected.items():
        if name not in found:
            problems.append(f"tensor {name} is missing ({implied_by} implies shape {list(shape)})")
        elif found[name] != shape:
            problems.append(f"{name} in {origin(name)} has shape {list(found[name])}, {implied_by} implies "
                            f"{list(shape)}" + (hint(name, found[name], shape) if hint else ""))
    problems += [f"unexpected tensor {name} in {origin(name)}" for name in found if name not in expected]
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise ValueError(problems[0] + more)


def _shape_only_state_dict(cfg: ModelConfig) -> dict:
    """Our state dict as shapes only (meta tensors), padded vocabulary included."""
    with torch.device("meta"):
        return MTPTransformer(cfg).state_dict()


def _unpadded_shapes(cfg: ModelConfig) -> dict:
    """Our state dict's shapes with the vocabulary unpadded, as Meta's files store it."""
    return {k: (cfg.vocab_size, v.shape[1]) if k in ("tok_embeddings.weight", "output.weight") else tuple(v.shape)
            for k, v in _shape_only_state_dict(cfg).items()}


def load_hf_export(path: str | Path, n_future_tokens: int | None = None) -> MTPTransformer:
    """Our model from a Hugging Face Llama folder; the heads come from mtp_heads.safetensors when present."""
    folder = Path(path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder}: no config.json (not a Hugging Face model folder)")
    hf_cfg = _json_object(config_file)
    mtp = json.loads((folder / MTP_CONFIG).read_text()) if (folder / MTP_CONFIG).is_file() else None
    n_hf = hf_cfg.get("num_hidden_layers")
    use_mtp = mtp is not None and n_future_tokens in (None, mtp["n_future_tokens"])
    n = mtp["n_future_tokens"] if use_mtp else 1 if n_future_tokens is None else n_future_tokens
    cfg = hf_model_config(hf_cfg, n, config_file)
    if use_mtp:  # our own export: its config also keeps what config.json has no field for (loss weights, ...)
        ours = ModelConfig(**mtp["model"])
        for key in ("dim", "n_layers", "n_heads", "kv_heads", "vocab_size", "ffn_hidden_dim", "norm_eps", "rope_theta",
                    "rope_scaling", "tie_embeddings"):
            if getattr(ours, key) != getattr(cfg, key):
                raise ValueError(f"{folder / MTP_CONFIG}: model {key} {getattr(ours, key)} disagrees with "
                                 f"{config_file} ({getattr(cfg, key)})")
        cfg = ours
    weights, origin = _hf_weights(folder)
    weights = {k: v for k, v in weights.items() if not k.endswith(_DERIVED)}
    if cfg.tie_embeddings:  # transformers ties lm_head to the embedding whatever the file holds
        weights.pop("lm_head.weight", None)
    expected, expected_heads = (_shapes(t) for t in to_hf(_shape_only_state_dict(cfg), cfg))
    check_shapes(_shapes(weights), expected, origin.get, config_file.name)
    heads_file = folder / HEADS_FILE
    heads = _read_safetensors(heads_file) if heads_file.is_file() else {}
    # Heads past n_future_tokens - 1 are dropped on request (--n-future-tokens below the export's); heads missing
    # from the file start as copies of head 1. A head that is there must be whole.
    kept = {str(j) for j in range(cfg.n_future_tokens - 1)}
    heads = {k: v for k, v in heads.items()
             if not (k.startswith("extra_heads.") and k.split(".")[1].isdigit() and k.split(".")[1] not in kept)}
    present = {k.split(".")[1] for k in heads}
    check_shapes(_shapes(heads), {k: v for k, v in expected_heads.items() if k.split(".")[1] in present},
                 lambda _: HEADS_FILE, config_file.name)
    sd = from_hf({k: v.float() for k, v in weights.items()}, {k: v.float() for k, v in heads.items()}, cfg, n_hf)
    model = MTPTransformer(cfg)
    model.load_state_dict(sd, strict=True)
    return model


def _json_object(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def load_meta_native(path: str | Path) -> MTPTransformer:
    """Meta's release format: params.json + consolidated.00.pth (.. .NN.pth for model-parallel shards)."""
    folder = Path(path)
    params_file = folder / "params.json"
    params = _json_object(params_file)
    shards = sorted(folder.glob("consolidated.*.pth"))
    if not shards:
        raise FileNotFoundError(f"{folder}: no consolidated.*.pth")
    ranks = [s.name.split(".")[1] for s in shards]
    if not all(r.isdigit() for r in ranks):
        raise ValueError(f"{folder}: shard names must be consolidated.NN.pth, got {', '.join(s.name for s in shards)}")
    missing = sorted(set(range(max(map(int, ranks)) + 1)) - set(map(int, ranks)))
    if missing:
        raise FileNotFoundError(f"{folder}: model-parallel shard consolidated.{missing[0]:02d}.pth is missing "
                                f"(found {', '.join(s.name for s in shards)})")
    parts = []
    for s in shards:
        try:
            parts.append(torch.load(s, map_location="cpu", weights_only=True))
        except Exception as e:  # torch raises several types for a damaged or truncated file
            raise ValueError(f"{s}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from None
    for s, p in zip(shards[1:], parts[1:]):
        if p.keys() != parts[0].keys():
            name = sorted(p.keys() ^ parts[0].keys())[0]
            raise ValueError(f"{s} and {shards[0].name} hold different tensors (e.g. {name})")
    emb = parts[0].get("tok_embeddings.weight")
    cfg = meta_model_config(params, emb.shape[0] if emb is not None else -1, params_file)
    sd = {}
    for name in parts[0]:
        if name.endswith(_DERIVED):
            continue
        dim = _META_SPLIT.get(name.split(".")[-2])
        tensors = [p[name] for p in parts]
        sd[name] = tensors[0] if dim is None or len(tensors) == 1 else torch.cat(tensors, dim=dim)

    def hint(name, got, want):
        dim = _META_SPLIT.get(name.split(".")[-2])
        per = got[dim] // len(shards) if dim is not None and got[dim] % len(shards) == 0 else 0
        if per and want[dim] % per == 0 and got[1 - dim] == want[1 - dim]:
            total = want[dim] // per
            if total > len(shards):
                return f": the checkpoint is split into {total} model-parallel shards and {len(shards)} are here"
        return ""

    joined = shards[0].name if len(shards) == 1 else f"{shards[0].name} .. {shards[-1].name} joined"
    check_shapes(_shapes(sd), _unpadded_shapes(cfg), lambda _: joined, params_file.name, hint)
    Vp = cfg.padded_vocab_size
    for key in ("tok_embeddings.weight", "output.weight"):
        if sd[key].shape[0] < Vp:
            sd[key] = torch.cat([sd[key], sd[key].new_zeros(Vp - sd[key].shape[0], sd[key].shape[1])])
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
        check_output_folder(args.output)  # before the conversion, which takes minutes on a large model
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
