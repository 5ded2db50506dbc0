"""mtp-generate: text from a trained model, with or without self-speculative decoding.

    mtp-generate runs/demo/final --prompt "def parse(" --max-new-tokens 64
    mtp-generate runs/1b/hf --prompts-file prompts.txt --draft-heads 3 --batch-size 8 --temperature 0.8
    mtp-generate runs/demo/final --prompt "import os" --no-speculative

MODEL is a consolidated folder (params.json + model.safetensors, written at the end of training) or a
Hugging Face export with its heads (mtp-export-hf). Prints each completion, then tokens per forward
(the paper's "average accepted"), the acceptance rate at each draft position and tokens/s.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mtplm.model.config import ConfigError
from mtplm.pretrain.config import config_error_exit, from_dict, parse_overrides

from .speculative import MTPGenerator


@dataclass
class GenerateConfig:
    prompt: list[str] = field(default_factory=list)
    prompts_file: str | None = None  # one prompt per line; "\n" inside a line stands for a newline
    max_new_tokens: int = 128
    draft_heads: int | None = None  # default: every extra head
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 8
    tokenizer: str | None = None  # default: tokenizer.model beside the model, or bytes for a 256-token vocab
    dtype: str = "fp32"
    device: str = "auto"

    def __post_init__(self):
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ConfigError("max_new_tokens and batch_size must be >= 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ConfigError(f"temperature must be >= 0 and top_p in (0, 1], got {self.temperature}, {self.top_p}")
        if self.dtype not in ("fp32", "bf16", "fp16"):
            raise ConfigError(f"dtype: expected fp32, bf16 or fp16, got {self.dtype!r}")


def load_any(path: Path):
    if (path / "config.json").is_file():
        from mtplm.pretrain.hf_import import load_hf_export

        return load_hf_export(path)
    from mtplm.model.weights import load_model

    return load_model(path)


def main(argv: list[str] | None = None) -> int:
    from mtplm.data.tokenizer import load_tokenizer

    parser = argparse.ArgumentParser(prog="mtp-generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--prompt", action="append", default=[])
    parser.add_argument("--speculative", dest="speculative", action="store_true", default=True)
    parser.add_argument("--no-speculative", dest="speculative", action="store_false")
    args, rest = parser.parse_known_args(argv)
    try:
        cfg = from_dict(GenerateConfig, {**parse_overrides(rest), "prompt": args.prompt})
    except ConfigError as e:
        config_error_exit(e, "mtp-generate")
    path = Path(args.model)
    try:
        model = load_any(path)
    except (FileNotFoundError, ValueError) as e:
        print(f"mtp-generate: {e}", file=sys.stderr)
        return 1
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.dtype]
    model = model.to(device=device, dtype=dtype)
    tok_spec = cfg.tokenizer or (path / "tokenizer.model" if (path / "tokenizer.model").is_file() else
                                 ("bytes" if model.cfg.vocab_size == 256 else None))
    if tok_spec is None:
        print(f"mtp-generate: no tokenizer.model in {path}; pass --tokenizer", file=sys.stderr)
        return 1
    tok = load_tokenizer(tok_spec)
    prompts = list(cfg.prompt)
    if cfg.prompts_file:
        prompts += [line.rstrip("\n").replace("\\n", "\n") for line in open(cfg.prompts_file) if line.strip()]
    if not prompts:
        print("mtp-generate: give --prompt TEXT or --prompts-file FILE", file=sys.stderr)
        return 2
    k = (cfg.draft_heads if cfg.draft_heads is not None else model.cfg.n_future_tokens - 1) if args.speculative else 0
    gen = MTPGenerator(model)
    totals = None
    for start in range(0, len(prompts), cfg.batch_size):
        chunk = prompts[start:start + cfg.batch_size]
        try:
            outs, stats = gen.generate([tok.encode(p) or [tok.eod_id] for p in chunk], cfg.max_new_tokens, k,
                                       cfg.temperature, cfg.top_p, stop_tokens=[tok.eod_id], seed=cfg.seed + start)
        except ValueError as e:
            print(f"mtp-generate: {e}", file=sys.stderr)
            return 1
        for p, o in zip(chunk, outs):
            print(f"=== {p!r}\n{p}{tok.decode(o)}\n")
        totals = stats if totals is None else totals + stats
    acc = " ".join(f"{a:.2f}" for a in totals.acceptance) or "-"
    print(f"[{'speculative, ' + str(k) + ' draft heads' if k else 'plain decoding'}] {totals.tokens} tokens, "
          f"{totals.tokens_per_forward:.2f} tokens per forward, acceptance per draft position [{acc}], "
          f"{totals.tokens_per_second:.1f} tokens/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
