"""mtp-generate: text from a trained model, with or without self-speculative decoding.

    mtp-generate runs/demo/final --prompt "def parse(" --max-new-tokens 64
    mtp-generate runs/1b/hf --prompts-file prompts.jsonl --draft-heads 3 --batch-size 8 --temperature 0.8
    mtp-generate runs/demo/final --prompt "import os" --no-speculative
    mtp-generate runs/demo/final --prompt "import os" --compile

--compile: compile the decoding step with static shapes (torch.compile; CUDA graphs on a GPU, inductor's
fused kernels on a CPU): the same greedy output, after a compilation of tens of seconds per batch size.

MODEL is a consolidated folder (params.json + model.safetensors, written at the end of training) or a
Hugging Face export with its heads (mtp-export-hf). Prints each completion, then tokens per forward
(the paper's "average accepted"), the acceptance rate at each draft position and tokens/s.

--prompts-file: a .jsonl file holds one {"prompt": "..."} object per line (JSON escapes, so any text); any
other file one prompt per line, taken as it is (no escapes, no newlines inside a prompt).
--prompt-overflow: a prompt with no room left in the model's context (max_seq_len) is refused (error, the
default) or cut to its last max_seq_len - 1 tokens with a warning (truncate-left). A sequence stops at
max_seq_len tokens, prompt included, and is marked as stopped at the context limit.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mtplm.config import ConfigError, config_error_exit, from_dict, parse_overrides
from mtplm.data.console import quiet_on_closed_stdout

from .speculative import PROMPT_OVERFLOW, MTPGenerator, fit_prompt
from .task_eval import read_jsonl_objects, read_lines, require_str


@dataclass
class GenerateConfig:
    prompt: list[str] = field(default_factory=list)
    prompts_file: str | None = None  # .jsonl: {"prompt": ...} per line; otherwise one prompt per line, verbatim
    max_new_tokens: int = 128
    draft_heads: int | None = None  # default: every extra head
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 8
    tokenizer: str | None = None  # default: tokenizer.model beside the model, or bytes for a 256-token vocab
    dtype: str = "fp32"
    device: str = "auto"
    prompt_overflow: str = "error"  # or truncate-left: a prompt past the model's context keeps its last tokens

    def __post_init__(self):
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ConfigError("max_new_tokens and batch_size must be >= 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ConfigError(f"temperature must be >= 0 and top_p in (0, 1], got {self.temperature}, {self.top_p}")
        if self.dtype not in ("fp32", "bf16", "fp16"):
            raise ConfigError(f"dtype: expected fp32, bf16 or fp16, got {self.dtype!r}")
        if self.prompt_overflow not in PROMPT_OVERFLOW:
            raise ConfigError(f"prompt_overflow: expected {' or '.join(PROMPT_OVERFLOW)}, got {self.prompt_overflow!r}")


def read_prompts(path: str) -> list[tuple[str, str]]:
    """(file:line, prompt) for each prompt of a prompts file: a .jsonl file holds one {"prompt": ...} object per
    line, any other file one prompt per line, verbatim; blank lines are skipped. Raises ValueError naming the
    file and line of anything else."""
    if path.endswith(".jsonl"):
        return [(where, require_str(where, obj, "prompt")) for where, obj in read_jsonl_objects(path, "prompts")]
    numbered = [(f"{path}:{n}", line) for n, line in enumerate(read_lines(path, "prompts"), 1) if line.strip()]
    if not numbered:  # otherwise reported as if no prompts file had been given
        raise ValueError(f"{path}: holds no records (it is empty or blank)")
    return numbered


def load_any(path: Path):
    if (path / "config.json").is_file():
        from mtplm.conversion.hf_import import load_hf_export

        return load_hf_export(path)
    from mtplm.model.weights import load_model

    return load_model(path)


@quiet_on_closed_stdout
def main(argv: list[str] | None = None) -> int:
    from mtplm.data.tokenizer import load_tokenizer

    parser = argparse.ArgumentParser(prog="mtp-generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--prompt", action="append", default=[])
    parser.add_argument("--speculative", dest="speculative", action="store_true", default=True)
    parser.add_argument("--no-speculative", dest="speculative", action="store_false")
    parser.add_argument("--compile", action="store_true", help="compiled static-shape decoding step")
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
    named = [(f"--prompt #{i}", p) for i, p in enumerate(cfg.prompt, 1)]
    try:
        if cfg.prompts_file:
            named += read_prompts(cfg.prompts_file)
        warn = lambda msg: print(f"mtp-generate: warning: {msg}", file=sys.stderr)  # noqa: E731
        # Checked here, before any generation, so that a refusal names the prompt's file and line.
        encoded = [fit_prompt(tok.encode(p) or [tok.eod_id], model.cfg.max_seq_len, cfg.prompt_overflow, name, warn)
                   for name, p in named]
    except ValueError as e:
        print(f"mtp-generate: {e}", file=sys.stderr)
        return 1
    if not named:
        print("mtp-generate: give --prompt TEXT or --prompts-file FILE", file=sys.stderr)
        return 2
    k = (cfg.draft_heads if cfg.draft_heads is not None else model.cfg.n_future_tokens - 1) if args.speculative else 0
    gen = MTPGenerator(model)
    totals = None
    for start in range(0, len(named), cfg.batch_size):
        chunk = named[start:start + cfg.batch_size]
        try:
            outs, stats = gen.generate(encoded[start:start + cfg.batch_size], cfg.max_new_tokens, k, cfg.temperature,
                                       cfg.top_p, stop_tokens=[tok.eod_id], seed=cfg.seed + start,
                                       compile=args.compile)
        except ValueError as e:
            print(f"mtp-generate: {e}", file=sys.stderr)
            return 1
        for (_, p), o, reason in zip(chunk, outs, stats.finish_reasons):
            limit = f"[stopped at the context limit, max_seq_len {model.cfg.max_seq_len}]\n" * (reason == "context")
            print(f"=== {p!r}\n{p}{tok.decode(o)}\n{limit}")
        totals = stats if totals is None else totals + stats
    # a position never judged (its earlier drafts were never all accepted) has no rate: '-', not nan
    acc = " ".join(f"{a:.2f}" if p else "-" for a, p in zip(totals.acceptance, totals.proposed)) or "-"
    limited = f", {totals.context_limited} stopped at the context limit" if totals.context_limited else ""
    mode = ("speculative, " + str(k) + " draft heads" if k else "plain decoding") + ", compiled" * args.compile
    print(f"[{mode}] {totals.tokens} tokens, "
          f"{totals.tokens_per_forward:.2f} tokens per forward, acceptance per draft position [{acc}], "
          f"{totals.tokens_per_second:.1f} tokens/s{limited}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
