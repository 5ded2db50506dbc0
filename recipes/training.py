"""A recipe's models trained by mtp-train, one process (or one launcher) per model, and stopped cleanly.

A model's training is `mtp-train --config FOLDER/recipe_train.yaml --train.resume auto`, so a re-run continues
from the newest checkpoint, and a model with final/ is kept. On GPUs the command runs under a launcher given as a
prefix ("torchrun --nproc_per_node 8", "deepspeed --num_gpus 8", "srun python" inside a Slurm allocation), with a
DeepSpeed config and any mtp-train override (a parallel layout, activation checkpointing) appended.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml


class RecipeError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(f"[mtp-recipe] {msg}", flush=True)


@dataclass(frozen=True)
class TrainCommand:
    launcher: str = ""  # a command prefix that starts the ranks; "": one local process
    deepspeed_config: str | None = None
    overrides: tuple[str, ...] = ()  # mtp-train arguments, e.g. ("--parallel.tensor", "2")

    def argv(self, config: Path) -> list[str]:
        if self.launcher:
            # Launchers take a script path; pretrain/train.py drops its own folder from sys.path when run so.
            start = shlex.split(self.launcher) + [importlib.util.find_spec("mtplm.pretrain.train").origin]
        else:
            start = [sys.executable, "-m", "mtplm.pretrain.train"]
        ds = ["--deepspeed_config", self.deepspeed_config] if self.deepspeed_config else []
        return start + ["--config", str(config), "--train.resume", "auto", *ds, *self.overrides]


def threads_per_job(jobs: int) -> int | None:
    """OMP threads for each of `jobs` processes side by side: the cores shared out, unless OMP_NUM_THREADS is set
    (more threads than cores make a step many times slower)."""
    if jobs == 1 or "OMP_NUM_THREADS" in os.environ:
        return None
    return max(1, os.cpu_count() // jobs)


TRAINING: set[subprocess.Popen] = set()  # the mtp-train processes running, for a stop to reach them


def stop_training() -> None:
    """Ask every running mtp-train to checkpoint and stop (it takes a repeated request as one)."""
    for proc in list(TRAINING):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)


class Stopped(Exception):
    pass


def raise_stopped(signum, frame):
    raise Stopped(signal.Signals(signum).name)


def train(folder: Path, cfg: dict, command: TrainCommand, threads: int | None = None) -> None:
    if (folder / "final" / "params.json").is_file():
        log(f"{folder.name}: trained already")
        return
    folder.mkdir(parents=True, exist_ok=True)
    cfg_path = folder / "recipe_train.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    log(f"{folder.name}: training ({cfg['train']['steps']} steps), log in {folder / 'train.out'}")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads)) if threads else None
    argv = command.argv(cfg_path)
    with open(folder / "train.out", "a") as f:
        try:
            proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=env)
        except OSError as e:
            raise RecipeError(f"cannot start {argv[0]!r} ({e.strerror}); check --launcher") from None
        TRAINING.add(proc)
        try:
            rc = proc.wait()
        except BaseException:  # interrupted: let the trainer checkpoint (subprocess.run would kill it)
            stop_training()
            proc.wait()
            raise
        finally:
            TRAINING.discard(proc)
    if rc != 0:
        tail = (folder / "train.out").read_text().splitlines()[-15:]
        raise RecipeError(f"{folder.name}: mtp-train exited with status {rc}; its last lines:\n" + "\n".join(tail))
