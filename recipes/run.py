"""mtp-recipe: one of the paper's small-scale experiments end to end.

    mtp-recipe polynomial --preset quick --out runs/poly --seeds 1 2 --n 1 2 4
    mtp-recipe induction --preset paper --out runs/induction

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
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from mtplm.data.manifest import write_json_atomic, write_jsonl_atomic
from mtplm.model.config import ModelConfig
from mtplm.model.flops import count_params

from . import induction, polynomial
from .presets import PRESETS, Preset

VOCAB = 256  # byte-level tokens (mtp-preprocess --tokenizer bytes)
# The context a model is built for: room for the longest test prompt (an m = 10 polynomial is < 200 bytes) and
# its answer, even when a preset trains on shorter samples (rotary positions have no learned table).
MIN_CONTEXT = 256


class RecipeError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(f"[mtp-recipe] {msg}", flush=True)


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
            docs, tests = polynomial.make_datasets(data_seed, preset.train_docs, preset.test_docs)
        else:
            docs, stories = induction.make_datasets(data_seed, preset.train_docs, preset.test_docs)
            tests = [{"text": s} for s in stories]
        write_jsonl_atomic(test, tests)
        write_jsonl_atomic(train, ({"text": d} for d in docs))
        log(f"generated {len(docs)} training documents and {len(tests)} test records in {data}")
    tokens = data / "tokens"
    if not (tokens / "dataset.json").is_file():
        run_preprocess(PreprocessConfig(inputs=[str(train)], output=str(tokens), tokenizer="bytes", workers=1,
                                        on_error="fail"), log=lambda m: log(f"preprocess: {m}"))
    return tokens


def model_config(preset: Preset, size: str, n: int) -> ModelConfig:
    s = preset.sizes[size]
    return ModelConfig(dim=s["dim"], n_layers=s["n_layers"], n_heads=s["n_heads"], vocab_size=VOCAB, multiple_of=16,
                       n_future_tokens=n, max_seq_len=max(preset.seq_len, MIN_CONTEXT))


def train_config(preset: Preset, mcfg: ModelConfig, seed: int, tokens: Path, folder: Path) -> dict:
    # Checkpoints at the evaluated points (induction's curve), else four per run, so an interrupted run resumes.
    save_every = max(1, preset.steps // (preset.eval_points if preset.eval_points > 1 else 4))
    return {
        "model": {k: getattr(mcfg, k) for k in ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of",
                                                "n_future_tokens", "max_seq_len")},
        "data": {"datasets": [str(tokens)], "tokenizer": "bytes", "seq_len": preset.seq_len,
                 "split": [0.98, 0.02, 0.0], "num_workers": 0, "seed": 1234},
        "optim": {"lr": preset.lr, "warmup_steps": preset.warmup_steps, "min_lr_ratio": 0.1},
        "train": {"steps": preset.steps, "micro_batch_size": preset.micro_batch_size, "seed": seed,
                  "log_interval": max(1, preset.steps // 20), "eval_interval": 0, "out_dir": str(folder),
                  "save_interval": save_every if save_every < preset.steps else 0,
                  # every evaluated checkpoint is kept (induction's curve); else the newest, to resume from
                  "keep_last": 0 if preset.eval_points > 1 else 1},
    }


TRAINING: set[subprocess.Popen] = set()  # the mtp-train processes running, for a stop to reach them


def stop_training() -> None:
    """Ask every running mtp-train to checkpoint and stop (it takes a repeated request as one)."""
    for proc in list(TRAINING):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)


class Stopped(Exception):
    pass


def _stop(signum, frame):
    raise Stopped(signal.Signals(signum).name)


def train(folder: Path, cfg: dict, deepspeed_config: str | None, threads: int | None = None) -> None:
    if (folder / "final" / "params.json").is_file():
        log(f"{folder.name}: trained already")
        return
    folder.mkdir(parents=True, exist_ok=True)
    cfg_path = folder / "recipe_train.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    cmd = [sys.executable, "-m", "mtplm.pretrain.train", "--config", str(cfg_path), "--train.resume", "auto"]
    if deepspeed_config:
        cmd += ["--deepspeed_config", deepspeed_config]
    log(f"{folder.name}: training ({cfg['train']['steps']} steps), log in {folder / 'train.out'}")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads)) if threads else None
    with open(folder / "train.out", "a") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
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


def consumed_tokens(folder: Path) -> dict[int, int]:
    """step -> training tokens seen, from the trainer's metrics.jsonl."""
    out = {}
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("kind") == "train":
            out[r["step"]] = r["consumed_tokens"]
    return out


