"""The README demo: train a tiny n=4 MTP model on the Python standard library's own source, then write code.

    mtp-demo [--config configs/demo.yaml] [--section.key value ...]

Steps: train a SentencePiece tokenizer on the stdlib's non-test .py files, tokenize them, train with the
real trainer (DeepSpeed engine, sequential heads) on the CPU for a few minutes, print how every head's
loss fell, and generate a few lines of code from the consolidated model it wrote.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from mtplm.pretrain.config import ConfigError, TrainConfig, config_error_exit, load_config

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "lib2to3", "turtledemo", "__pycache__", "tkinter"}


def stdlib_sources(max_files: int | None = None) -> list[Path]:
    root = Path(os.__file__).resolve().parent
    files = sorted(p for p in root.rglob("*.py")
                   if not SKIP_DIRS.intersection(p.relative_to(root).parts) and not p.name.startswith("test_"))
    return files[:max_files] if max_files else files


def read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


class PackedStream:
    """Fixed-length samples (seq_len + n tokens, packed across documents) from an in-memory token array,
    drawn in a seeded order and split across data-parallel ranks like the real loader. The demo's corpus
    fits in memory; billion-token runs use the memory-mapped shards of mtp-preprocess instead."""

    def __init__(self, tokens: np.ndarray, sample_len: int, micro_batch: int, seed: int, start: int = 0,
                 rank: int = 0, world: int = 1, shuffle: bool = True):
        self.tokens, self.sample_len, self.mb = tokens, sample_len, micro_batch
        self.rank, self.world, self.start = rank, world, start
        n_samples = (len(tokens) - 1) // (sample_len - 1)  # consecutive samples overlap by one token
        order = np.random.default_rng(seed).permutation(n_samples) if shuffle else np.arange(n_samples)
        self.offsets = order * (sample_len - 1)

    def __iter__(self):
        i = self.start
        while True:
            idx = [(i + self.rank * self.mb + j) % len(self.offsets) for j in range(self.mb)]
            yield torch.stack([torch.from_numpy(self.tokens[o:o + self.sample_len].astype(np.int64))
                               for o in self.offsets[idx]])
            i += self.mb * self.world


def build_corpus(out_dir: Path, vocab_size: int, log) -> tuple[Path, np.ndarray, np.ndarray, int]:
    from mtplm.data.tokenizer import load_tokenizer, train_sentencepiece

    files = stdlib_sources()
    random.Random(0).shuffle(files)
    n_valid = max(1, len(files) // 100)
    texts = {f: t for f in files if (t := read_text(f))}
    tok_path = out_dir / "tokenizer.model"
    if not tok_path.is_file():
        t0 = time.time()
        train_sentencepiece((texts[f] for f in files[n_valid:] if f in texts), out_dir / "tokenizer", vocab_size,
                            max_sentences=200_000)
        log(f"trained a {vocab_size}-piece SentencePiece BPE tokenizer on the stdlib in {time.time() - t0:.0f}s")
    tok = load_tokenizer(tok_path)

    def encode(fs):
        ids = []
        for f in fs:
            if f in texts:
                ids.extend(tok.encode(texts[f]))
                ids.append(tok.eod_id)
        return np.asarray(ids, dtype=np.uint16 if tok.vocab_size < 65536 else np.int32)

    t0 = time.time()
    valid, train = encode(files[:n_valid]), encode(files[n_valid:])
    log(f"tokenized {len(texts)} stdlib files ({sum(len(t) for t in texts.values()) / 1e6:.1f} MB) into "
        f"{len(train) / 1e6:.2f}M train and {len(valid) / 1e3:.0f}K validation tokens in {time.time() - t0:.0f}s")
    return tok_path, train, valid, tok.vocab_size


def generate_greedy(model, tok, prompt: str, max_new_tokens: int) -> str:
    """Plain greedy decoding with head 1 (no cache; the demo model is tiny)."""
    ids = tok.encode(prompt)
    model.eval()
    with torch.no_grad():
        for _ in range(max_new_tokens):
            x = torch.tensor([ids[-model.cfg.max_seq_len:]])
            nxt = int(model(x).logits[0, -1].argmax())
            if nxt == tok.eod_id:
                break
            ids.append(nxt)
    return tok.decode(ids)


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
    tok_path, train_ids, valid_ids, vocab = build_corpus(out_dir, cfg.model.vocab_size, log)
    cfg.data.tokenizer = str(tok_path)

    from mtplm.pretrain.trainer import Trainer

    sample_len = cfg.data.seq_len + cfg.model.n_future_tokens
    mb = cfg.train.micro_batch_size

    def loaders(consumed: int):
        return (PackedStream(train_ids, sample_len, mb, cfg.data.seed, start=consumed),
                PackedStream(valid_ids, sample_len, mb, cfg.data.seed, shuffle=False))

    log(f"training an n={cfg.model.n_future_tokens} model for {cfg.train.steps} steps on the CPU "
        f"(per-head losses below: head k predicts token t+k)")
    t0 = time.time()
    result = Trainer(cfg, data_loaders=loaders).train()
    log(f"trained in {time.time() - t0:.0f}s")

    first, last = result.train_log[0], result.train_log[-1]
    log("per-head training loss, first step -> last step:")
    for k, (a, b) in enumerate(zip(first["head_losses"], last["head_losses"])):
        log(f"  head {k + 1} (token t+{k + 1}): {a:.3f} -> {b:.3f}")
    if result.eval_log:
        log("validation loss per head: " + " ".join(f"{x:.3f}" for x in result.eval_log[-1]["head_losses"]))

    from mtplm.data.tokenizer import load_tokenizer
    from mtplm.model.weights import load_model

    model = load_model(out_dir / "final")
    tok = load_tokenizer(out_dir / "final" / "tokenizer.model")
    log(f"model and tokenizer written to {out_dir / 'final'}; a sample of generated code (greedy, head 1):")
    for prompt in ("import os\n\n\ndef ", "class Config:\n    def __init__(self"):
        print("-" * 60)
        print(generate_greedy(model, tok, prompt, max_new_tokens=60))
    print("-" * 60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
