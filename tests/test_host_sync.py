"""No host synchronisation inside a training step: the step's figures stay device tensors until the trainer reads
them, all at once, at a log step (or before evaluating, saving or stopping), and metrics.jsonl still holds one
record per step with the values a log_interval=1 run writes.

On the CPU there is no device to wait for, so the test counts what would wait on one: every conversion of a tensor
to a Python value (item, float, int, bool, tolist, cpu, numpy) made by this project's code (model/, pretrain/)
inside a step. Run as a script, this file is the worker (a trainer in its own process, as mtp-train runs)."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_model_config
from dist_launch import REPO
from test_checkpoint_resume import TINY

CONVERSIONS = ("item", "__float__", "__int__", "__bool__", "tolist", "cpu", "numpy")
OURS = (str(REPO / "model"), str(REPO / "pretrain"))


def run(tmp_path: Path, name: str, *args: str) -> subprocess.CompletedProcess:
    cfg = copy.deepcopy(TINY)
    cfg["train"].update(steps=6, save_interval=0, log_interval=1)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    return subprocess.run([sys.executable, __file__, "--config", str(tmp_path / "cfg.json"),
                           "--train.out_dir", str(tmp_path / name), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_steps_between_log_steps_do_not_read_the_device_and_log_the_same_values(tmp_path):
    every = run(tmp_path, "every")
    assert every.returncode == 0, every.stdout[-3000:] + every.stderr[-3000:]
    proc = run(tmp_path, "sparse", "--train.log_interval", "4", "--train.eval_interval", "3")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    conversions = json.loads((tmp_path / "sparse" / "conversions.json").read_text())
    assert conversions == {}, f"host reads inside steps (step: [caller, ...]): {conversions}"
    a, b = records(tmp_path / "every"), records(tmp_path / "sparse")
    assert [(r["kind"], r["step"]) for r in b] == [
        ("train", 1), ("train", 2), ("train", 3), ("valid", 3), ("train", 4), ("train", 5), ("train", 6),
        ("valid", 6)]
    figures = ("loss", "head_losses", "lr", "grad_norm", "consumed_samples", "consumed_tokens")
    train_a = [{k: r[k] for k in figures} for r in a]
    assert [{k: r[k] for k in figures} for r in b if r["kind"] == "train"] == train_a
    assert all(len(r["head_losses"]) == 4 and r["grad_norm"] > 0 for r in train_a)
    log = json.loads((tmp_path / "sparse" / "train_log.json").read_text())["train"]
    assert log == [{k: v for k, v in r.items() if k != "kind"} for r in b if r["kind"] == "train"]


def test_a_non_finite_loss_between_log_steps_is_reported_with_its_step(tmp_path):
    proc = run(tmp_path, "nan", "--train.log_interval", "4", "--nan_at_step", "3")
    assert proc.returncode != 0
    assert "FloatingPointError: loss is nan at step 3" in proc.stderr, proc.stderr[-3000:]
    assert [r["step"] for r in records(tmp_path / "nan")] == [1, 2]


def test_deferred_grad_scale_check_raises_at_the_next_check():
    from mtplm.model.transformer import MTPTransformer

    model = MTPTransformer(tiny_model_config(n_future_tokens=2, n_layers=4))
    model.loss.defer_scale_check = True
    x, labels = torch.randint(0, 200, (2, 9)), torch.randint(0, 200, (2, 10))
    model(x, labels, grad_scale=0.5).loss.mul(0.5).backward()
    model.loss.check_grad_scale()  # the scale it was told: nothing to report
    model(x, labels, grad_scale=1.0).loss.mul(0.5).backward()  # no error yet: it would read the device
    with pytest.raises(RuntimeError, match="scaled the loss by 0.5 but the forward was told grad_scale=1"):
        model.loss.check_grad_scale()
    model.loss.check_grad_scale()  # reported once


def main() -> None:
    """Worker: trains with every conversion our code makes inside Trainer.train_step counted by step."""
    sys.path.insert(0, str(REPO / "tests" / "workers"))
    from train_synthetic import SyntheticLoader, pop_flag

    from mtplm.pretrain.train import parse_args
    from mtplm.pretrain.trainer import Trainer

    argv = sys.argv[1:]
    nan_at = pop_flag(argv, "--nan_at_step")
    cfg = parse_args(argv)
    found, in_step = {}, [None]

    def counted(name):
        original = getattr(torch.Tensor, name)

        def conversion(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if in_step[0] is not None and caller.startswith(OURS):
                found.setdefault(in_step[0], []).append(f"{name} in {Path(caller).name}:{sys._getframe(1).f_lineno}")
            return original(self, *args, **kwargs)
        return conversion

    class CountingTrainer(Trainer):
        def train_step(self, batches):
            in_step[0] = self.step + 1
            try:
                metrics = super().train_step(batches)
            finally:
                in_step[0] = None
            if in_step[0] is None and self.step + 1 == nan_at:
                metrics["loss"] = metrics["loss"] * float("nan")
            return metrics

    for name in CONVERSIONS:
        setattr(torch.Tensor, name, counted(name))
    extra = cfg.model.n_future_tokens
    trainer = CountingTrainer(cfg, data_loaders=lambda consumed, rank, world: (
        SyntheticLoader(cfg, rank, world, extra, consumed), SyntheticLoader(cfg, rank, world, extra)))
    result = trainer.train()
    out = Path(cfg.train.out_dir)
    (out / "conversions.json").write_text(json.dumps(found))
    (out / "train_log.json").write_text(json.dumps({"train": result.train_log}))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
