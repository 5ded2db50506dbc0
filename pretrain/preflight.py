"""Start-up checks: what can be refused before any process group exists, so that a refusal is the last line a
run prints, before DeepSpeed starts up. The entry points check the files a run reads (check_input_files) and the
layout (check_layout), which the trainer checks too, as it may be started without them.

Loading a config (config.py) checks the config itself; these checks read the filesystem and the environment.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mtplm.data.loader import check_dataset
from mtplm.data.manifest import resolve_shards
from mtplm.data.tokenizer import BYTE_TOKENIZER, load_tokenizer
from mtplm.inference.task_eval import read_tasks
from mtplm.model.weights import PARAMS_FILE, WEIGHTS_FILE

from .checkpointing.checkpoint import checkpoint_dir, complete_tags, resolve_resume
from .config import ConfigError, TrainConfig
from .distributed import DistInfo
from .ds_config import build_ds_config
from .parallel.layout import check_world_size


def check_layout(cfg: TrainConfig, dist_info: DistInfo | None = None) -> tuple[int, dict]:
    """(data-parallel size, DeepSpeed config): the world (dist_info's, else the launcher's WORLD_SIZE) tiled by
    the layout, then the DeepSpeed JSON against it (ZeRO stage against pipeline stages, the batch)."""
    dp_world = check_world_size(cfg, dist_info.world_size if dist_info else None)
    on_cpu = dist_info.on_cpu if dist_info else not torch.cuda.is_available()
    return dp_world, build_ds_config(cfg, cfg.train.deepspeed_config, dp_world, on_cpu)


def check_input_files(cfg: TrainConfig, datasets: bool = True) -> None:
    """The files the run reads exist, and out_dir holds no other run's checkpoints. `datasets`: the run reads
    cfg.data (not when a caller brings its own loaders)."""
    d, t = cfg.data, cfg.train
    if datasets:
        if not d.datasets:
            raise ConfigError("data.datasets: empty; give dataset folders or prefixes written by mtp-preprocess")
        for k, spec in enumerate(d.datasets):
            try:
                prefixes, _ = resolve_shards(spec)
            except (OSError, ValueError, KeyError) as e:
                raise ConfigError(f"data.datasets[{k}]: {e}") from None
            for prefix in prefixes:
                for ext in (".idx", ".bin"):
                    if not Path(f"{prefix}{ext}").is_file():
                        raise ConfigError(f"data.datasets[{k}]: {spec}: shard {prefix}{ext} is missing")
    tokenizer = None
    if d.tokenizer and d.tokenizer != BYTE_TOKENIZER and not Path(d.tokenizer).is_file():
        raise ConfigError(f"data.tokenizer: {d.tokenizer} is not a file (a SentencePiece .model, or "
                          f"'{BYTE_TOKENIZER}' for the byte-level tokenizer)")
    if d.tokenizer:
        try:
            tokenizer = load_tokenizer(d.tokenizer)
        except (OSError, ValueError) as e:
            raise ConfigError(f"data.tokenizer: {e}") from None
    if datasets:  # what the manifests say against the model and tokenizer; a scan of unlabelled data waits
        for k in range(len(d.datasets)):
            try:
                check_dataset(d, k, cfg.model.vocab_size, tokenizer.sha256 if tokenizer else None, scan=False)
            except (OSError, ValueError) as e:
                raise ConfigError(f"data.datasets[{k}]: {e}") from None
    out = Path(t.out_dir)
    blocker = next((p for p in (out, *out.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise ConfigError(f"train.out_dir: {t.out_dir}: {blocker} is a file, not a folder")
    if t.init_from and not all((Path(t.init_from) / f).is_file() for f in (PARAMS_FILE, WEIGHTS_FILE)):
        raise ConfigError(f"train.init_from: {t.init_from} is not a consolidated model folder (needs {PARAMS_FILE} "
                          f"and {WEIGHTS_FILE}; mtp-export or the end of training writes one)")
    try:
        resolve_resume(t.resume, t.out_dir)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    if t.eval_tasks and not d.tokenizer:
        raise ConfigError("train.eval_tasks: needs data.tokenizer (the prompts and answers are text)")
    for k, path in enumerate(t.eval_tasks):
        try:
            read_tasks(path)
        except ValueError as e:
            raise ConfigError(f"train.eval_tasks[{k}]: {e}") from None
    # A re-run of the same command must not silently train over a run's checkpoints from step 0.
    done = complete_tags(checkpoint_dir(out)) if t.resume == "none" and checkpoint_dir(out).is_dir() else []
    if done:
        raise ConfigError(f"train.out_dir: {out} already holds this or another run's checkpoints (newest "
                          f"{done[-1]}); pass --train.resume auto to continue it, or choose another train.out_dir "
                          f"(or delete {out} to start over)")
