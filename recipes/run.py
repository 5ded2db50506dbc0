"""mtp-recipe: one of the paper's small-scale experiments end to end.

    mtp-recipe polynomial --preset cpu --out runs/poly --seeds 1 2 3 --n 1 2 4 --jobs 2
    mtp-recipe induction --preset paper --sizes 1M 3M --out runs/induction \
        --launcher "torchrun --nproc_per_node 8" --deepspeed-config ds_configs/zero1_bf16.json

Steps, each skipped when its output is complete, so re-running the same command continues an interrupted run:
1. data: OUT/data/train.jsonl and test.jsonl from the recipe's generator (fixed by --data-seed), tokenized
   byte-level by mtp-preprocess's code into OUT/data/tokens;
2. training: one model per (size, n, seed) with mtp-train in its own process (DeepSpeed, the real data loader),
   in OUT/models/NAME; an interrupted model resumes from its newest checkpoint, a finished one (final/) is kept;
3. evaluation with mtp-eval's functions: per-head validation loss (--data, the validation split) and the task
   metric (polynomial: greedy exact match by m; induction: teacher-forced name accuracy by occurrence, at every
   kept checkpoint);
4. OUT/results.md, OUT/results.json (one row per model) and OUT/plot.png.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


from mtplm.data.manifest import write_json_atomic, write_jsonl_atomic
from mtplm.model.config import ModelConfig
from mtplm.model.flops import count_params

from . import byte_code, induction, polynomial
from .presets import PRESETS, Preset, with_changes
from .evaluation import evaluate_model
from .training import RecipeError, Stopped, TrainCommand, log, raise_stopped, stop_training, threads_per_job, train

VOCAB = 256  # byte-level tokens (mtp-preprocess --tokenizer bytes)
# The context a model is built for: room for the longest test prompt (an m = 10 polynomial is < 200 bytes) and
# its answer, even when a preset trains on shorter samples (rotary positions have no learned table).
MIN_CONTEXT = 256
DEFAULT_N = {"polynomial": (1, 2, 4), "induction": (1, 2), "bytes": (1, 8)}  # Figs. 8 and 7, Table S3


def check_run_folder(out: Path, settings: dict) -> None:
    """A folder holds one recipe, preset and data seed; models (n, seeds, sizes) may be added by a re-run."""
    path = out / "recipe.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        diff = [f"{k}: {saved.get(k)!r} there, {v!r} now" for k, v in settings.items() if saved.get(k) != v]
        if diff:
            raise RecipeError(f"{out} holds another run ({'; '.join(diff)}); choose another --out")
    else:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, settings)


def prepare_data(recipe: str, preset: Preset, out: Path, data_seed: int) -> Path:
    from mtplm.data.preprocess import PreprocessConfig, run_preprocess

    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    train, test = data / "train.jsonl", data / "test.jsonl"
    if not (train.is_file() and test.is_file()):
        if recipe == "polynomial":
            docs, tests = polynomial.make_datasets(data_seed, preset.train_docs, preset.test_docs,
                                                   train_ms=range(1, preset.train_max_m + 1),
                                                   ring=polynomial.Ring(d=preset.ring_terms))
            records = ({"text": d} for d in docs)
        elif recipe == "induction":
            docs, stories = induction.make_datasets(data_seed, preset.train_docs, preset.test_docs, preset.story)
            records, tests = ({"text": d} for d in docs), [{"text": s} for s in stories]
        else:
            docs, tests = byte_code.make_datasets(preset.train_docs, preset.test_docs)
            records = docs
        write_jsonl_atomic(test, tests)
        write_jsonl_atomic(train, records)
        log(f"generated {len(docs)} training documents and {len(tests)} test records in {data}")
    tokens = data / "tokens"
    if not (tokens / "dataset.json").is_file():
        run_preprocess(PreprocessConfig(inputs=[str(train)], output=str(tokens), tokenizer="bytes", workers=1,
                                        on_error="fail"), log=lambda m: log(f"preprocess: {m}"))
    return tokens


def model_config(preset: Preset, size: str, n: int) -> ModelConfig:
    s = preset.shape(size)
    return ModelConfig(dim=s["dim"], n_layers=s["n_layers"], n_heads=s["n_heads"], vocab_size=VOCAB, multiple_of=16,
                       n_future_tokens=n, max_seq_len=max(s["seq_len"], MIN_CONTEXT))


def train_config(preset: Preset, size: str, mcfg: ModelConfig, seed: int, tokens: Path, folder: Path) -> dict:
    # Checkpoints at the evaluated points (induction's curve), else four per run, so an interrupted run resumes.
    save_every = max(1, preset.steps // (preset.eval_points if preset.eval_points > 1 else 4))
    return {
        "model": {k: getattr(mcfg, k) for k in ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of",
                                                "n_future_tokens", "max_seq_len")},
        "data": {"datasets": [str(tokens)], "tokenizer": "bytes", "seq_len": preset.shape(size)["seq_len"],
                 "split": [0.98, 0.02, 0.0], "num_workers": 0, "seed": 1234},
        "optim": {"lr": preset.lr, "warmup_steps": preset.warmup_steps, "min_lr_ratio": preset.min_lr_ratio},
        "train": {"steps": preset.steps, "micro_batch_size": preset.micro_batch_size,
                  "global_batch_size": preset.shape(size)["batch_size"], "seed": seed,
                  "log_interval": max(1, preset.steps // 20), "eval_interval": 0, "out_dir": str(folder),
                  "save_interval": save_every if save_every < preset.steps else 0,
                  # every evaluated checkpoint is kept (induction's curve); else the newest, to resume from
                  "keep_last": 0 if preset.eval_points > 1 else 1},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mtp-recipe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", choices=sorted(PRESETS))
    p.add_argument("--preset", choices=["tiny", "cpu", "paper"], default="cpu")
    p.add_argument("--out", required=True, help="run folder (data, models, results)")
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3], help="training seeds (default: 1 2 3)")
    p.add_argument("--n", nargs="+", type=int,
                   help="future tokens per model (default: the paper's, polynomial 1 2 4, induction 1 2, bytes 1 8)")
    p.add_argument("--sizes", nargs="+", help="model sizes of the preset (default: all of them)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the generated data (default: 0)")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="change fields of the preset, e.g. --set lr=3e-3 steps=4000 (a search; the run folder "
                        "records them)")
    p.add_argument("--deepspeed-config", help="DeepSpeed JSON for mtp-train (default: the trainer's)")
    p.add_argument("--launcher", default="", metavar="CMD",
                   help='command prefix that starts each model\'s ranks, e.g. "torchrun --nproc_per_node 8", '
                        '"deepspeed --num_gpus 8" (default: one local process); mtp-train options (a parallel '
                        'layout) follow a lone --: mtp-recipe ... -- --parallel.tensor 2')
    p.add_argument("--jobs", type=int, default=1,
                   help="models trained at once, each with cores/jobs threads unless OMP_NUM_THREADS is set "
                        "(default 1); small models use a core each better than they share two")
    argv = sys.argv[1:] if argv is None else argv
    cut = argv.index("--") if "--" in argv else len(argv)
    args = p.parse_args(argv[:cut])
    command = TrainCommand(args.launcher, args.deepspeed_config, tuple(argv[cut + 1:]))
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.jobs > 1 and args.launcher:
        p.error("--jobs > 1 with --launcher: each launcher takes the machine's GPUs and port; run one model at a time")
    args.n = args.n or list(DEFAULT_N[args.recipe])
    if args.preset not in PRESETS[args.recipe]:
        p.error(f"--preset: the {args.recipe} recipe has the presets {', '.join(PRESETS[args.recipe])}")
    try:
        preset = with_changes(PRESETS[args.recipe][args.preset], args.set)
    except ValueError as e:
        p.error(f"--set: {e}")
    sizes = args.sizes or list(preset.sizes)
    for s in sizes:
        if s not in preset.sizes:
            p.error(f"--sizes: {s!r} is not a size of the {args.preset} preset ({', '.join(preset.sizes)})")
    for n in args.n:
        if not 1 <= n <= min(preset.sizes[s]["n_layers"] for s in sizes):
            p.error(f"--n: {n} must be between 1 and the number of transformer blocks")
    out = Path(args.out)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, raise_stopped)
    try:
        check_run_folder(out, {"recipe": args.recipe, "preset": args.preset, "data_seed": args.data_seed,
                               **({"set": sorted(args.set)} if args.set else {})})
        tokens = prepare_data(args.recipe, preset, out, args.data_seed)
        models = []
        for size in sizes:
            for n in args.n:
                mcfg = model_config(preset, size, n)
                c = count_params(mcfg)
                log(f"{size} n={n}: {c.total:,} parameters ({c.trunk_blocks + c.heads + mcfg.dim:,} "
                    f"non-embedding: {mcfg.n_trunk_layers} trunk blocks + {n} head blocks)")
                models += [(size, n, seed, mcfg, c) for seed in args.seeds]
        # --jobs training processes side by side; then evaluation, one model at a time
        threads = threads_per_job(args.jobs)
        with ThreadPoolExecutor(args.jobs) as pool:
            try:
                list(pool.map(lambda m: train(*model_run(preset, out, tokens, *m[:4]), command, threads), models))
            except BaseException:  # a stop or a failed model: before the pool waits for its threads and queue
                pool.shutdown(wait=False, cancel_futures=True)
                stop_training()
                raise
        test = out / "data" / "test.jsonl"
        rows = [evaluate_model(args.recipe, preset, *model_run(preset, out, tokens, *m[:4]), test, *m) for m in models]
        write_results(args, preset, rows, out)
    except Stopped as e:
        print(f"mtp-recipe: stopped by {e}; the models in training saved a checkpoint: run the same command "
              f"again to continue", file=sys.stderr)
        return 130 if str(e) == "SIGINT" else 143
    except (RecipeError, ValueError, OSError) as e:
        print(f"mtp-recipe: {e}", file=sys.stderr)
        return 1
    log(f"wrote {out / 'results.md'}, {out / 'results.json'} and {out / 'plot.png'}")
    return 0


def model_run(preset, out, tokens, size, n, seed, mcfg) -> tuple[Path, dict]:
    """A model's folder and training config."""
    folder = out / "models" / f"{size}_n{n}_seed{seed}"
    return folder, train_config(preset, size, mcfg, seed, tokens, folder)


