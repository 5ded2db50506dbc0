"""mtp-eval: per-head loss and draft acceptance on a dataset, task accuracy, code pass@k by execution.

    mtp-eval runs/1b/final --data data/val_set --split valid --limit 2000
    mtp-eval runs/1b/checkpoints --tasks arithmetic.jsonl --max-new-tokens 16 --stop $'\\n'
    mtp-eval runs/1b/hf --code humaneval.jsonl --allow-code-execution --samples 20 --k 1 10 --temperature 0.8

MODEL is a consolidated folder (params.json + model.safetensors; training's final/), a Hugging Face export
(mtp-export-hf), or a training checkpoint (a checkpoints folder, its `latest` is used, or a step_* folder),
consolidated in memory as mtp-export-hf does. Prints a table and writes every figure, with the command line,
the model's config and the data it read, to --output (JSON, written to a temporary name and renamed).

--data: per-head loss and perplexity (same samples and loss path as training's validation) and teacher-forced
draft acceptance with the tokens per forward it implies. The data settings default to the run's own when
MODEL is a training checkpoint.
--tasks: JSONL {"prompt", "answer", ...}; greedy completion, exact match after stripping; accuracy grouped by
every other field.
--code: HumanEval-format JSONL; n samples per problem, each EXECUTED with its tests. Model-written code can do
anything the user running it can (delete files, read keys, use the network); the sandbox (a separate process
with a timeout, memory limit, empty temporary folder and minimal environment) limits accidents, not attacks.
So it runs only with --allow-code-execution; use a throw-away container or VM for models you do not trust.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from pathlib import Path

import torch

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_for_eval(path: Path):
    """(model, kind, training config or {}) from a consolidated folder, an HF export or a training checkpoint."""
    from mtplm.model.transformer import MTPTransformer

    if (path / "config.json").is_file():
        from mtplm.conversion.hf_import import load_hf_export

        return load_hf_export(path), "hf_export", {}
    from mtplm.conversion.consolidate import consolidated_state_dict

    kind = "consolidated" if (path / "params.json").is_file() else "checkpoint"
    sd, cfg, train_cfg = consolidated_state_dict(path)
    model = MTPTransformer(cfg)
    model.load_state_dict(sd, strict=True)
    return model, kind, train_cfg


def model_tokenizer(path: Path, model, train_cfg: dict, override: str | None = None, flag: str = "--tokenizer"):
    """The tokenizer given (override), else the model's tokenizer.model, the run's data.tokenizer, or bytes for a
    256-token vocabulary; ValueError naming `flag` when there is none."""
    from mtplm.data.tokenizer import load_tokenizer

    spec = (override or (path / "tokenizer.model" if (path / "tokenizer.model").is_file() else None)
            or train_cfg.get("data", {}).get("tokenizer") or ("bytes" if model.cfg.vocab_size == 256 else None))
    if spec is None:
        raise ValueError(f"{path}: no tokenizer.model beside the model and none in its training config; "
                         f"pass {flag}")
    return load_tokenizer(spec)


def _data_config(args, model, train_cfg: dict):
    from mtplm.data.config import DataConfig

    known = train_cfg.get("data", {})
    fields = {f.name for f in dataclasses.fields(DataConfig)}
    cfg = DataConfig(**{k: v for k, v in known.items() if k in fields})
    cfg.datasets, cfg.weights, cfg.num_workers = list(args.data), list(args.data_weights or []), 0
    if args.seq_len is not None:
        cfg.seq_len = args.seq_len
    elif "seq_len" not in known:
        cfg.seq_len = model.cfg.max_seq_len
    if args.data_split is not None:
        cfg.split = list(args.data_split)
    if args.data_seed is not None:
        cfg.seed = args.data_seed
    cfg.validate()
    return cfg


def parse_args(argv):
    p = argparse.ArgumentParser(prog="mtp-eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="consolidated folder, Hugging Face export, or training checkpoint folder")
    p.add_argument("--output", default="eval.json", help="JSON file of every figure (default: eval.json)")
    p.add_argument("--completions", metavar="JSONL",
                   help="--tasks: also write every record's completion here (file, line, prompt, answer, completion, "
                        "correct, groups), to score it another way or read what the model wrote")
    g = p.add_argument_group("loss and acceptance on a dataset")
    g.add_argument("--data", nargs="+", default=[], metavar="DATASET",
                   help="dataset folders or Megatron prefixes written by mtp-preprocess (blended like training's)")
    g.add_argument("--data-weights", nargs="+", type=float, metavar="W")
    g.add_argument("--split", choices=["train", "valid", "test"], default="valid")
    g.add_argument("--data-split", nargs=3, type=float, metavar=("TRAIN", "VALID", "TEST"),
                   help="document split ratios (default: the run's data.split, else 0.98 0.02 0)")
    g.add_argument("--seq-len", type=int, help="default: the run's data.seq_len, else the model's max_seq_len")
    g.add_argument("--data-seed", type=int, help="default: the run's data.seed")
    g = p.add_argument_group("task accuracy")
    g.add_argument("--tasks", nargs="+", default=[], metavar="JSONL")
    g.add_argument("--stop", action="append", default=None,
                   help="stop string (repeatable); tasks: none by default, code: Codex's stop sequences")
    g.add_argument("--prepend-eod", action="store_true",
                   help="start every prompt with the end-of-document token, as documents start in packed "
                        "training data (short synthetic tasks trained packed, like the recipes')")
    g = p.add_argument_group("code pass@k (executes model-written code)")
    g.add_argument("--code", metavar="JSONL", help="problems in HumanEval's format")
    g.add_argument("--allow-code-execution", action="store_true",
                   help="required with --code: the model's completions are run as Python on this machine")
    g.add_argument("--samples", type=int, help="completions per problem (default: the largest k)")
    g.add_argument("--k", nargs="+", type=int, default=[1])
    g.add_argument("--temperature", type=float, default=0.8, help="code sampling temperature (0: greedy)")
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--timeout", type=float, default=10.0, help="seconds per test run")
    g.add_argument("--memory-mb", type=int, default=1024, help="address-space limit of a test run")
    g.add_argument("--exec-workers", type=int, default=4, help="test runs at a time")
    g = p.add_argument_group("common")
    g.add_argument("--limit", type=int, help="at most this many samples (--data), records (--tasks), problems (--code)")
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--draft-heads", type=int, help="drafts per decoding step (default: every extra head; 0: plain)")
    g.add_argument("--tokenizer", help="SentencePiece .model or 'bytes' (default: the model's or the run's)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--dtype", choices=sorted(_DTYPES), default="fp32")
    g.add_argument("--device", default="auto")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if not (args.data or args.tasks or args.code):
        p.error("give at least one of --data, --tasks, --code")
    if args.completions and not args.tasks:
        p.error("--completions writes the completions of --tasks; give --tasks too")
    if args.code and not args.allow_code_execution:
        p.error("--code runs model-written code on this machine; add --allow-code-execution to accept that "
                "(see --help)")
    for name in ("limit", "batch_size", "max_new_tokens", "samples", "exec_workers", "memory_mb"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')}: must be >= 1, got {value}")
    if args.timeout <= 0 or args.temperature < 0 or not 0 < args.top_p <= 1 or min(args.k) < 1:
        p.error("--timeout must be > 0, --temperature >= 0, --top-p in (0, 1], every --k >= 1")
    return args


def _fmt(xs) -> str:
    return " ".join("-" if x is None else f"{x:.3f}" for x in xs) or "-"


def _json_safe(x):
    """NaN (a draft position never judged) as null: strict JSON readers refuse NaN."""
    if isinstance(x, float) and x != x:
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    return x


def table(results: dict) -> str:
    rows = []
    if "dataset" in results:
        d = results["dataset"]
        rows += [("loss (weighted sum of heads)", f"{d['loss']:.4f}"), ("head losses", _fmt(d["head_losses"])),
                 ("head perplexities", _fmt(d["head_perplexities"])),
                 ("acceptance per draft position", _fmt(d["acceptance"])),
                 ("tokens per forward (1..n-1 drafts)", _fmt(d["tokens_per_forward"]))]
    for t in results.get("tasks", []):
        rows.append((f"{t['file']} accuracy", f"{t['accuracy']:.4f} ({t['correct']}/{t['records']})"))
        for key, values in t["by"].items():
            rows += [(f"  {key}={v}", f"{s['accuracy']:.4f} ({s['correct']}/{s['records']})")
                     for v, s in values.items()]
        rows.append(("  tokens per forward", f"{t['tokens_per_forward']:.3f}"))
    if "code" in results:
        c = results["code"]
        rows += [(f"{c['file']} pass@{k}", f"{v:.4f}") for k, v in c["pass_at_k"].items()]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def run(args, argv) -> dict:
    from mtplm.data.manifest import write_json_atomic, write_jsonl_atomic

    path = Path(args.model)
    model, kind, train_cfg = load_for_eval(path)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device=device, dtype=_DTYPES[args.dtype]).eval()
    progress = False if args.no_progress else None
    out = {"command": shlex.join(["mtp-eval", *argv]),
           "model": {"path": str(path.resolve()), "kind": kind, "config": dataclasses.asdict(model.cfg),
                     "dtype": args.dtype}}
    if train_cfg:
        out["model"]["trained_steps"] = train_cfg.get("train", {}).get("steps")
    tok = model_tokenizer(path, model, train_cfg, args.tokenizer) if (args.tasks or args.code) else None
    if args.data:
        from mtplm.data.tokenizer import load_tokenizer

        from .dataset_eval import dataset_metrics, eval_samples

        data_cfg = _data_config(args, model, train_cfg)
        tok_sha = load_tokenizer(data_cfg.tokenizer).sha256 if data_cfg.tokenizer else None
        samples = eval_samples(data_cfg, args.split, model.cfg.n_future_tokens, model.cfg.vocab_size, tok_sha)
        metrics = dataset_metrics(model, samples, data_cfg.seq_len, args.batch_size, args.limit, progress)
        out["dataset"] = {"datasets": data_cfg.datasets, "weights": data_cfg.weights, "split": args.split,
                          "split_ratios": data_cfg.split, "seq_len": data_cfg.seq_len, "seed": data_cfg.seed,
                          "samples_in_split": len(samples), **metrics}
    if args.tasks:
        from .task_eval import evaluate_tasks, is_correct, read_tasks

        out["tasks"], completions = [], []
        for f in args.tasks:
            records = read_tasks(f)[: args.limit]
            res, outs = evaluate_tasks(model, tok, records, args.max_new_tokens, args.batch_size, args.draft_heads,
                                       args.stop or [], progress, args.prepend_eod)
            out["tasks"].append({"file": f, "max_new_tokens": args.max_new_tokens, "stop": args.stop or [],
                                 "prepend_eod": args.prepend_eod, **res})
            completions += [{"where": r.where, "prompt": r.prompt, "answer": r.answer, "completion": c,
                             "correct": is_correct(r, c), "groups": r.groups}
                            for r, c in zip(records, outs)]
        if args.completions:
            Path(args.completions).parent.mkdir(parents=True, exist_ok=True)
            write_jsonl_atomic(Path(args.completions), completions)
    if args.code:
        from .code_exec import DEFAULT_STOP, evaluate_code, read_problems

        problems = read_problems(args.code)[: args.limit]
        n = args.samples or max(args.k)
        stop = args.stop or DEFAULT_STOP
        res = evaluate_code(model, tok, problems, n, args.k, args.temperature, args.top_p, args.max_new_tokens,
                            args.batch_size, args.timeout, args.memory_mb, args.exec_workers, args.draft_heads, stop,
                            args.seed, progress)
        out["code"] = {"file": args.code, "max_new_tokens": args.max_new_tokens, "stop": stop,
                       "timeout_s": args.timeout, "memory_mb": args.memory_mb, **res}
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    out = _json_safe(out)
    write_json_atomic(output, out)
    return out


def main(argv: list[str] | None = None) -> int:
    from mtplm.config import ConfigError

    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    try:
        results = run(args, argv)
    except (FileNotFoundError, ValueError, KeyError, ConfigError, OSError) as e:
        print(f"mtp-eval: {e}", file=sys.stderr)
        return 1
    print(table(results))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
