"""One rank of a lean build (pretrain/build_model.py under ZeRO-1), compared with the whole build of today.

    python tests/workers/lean_build.py OUT_DIR --config cfg.json --parallel.tensor 2 ... (train config overrides)

Writes OUT_DIR/rank<r>.json: the parameters whose local tensor is not the rank's slice of the single-process
model built from the same seed (and loaded with init_from's load_initial_weights into the whole model, as the
build always did), whether the random generator ends where the whole construction leaves it, what the pipeline
module keeps that was left on the meta device, and the bytes involved: the peak of CPU storage alive during the
build (every storage created, until it is freed), what the rank keeps, the largest full parameter, the model.
"""

import json
import sys
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from mtplm.model.transformer import MTPTransformer
from mtplm.pretrain.build_model import build_model
from mtplm.pretrain.distributed import init_distributed
from mtplm.pretrain.ds_config import build_ds_config
from mtplm.pretrain.checkpointing.init_from import load_initial_weights
from mtplm.pretrain.parallel.layout import build_layout
from mtplm.pretrain.parallel.pipeline import build_pipeline_module
from mtplm.pretrain.train import parse_args


class LiveStorageBytes(TorchDispatchMode):
    """Bytes of the non-meta storages created by operators inside the mode that are still alive, and their peak."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.seen = set()

    def _free(self, key, nbytes):
        self.seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and not t.is_meta:
                s = t.untyped_storage()
                key = s._cdata
                if key not in self.seen:
                    self.seen.add(key)
                    self.live += s.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(s, self._free, key, s.nbytes())
        return out


def main():
    out_dir = Path(sys.argv[1])
    cfg = parse_args(sys.argv[2:])
    info = init_distributed()
    layout = build_layout(cfg, info.rank, info.world_size)
    ds_cfg = build_ds_config(cfg, cfg.train.deepspeed_config, layout.dp_world, info.on_cpu)
    torch.manual_seed(cfg.train.seed)
    with LiveStorageBytes() as mem:
        model, notes = build_model(cfg, ds_cfg, layout)
    rng_after = torch.get_rng_state()

    torch.manual_seed(cfg.train.seed)
    whole = MTPTransformer(cfg.model)
    same_rng = torch.equal(rng_after, torch.get_rng_state())
    whole_notes = load_initial_weights(whole, cfg.train.init_from) if cfg.train.init_from else notes
    ref = whole.state_dict()

    tp = layout.tensor
    local = {name: p for name, p in model.named_parameters() if not p.is_meta}
    mismatched = []
    for name, p in local.items():
        expected = ref[name]
        if getattr(p, "tensor_model_parallel", False):
            expected = expected.chunk(tp.world, dim=p.partition_dim)[tp.rank]
        if p.device.type != "cpu" or p.dtype != expected.dtype or not torch.equal(p.detach(), expected):
            mismatched.append(name)
    meta_kept, extra = [], []
    if layout.pipeline:
        module, _ = build_pipeline_module(model, layout.grid.topology(), cfg.parallel.pipeline_partition)
        meta_kept = [name for name, p in module.named_parameters() if p.is_meta]
        extra = sorted(set(local) - {n for n, p in model.named_parameters() if any(p is q for q in module.parameters())})
    else:
        meta_kept = [name for name, p in model.named_parameters() if p.is_meta]
    unique = {id(p): p for p in local.values()}.values()
    (out_dir / f"rank{info.rank}.json").write_text(json.dumps({
        "mismatched": mismatched, "same_rng": same_rng, "meta_kept": meta_kept, "kept_but_dropped": extra,
        "notes": notes, "whole_notes": whole_notes, "n_local": len(local),
        "peak": mem.peak, "kept": sum(p.numel() * p.element_size() for p in unique),
        "largest": max(v.numel() * v.element_size() for v in ref.values()),
        "whole": sum(p.numel() * p.element_size() for p in whole.parameters()),
        "model_parallel": cfg.parallel.tensor * cfg.parallel.pipeline,
    }))


if __name__ == "__main__":
    main()
