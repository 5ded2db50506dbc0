"""The README demo: train a tiny n=4 MTP model on the Python standard library's own source, then write code.

    mtp-demo [--config configs/demo.yaml] [--section.key value ...]

Steps: preprocess the stdlib's non-test .py files with mtp-preprocess's code (a SentencePiece tokenizer trained
on them, memory-mapped shards), train with the real trainer and data loader (DeepSpeed engine, sequential
heads) on the CPU for a few minutes, print how every head's loss fell, and generate a few lines of code from
the consolidated model it wrote.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from mtplm.pretrain.config import ConfigError, TrainConfig, config_error_exit, load_config

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "lib2to3", "turtledemo", "__pycache__", "tkinter"}


def build_corpus(out_dir: Path, vocab_size: int) -> Path:
    """Tokenize the stdlib's source into shards with a tokenizer trained on it (reused when present)."""
    from mtplm.data.preprocess import PreprocessConfig, run_preprocess

    data_dir = out_dir / "data"
    if not (data_dir / "dataset.json").is_file():
        stdlib = str(Path(os.__file__).resolve().parent)
        run_preprocess(PreprocessConfig(
            inputs=[stdlib], output=str(data_dir), include=["*.py"],
            exclude=[f"*/{d}/*" for d in SKIP_DIRS] + ["*/test_*.py"], train_tokenizer=True,
            vocab_size=vocab_size, tokenizer_sample_mb=20, workers=0), log=lambda m: print(f"[demo] {m}"))
    return data_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mtp-demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    args, overrides = parser.parse_known_args(argv)
    try:
        cfg: TrainConfig = load_config(TrainConfig, args.config, overrides)
    except ConfigError as e:
        config_error_exit(e, "mtp-demo")

    out_dir = Path(cfg.train.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = lambda msg: print(f"[demo] {msg}", flush=True)
    data_dir = build_corpus(out_dir, cfg.model.vocab_size)
    cfg.data.datasets, cfg.data.tokenizer = [str(data_dir)], str(data_dir / "tokenizer.model")

    from mtplm.pretrain.trainer import Trainer

    import torch

    where = "the GPU" if torch.cuda.is_available() else "the CPU"
    log(f"training an n={cfg.model.n_future_tokens} model for {cfg.train.steps} steps on {where} "
        f"(per-head losses below: head k predicts token t+k)")
    t0 = time.time()
    result = Trainer(cfg).train()
    log(f"trained in {time.time() - t0:.0f}s")

    first, last = result.train_log[0], result.train_log[-1]
    log("per-head training loss, first step -> last step:")
    for k, (a, b) in enumerate(zip(first["head_losses"], last["head_losses"])):
        log(f"  head {k + 1} (token t+{k + 1}): {a:.3f} -> {b:.3f}")
    if result.eval_log:
        log("validation loss per head: " + " ".join(f"{x:.3f}" for x in result.eval_log[-1]["head_losses"]))

    from mtplm.data.tokenizer import load_tokenizer
    from mtplm.model.weights import load_model

    from mtplm.inference.speculative import MTPGenerator

    model = load_model(out_dir / "final")
    tok = load_tokenizer(out_dir / "final" / "tokenizer.model")
    log(f"model and tokenizer written to {out_dir / 'final'}; generated code (self-speculative sampling with "
        f"{model.cfg.n_future_tokens - 1} draft heads, temperature 0.7: the same distribution as plain sampling):")
    prompts = ["import os\n\n\ndef ", "class Config:\n    def __init__(self", "    for i in range("]
    outs, stats = MTPGenerator(model).generate([tok.encode(p) for p in prompts], 60, temperature=0.7, top_p=0.95,
                                               stop_tokens=[tok.eod_id], seed=0)
    for prompt, out in zip(prompts, outs):
        print("-" * 60)
        print(prompt + tok.decode(out))
    print("-" * 60)
    log(f"{stats.tokens_per_forward:.2f} tokens per forward; draft acceptance by position: "
        + " ".join(f"{a:.2f}" for a in stats.acceptance))
    write_plots(out_dir, cfg.train.metrics_file, log)
    log(f"next: mtp-generate {out_dir / 'final'} --prompt 'def main(' ; mtp-export-hf {out_dir / 'checkpoints'} "
        f"{out_dir / 'hf'}")
    return 0


def write_plots(out_dir: Path, metrics_file: str, log) -> None:
    """The run's loss, learning-rate, throughput and acceptance plots (mtp-plot's), when matplotlib is there."""
    from mtplm.pretrain.plot import PLOT_EXTRA, Run, matplotlib_available, plot_runs, read_metrics

    if not matplotlib_available():
        log(f"no plots: {PLOT_EXTRA}")
        return
    paths = plot_runs([Run("demo", *read_metrics(out_dir, metrics_file))], out_dir / "plots")
    log("plots: " + " ".join(str(p) for p in paths))


if __name__ == "__main__":
    sys.exit(main())
