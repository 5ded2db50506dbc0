"""Training entry point.

    deepspeed [launcher options] pretrain/train.py --config configs/tiny.yaml \
        --deepspeed_config ds_configs/zero1.json [--section.key value ...]
    mtp-train --config configs/tiny.yaml            # a single process, no launcher needed
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

# Run as a file (the deepspeed launcher's way), Python puts pretrain/ first on sys.path, where config.py
# and its neighbours would shadow any top-level module of those names. Imports here are all mtplm.*.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

from mtplm.pretrain.config import ConfigError, TrainConfig, config_error_exit, load_config


def parse_args(argv: list[str] | None = None, check_datasets: bool = False) -> TrainConfig:
    """The config, with everything that needs no process group checked (the DeepSpeed JSON, the files the run
    reads; data.datasets too with check_datasets), so a refusal is the last line printed, before DeepSpeed starts
    up. Exits with status 2 on a configuration error."""
    parser = argparse.ArgumentParser(
        prog="mtp-train", description="Pretrain a multi-token prediction model with DeepSpeed.",
        epilog="Any config key can be overridden as --section.key value, e.g. --model.n_future_tokens 4.")
    parser.add_argument("--config", help="YAML or JSON training config")
    parser.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config",
                        help="DeepSpeed JSON (ZeRO, precision); same as --train.deepspeed_config")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="set by the deepspeed launcher; LOCAL_RANK from the environment is used")
    args, overrides = parser.parse_known_args(argv)
    if args.deepspeed_config:
        overrides += ["--train.deepspeed_config", args.deepspeed_config]
    # The checks load torch and the data pipeline: not before --help has been answered.
    from mtplm.pretrain.preflight import check_input_files, check_layout

    try:
        cfg = load_config(TrainConfig, args.config, overrides)
        # The layout first (world size, ZeRO stage against pipeline stages), then the files it would read.
        check_layout(cfg)
        check_input_files(cfg, datasets=check_datasets)
    except ConfigError as e:
        config_error_exit(e, "mtp-train")
    return cfg


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv, check_datasets=True)
    from mtplm.pretrain.trainer import Trainer

    try:
        trainer = Trainer(cfg)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"mtp-train: {e}", file=sys.stderr)
        return 2
    from mtplm.pretrain.checkpointing.checkpoint import CheckpointSaveError

    try:
        result = trainer.train()
    except CheckpointSaveError as e:
        print(f"mtp-train: {e}", file=sys.stderr)
        return 1
    return exit_status(result)


def exit_status(result) -> int:
    """0 for a finished run. A run stopped on request (with a complete checkpoint) follows the shell's 128 +
    signal: 130 after Ctrl-C; 143 after SIGTERM or Slurm's warning signal (launch/slurm_train.sh requeues on
    143), and on a rank that stopped because another rank was signalled."""
    if not result.stopped_by_signal:
        return 0
    return 130 if result.stop_signal == signal.SIGINT else 143


if __name__ == "__main__":
    sys.exit(main())
