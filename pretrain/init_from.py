"""Start training from a consolidated model's weights, possibly with a different number of heads.

The trunk must match exactly. Head k of the new model takes the saved head k when there is one, else a copy
of the saved head 1's block (a new head starts as the block it branches beside). Heads the new model lacks
are dropped: continuing a 4-token model with n'=1 is the paper's best CodeContests fine-tuning recipe.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file

from mtplm.model.weights import PARAMS_FILE, WEIGHTS_FILE, model_config_from_json


def _head_prefix(n_main: int, k: int) -> str:
    return f"layers.{n_main - 1}." if k == 0 else f"extra_heads.{k - 1}."


def load_initial_weights(model, path: str | Path) -> list[str]:
    """Load weights into `model` in place; returns notes on what was adapted."""
    path = Path(path)
    if not (path / PARAMS_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"train.init_from: {path} is not a consolidated model folder "
                                f"(needs {PARAMS_FILE} and {WEIGHTS_FILE}; mtp-export or the end of training writes one)")
    src_cfg = model_config_from_json(json.loads((path / PARAMS_FILE).read_text()), str(path / PARAMS_FILE))
    cfg = model.cfg
    shape_keys = ("dim", "n_heads", "kv_heads", "ffn_hidden_dim", "padded_vocab_size", "n_trunk_layers")
    diffs = [f"{k}: saved {getattr(src_cfg, k)}, this run {getattr(cfg, k)}" for k in shape_keys
             if getattr(src_cfg, k) != getattr(cfg, k)]
    if diffs:
        raise ValueError(f"train.init_from: {path} has a different trunk or width:\n  " + "\n  ".join(diffs)
                         + "\n(to change n_future_tokens keep the trunk: n_layers - n_future_tokens must stay "
                           f"{src_cfg.n_trunk_layers})")
    src = load_file(str(path / WEIGHTS_FILE))
    if src_cfg.tie_embeddings and "output.weight" not in src:
        src["output.weight"] = src["tok_embeddings.weight"]
    src_main, dst_main = src_cfg.n_layers - src_cfg.n_future_tokens + 1, cfg.n_layers - cfg.n_future_tokens + 1
    notes, new_sd = [], {}
    for name in model.state_dict():
        src_name = name
        for k in range(cfg.n_future_tokens):
            prefix = _head_prefix(dst_main, k)
            if name.startswith(prefix):
                src_k = k if k < src_cfg.n_future_tokens else 0
                src_name = _head_prefix(src_main, src_k) + name[len(prefix):]
                if src_k != k and name.endswith("attention_norm.weight"):
                    notes.append(f"head {k + 1} initialised from saved head 1")
                break
        new_sd[name] = src[src_name]
    if src_cfg.n_future_tokens > cfg.n_future_tokens:
        notes.append(f"dropped saved heads {cfg.n_future_tokens + 1}..{src_cfg.n_future_tokens}")
    model.load_state_dict(new_sd, strict=True)
    return notes