def write_results(args, preset: Preset, rows: list[dict], out: Path) -> None:
    from .report import plot_by_difficulty, plot_by_tokens, plot_decoding, write_table

    cmd = "mtp-recipe " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("mtp-recipe") else f"preset {args.preset}"
    if args.recipe == "polynomial":
        ring = polynomial.Ring(d=preset.ring_terms)
        header = (f"Polynomial arithmetic in {ring}, preset {args.preset} ({cmd}): greedy exact match by "
                  f"number of operations m (trained on m = 1..{preset.train_max_m}).")
        write_table(rows, out, header, "m")
        plot_by_difficulty(rows, out / "plot.png", "m (operations)", f"Polynomial arithmetic in {ring} ({args.preset})")
    elif args.recipe == "bytes":
        header = (f"Bytes, preset {args.preset} ({cmd}): byte-level models trained on the standard library's code; "
                  f"self-speculative greedy decoding of held-out code at batch 1.")
        write_table(rows, out, header, None)
        plot_decoding(rows, out / "plot.png", f"Byte-level self-speculative decoding ({args.preset})")
    else:
        header = (f"Induction, preset {args.preset} ({cmd}): accuracy on a name's second token after its first "
                  f"occurrence, by occurrence.")
        write_table(rows, out, header, "occurrence")
        plot_by_tokens(rows, out / "plot.png", f"Induction ({args.preset})")


if __name__ == "__main__":
    sys.exit(main())