def mtp_eval(folder: Path, cfg: dict, preset: Preset, tasks: Path | None) -> dict:
    """mtp-eval on the final model: per-head loss on (the first valid_samples of) the validation split, and
    every record of the task file if given (a second call: mtp-eval's --limit would cut both)."""
    from mtplm.inference.evaluate import parse_args, run

    d = cfg["data"]
    common = [str(folder / "final"), "--tokenizer", "bytes", "--batch-size", str(preset.eval_batch_size),
              "--no-progress"]
    calls = {"eval_loss.json": ["--data", d["datasets"][0], "--split", "valid", "--limit", str(preset.valid_samples),
                                "--seq-len", str(d["seq_len"]), "--data-split", *map(str, d["split"]),
                                "--data-seed", str(d["seed"])]}
    if tasks is not None:  # the answer is 5 digits; the model ends it with the end-of-document token
        calls["eval_tasks.json"] = ["--tasks", str(tasks), "--max-new-tokens", str(polynomial.D),
                                    "--completions", str(folder / "completions.jsonl")]
    result = {}
    for name, argv in calls.items():
        path = folder / name
        if not path.is_file() or ("--completions" in argv and not Path(argv[argv.index("--completions") + 1]).is_file()):
            argv = common + argv + ["--output", str(path)]
            run(parse_args(argv), argv)
        result.update(json.loads(path.read_text()))
    return result


