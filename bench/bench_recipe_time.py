"""How long a recipe preset takes on this machine, from a measured step rate: each model shape of the preset
(every size, n = 1 and the largest n) trained a few steps by bench_train_step.py on random tokens, then
s/step x the preset's steps x its models (sizes x n = 1, 2, 4 x 2 seeds), evaluation not included.

    python bench/bench_recipe_time.py                                          # paper preset, both recipes
    python bench/bench_recipe_time.py --deepspeed_config ds_configs/zero0_bf16.json   # on a GPU (gpu_suite.sh)
    python bench/bench_recipe_time.py --preset quick --recipes induction

n = 2 is taken as the mean of n = 1 and the largest n (its step time lies between them).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


def step_seconds(recipe: str, preset_name: str, size: str, n: int, args, tmp: Path) -> float:
    from mtplm.recipes.presets import PRESETS
    from mtplm.recipes.run import model_config

    preset = PRESETS[recipe][preset_name]
    m = model_config(preset, size, n)
    cfg = tmp / f"{recipe}_{size}_n{n}.yaml"
    cfg.write_text(yaml.safe_dump({"model": {k: getattr(m, k) for k in ("dim", "n_layers", "n_heads", "vocab_size",
                                                                       "multiple_of", "max_seq_len")},
                                   "optim": {"lr": preset.lr}}))
    out = tmp / f"{cfg.stem}.json"
    cmd = [sys.executable, str(REPO / "bench" / "bench_train_step.py"), "--config", str(cfg), "--n", str(n),
           "--micro-batch", str(preset.micro_batch_size), "--seq-len", str(preset.seq_len),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--json", str(out)]
    cmd += ["--deepspeed_config", args.deepspeed_config] if args.deepspeed_config else []
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        sys.exit(f"{recipe} {size} n={n} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return json.loads(out.read_text())[0]["step_s"]


def main() -> None:
    from mtplm.recipes.presets import PRESETS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=["tiny", "quick", "cpu", "paper"], default="paper")
    p.add_argument("--recipes", nargs="+", choices=sorted(PRESETS), default=sorted(PRESETS))
    p.add_argument("--n", type=int, nargs="+", default=[1, 2, 4], help="the models' n, as mtp-recipe's --n")
    p.add_argument("--seeds", type=int, default=2, help="seeds per model, as mtp-recipe's --seeds")
    p.add_argument("--steps", type=int, default=5, help="timed steps per shape")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--deepspeed_config")
    args = p.parse_args()
    ends = sorted({min(args.n), max(args.n)})
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in args.recipes:
            preset = PRESETS[recipe][args.preset]
            total = 0.0
            for size in preset.sizes:
                measured = {n: step_seconds(recipe, args.preset, size, n, args, Path(tmp)) for n in ends}
                for n in args.n:
                    s = measured.get(n, sum(measured.values()) / len(measured))
                    minutes = s * preset.steps / 60
                    total += minutes * args.seeds
                    print(f"{recipe} {args.preset} {size} n={n}: {s:.3f} s/step"
                          f"{'' if n in measured else ' (interpolated)'} x {preset.steps} steps = "
                          f"{minutes:.1f} min per model", flush=True)
            print(f"{recipe} {args.preset}: {total:.0f} min of training for {len(preset.sizes)} size(s) x "
                  f"n = {' '.join(map(str, args.n))} x {args.seeds} seeds, one model at a time", flush=True)


if __name__ == "__main__":
    main()
