"""How long a recipe preset takes on this machine, from a measured step rate: each model shape of the preset
(every size, n = 1 and the largest n) trained a few steps by bench_train_step.py on random tokens, then
s/step x the preset's steps x its models (sizes x n x seeds), evaluation not included.

    python bench/bench_recipe_time.py --preset cpu --jobs 2          # the CPU presets, as mtp-recipe --jobs 2 runs them
    python bench/bench_recipe_time.py --preset paper --deepspeed_config ds_configs/zero0_bf16.json   # one GPU

--jobs K times K copies of each shape side by side, each with cores/K threads (what mtp-recipe --jobs K does),
and divides the total by K. A step is the preset's whole batch: on one process, micro-batches of
micro_batch_size accumulated up to the size's batch_size, so the step time is the micro-step's times the
accumulation. Models with an n between 1 and the largest n are taken at the mean of the two (their step time
lies between them). On a GPU the paper preset's per-model figure is in GPU-hours: divide by the GPUs a model
trains on (data parallel) for its wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


def micro_step_seconds(recipe: str, preset_name: str, size: str, n: int, args, tmp: Path) -> float:
    """Seconds per micro-batch step of one shape: the mean over --jobs copies trained side by side."""
    from mtplm.recipes.presets import PRESETS
    from mtplm.recipes.run import model_config
    from mtplm.recipes.training import threads_per_job

    preset = PRESETS[recipe][preset_name]
    m, shape = model_config(preset, size, n), preset.shape(size)
    cfg = tmp / f"{recipe}_{size}_n{n}.yaml"
    cfg.write_text(yaml.safe_dump({"model": {k: getattr(m, k) for k in ("dim", "n_layers", "n_heads", "vocab_size",
                                                                       "multiple_of", "max_seq_len")},
                                   "optim": {"lr": preset.lr}}))
    threads = threads_per_job(args.jobs)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads)) if threads else None
    procs = []
    for j in range(args.jobs):
        out = tmp / f"{cfg.stem}_{j}.json"
        cmd = [sys.executable, str(REPO / "bench" / "bench_train_step.py"), "--config", str(cfg), "--n", str(n),
               "--micro-batch", str(preset.micro_batch_size), "--seq-len", str(shape["seq_len"]),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--json", str(out)]
        cmd += ["--deepspeed_config", args.deepspeed_config] if args.deepspeed_config else []
        procs.append((out, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                            cwd=REPO, env=env)))
    seconds = []
    for out, proc in procs:
        stdout, stderr = proc.communicate()
        if proc.returncode != 0:
            sys.exit(f"{recipe} {size} n={n} failed:\n{stdout[-2000:]}\n{stderr[-2000:]}")
        seconds.append(json.loads(out.read_text())[0]["step_s"])
    return sum(seconds) / len(seconds)


def main() -> None:
    from mtplm.recipes.presets import PRESETS
    from mtplm.recipes.run import DEFAULT_N

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=["tiny", "cpu", "paper"], default="cpu")
    p.add_argument("--recipes", nargs="+", choices=sorted(PRESETS), default=sorted(PRESETS))
    p.add_argument("--n", type=int, nargs="+", help="the models' n, as mtp-recipe's --n (default: the recipe's)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per model, as mtp-recipe's --seeds (default 3)")
    p.add_argument("--jobs", type=int, default=1, help="models trained side by side, as mtp-recipe's --jobs")
    p.add_argument("--steps", type=int, default=5, help="timed steps per shape")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--deepspeed_config")
    args = p.parse_args()
    device = "GPU" if args.deepspeed_config else "machine"
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in args.recipes:
            if args.preset not in PRESETS[recipe]:
                print(f"{recipe}: no {args.preset} preset")
                continue
            preset, ns = PRESETS[recipe][args.preset], args.n or list(DEFAULT_N[recipe])
            ends = sorted({min(ns), max(ns)})
            total = 0.0
            for size in preset.sizes:
                accumulation = preset.shape(size)["batch_size"] // preset.micro_batch_size
                measured = {n: micro_step_seconds(recipe, args.preset, size, n, args, Path(tmp)) * accumulation
                            for n in ends}
                for n in ns:
                    s = measured.get(n, sum(measured.values()) / len(measured))
                    hours = s * preset.steps / 3600
                    total += hours * args.seeds
                    print(f"{recipe} {args.preset} {size} n={n}: {s:.3f} s/step"
                          f"{'' if n in measured else ' (interpolated)'} x {preset.steps} steps = "
                          f"{hours * 60:.1f} min ({hours:.2f} {device}-hours) per model", flush=True)
            models = len(preset.sizes) * len(ns) * args.seeds
            print(f"{recipe} {args.preset}: {models} models ({len(preset.sizes)} size(s) x n = "
                  f"{' '.join(map(str, ns))} x {args.seeds} seeds): {total:.2f} {device}-hours of training, "
                  f"{total * 60 / args.jobs:.0f} min with {args.jobs} at a time", flush=True)


if __name__ == "__main__":
    main()
