"""train_synthetic.py with a probe on every optimizer step: the learning rate in the param groups of the
torch optimizer at the moment it steps, appended to <out_dir>/applied_lr.jsonl by rank 0 as
{"pid": ..., "step": s, "lr": [one per param group]} (ZeRO-1/2 step the torch optimizer once per group). Independent of the trainer's own lr logging."""

import json
import os
import sys
from pathlib import Path

from torch.optim.optimizer import register_optimizer_step_pre_hook

import train_synthetic
from mtplm.pretrain.trainer import Trainer

_current = {"step": None}
_train_step = Trainer.train_step


def train_step(self, batches):
    _current["step"] = self.step + 1
    return _train_step(self, batches)


def record(optimizer, args, kwargs):
    if int(os.environ.get("RANK", "0")) != 0 or _current["step"] is None:
        return
    out = Path(sys.argv[sys.argv.index("--train.out_dir") + 1])
    with open(out / "applied_lr.jsonl", "a") as f:
        f.write(json.dumps({"pid": os.getpid(), "step": _current["step"], "lr": [g["lr"] for g in optimizer.param_groups]}) + "\n")


if __name__ == "__main__":
    Trainer.train_step = train_step
    register_optimizer_step_pre_hook(record)
    train_synthetic.main()