def induction_curve(folder: Path, preset: Preset, test: Path) -> list[dict]:
    """Name accuracy at every kept checkpoint (and the final model), by occurrence."""
    from mtplm.data.tokenizer import ByteTokenizer
    from mtplm.inference.evaluate import load_for_eval

    from .induction_eval import next_token_hits

    path = folder / "induction_eval.json"
    if path.is_file():
        return json.loads(path.read_text())["curve"]
    tok = ByteTokenizer()
    stories = [json.loads(line)["text"] for line in test.read_text().splitlines()]
    # A story follows an end-of-document token, as in training's packed samples; cut to the context.
    seqs = [([tok.eod_id] + tok.encode(s))[: preset.seq_len] for s in stories]
    found = [induction.name_positions(s) for s in seqs]
    tokens_at = consumed_tokens(folder)
    steps = sorted(int(p.name[5:]) for p in (folder / "checkpoints").glob("step_*") if (p / "COMPLETE").is_file())
    curve = []
    for step in steps:
        model, _, _ = load_for_eval(folder / "checkpoints" / f"step_{step:08d}")
        hits = next_token_hits(model, seqs, [[p for p, _ in f] for f in found], preset.eval_batch_size, tok.eod_id)
        by: dict[str, list[int]] = {}
        for f, h in zip(found, hits):
            for (_, k), ok in zip(f, h):
                by.setdefault(induction.occurrence_group(k), []).append(ok)
        every = [ok for h in hits for ok in h]
        curve.append({"step": step, "tokens": tokens_at.get(step, 0), "positions": len(every),
                      "accuracy": sum(every) / len(every),
                      "by": {g: sum(v) / len(v) for g, v in by.items()}})
    write_json_atomic(path, {"test": str(test), "curve": curve})
    return curve


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mtp-recipe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", choices=sorted(PRESETS))
    p.add_argument("--preset", choices=["tiny", "quick", "paper"], default="quick")
    p.add_argument("--out", required=True, help="run folder (data, models, results)")
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2], help="training seeds (default: 1 2)")
    p.add_argument("--n", nargs="+", type=int, default=[1, 2, 4], help="future tokens per model (default: 1 2 4)")
    p.add_argument("--sizes", nargs="+", help="model sizes of the preset (default: all of them)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the generated data (default: 0)")
    p.add_argument("--deepspeed-config", help="DeepSpeed JSON for mtp-train (default: the trainer's)")
    p.add_argument("--jobs", type=int, default=1,
                   help="models trained at once, each with cores/jobs threads unless OMP_NUM_THREADS is set "
                        "(default 1); small models use a core each better than they share two")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")
    preset = PRESETS[args.recipe][args.preset]
    sizes = args.sizes or list(preset.sizes)
    for s in sizes:
        if s not in preset.sizes:
            p.error(f"--sizes: {s!r} is not a size of the {args.preset} preset ({', '.join(preset.sizes)})")
    for n in args.n:
        if not 1 <= n <= min(preset.sizes[s]["n_layers"] for s in sizes):
            p.error(f"--n: {n} must be between 1 and the number of transformer blocks")
    out = Path(args.out)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _stop)
    try:
        check_run_folder(out, {"recipe": args.recipe, "preset": args.preset, "data_seed": args.data_seed})
        tokens = prepare_data(args.recipe, preset, out, args.data_seed)
        models = []
        for size in sizes:
            for n in args.n:
                mcfg = model_config(preset, size, n)
                c = count_params(mcfg)
                log(f"{size} n={n}: {c.total:,} parameters ({c.trunk_blocks + c.heads + mcfg.dim:,} "
                    f"non-embedding: {mcfg.n_trunk_layers} trunk blocks + {n} head blocks)")
                models += [(size, n, seed, mcfg, c) for seed in args.seeds]
        if args.jobs > 1:  # the training processes side by side; evaluation below, one model at a time
            threads = None if "OMP_NUM_THREADS" in os.environ else max(1, (os.cpu_count() or 1) // args.jobs)
            with ThreadPoolExecutor(args.jobs) as pool:
                try:
                    list(pool.map(lambda m: train(*model_run(preset, out, tokens, *m[:4]), args.deepspeed_config,
                                                  threads), models))
                except Stopped:  # before the pool waits for its threads, which wait for their trainers
                    pool.shutdown(wait=False, cancel_futures=True)
                    stop_training()
                    raise
        rows = [run_model(args.recipe, preset, out, tokens, *m, args.deepspeed_config, trained=args.jobs > 1)
                for m in models]
        write_results(args, rows, out)
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
    return folder, train_config(preset, mcfg, seed, tokens, folder)


def run_model(recipe, preset, out, tokens, size, n, seed, mcfg, counts, ds_config, trained=False) -> dict:
    folder, cfg = model_run(preset, out, tokens, size, n, seed, mcfg)
    name = folder.name
    if not trained:
        train(folder, cfg, ds_config)
    test = out / "data" / "test.jsonl"
    ev = mtp_eval(folder, cfg, preset, test if recipe == "polynomial" else None)
    row = {"model": name, "size": size, "n": n, "seed": seed, "parameters": counts.total,
           "non_embedding_parameters": counts.trunk_blocks + counts.heads + mcfg.dim,
           "tokens_seen": max(consumed_tokens(folder).values()),
           "val_head_losses": ev["dataset"]["head_losses"]}
    if recipe == "polynomial":
        t = ev["tasks"][0]
        row.update(accuracy=t["accuracy"], accuracy_by={m: s["accuracy"] for m, s in t["by"]["m"].items()},
                   digit_accuracy_by=polynomial.digit_accuracy_by_m(folder / "completions.jsonl"))
    else:
        curve = induction_curve(folder, preset, test)
        row.update(accuracy=curve[-1]["accuracy"], accuracy_by=curve[-1]["by"], curve=curve)
    log(f"{name}: accuracy {row['accuracy']:.3f}, validation loss per head "
        + " ".join(f"{x:.3f}" for x in row["val_head_losses"]))
    return row


def write_results(args, rows: list[dict], out: Path) -> None:
    from .report import plot_by_difficulty, plot_by_tokens, write_table

    cmd = "mtp-recipe " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("mtp-recipe") else f"preset {args.preset}"
    if args.recipe == "polynomial":
        header = (f"Polynomial arithmetic in F7[X]/(X^5), preset {args.preset} ({cmd}): greedy exact match by "
                  f"number of operations m (trained on m = 1..5).")
        write_table(rows, out, header, "m")
        plot_by_difficulty(rows, out / "plot.png", "m (operations)", f"Polynomial arithmetic ({args.preset})")
    else:
        header = (f"Induction, preset {args.preset} ({cmd}): accuracy on a name's second token after its first "
                  f"occurrence, by occurrence.")
        write_table(rows, out, header, "occurrence")
        plot_by_tokens(rows, out / "plot.png", f"Induction ({args.preset})")


if __name__ == "__main__":
    sys.exit(main())
