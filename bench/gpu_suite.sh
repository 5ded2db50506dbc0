#!/usr/bin/env bash
# Every GPU figure the README quotes, on one GPU, in one run (aimed at under 8 minutes on an H100/H200; not yet
# timed on one), then one summary table. Writes the raw outputs to $OUT (default runs/gpu_suite).
#
#   bash bench/gpu_suite.sh
#
# 1. 1B training (configs/1b.yaml, ZeRO-1 bf16, micro-batch 8 x 2048): tokens/s, MFU and peak memory for n=1
#    and n=4, eager and compiled, no recomputation; n=4 compiled with selective recomputation; a profile
#    summary (top kernels, idle gaps) of n=4 compiled.
# 2. bench/bench_mtp_memory.py: peak memory of the MTP loss paths (bf16).
# 3. bench/bench_speculative.py on the demo model (trained first with mtp-demo if $SPEC_MODEL is absent), with
#    --compile when the script offers it.
# 4. bench/bench_recipe_time.py: the recipes' paper preset, each model shape's step rate and the expected time.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "bench/gpu_suite.sh: no CUDA device (torch.cuda.is_available() is False); these figures need one GPU." >&2
    exit 2
fi
OUT=${OUT:-runs/gpu_suite}
SPEC_MODEL=${SPEC_MODEL:-runs/demo/final}
mkdir -p "$OUT"
TRAIN=(python bench/bench_train_step.py --config configs/1b.yaml --deepspeed_config ds_configs/zero1_bf16.json
       --micro-batch 8 --seq-len 2048 --steps 4 --warmup 3)

"${TRAIN[@]}" --n 1 4 --modes eager compiled --recompute none --json "$OUT/train.json" | tee "$OUT/train.txt"
"${TRAIN[@]}" --n 4 --modes compiled --recompute selective --json "$OUT/train_selective.json" \
    | tee "$OUT/train_selective.txt"
"${TRAIN[@]}" --n 4 --modes compiled --recompute none --steps 2 --profile --json "$OUT/train_profile.json" \
    | tee "$OUT/profile.txt"
python bench/bench_mtp_memory.py --bf16 --json "$OUT/memory.json" | tee "$OUT/memory.txt"
if [ ! -f "$SPEC_MODEL/model.safetensors" ]; then
    mtp-demo --train.out_dir "$(dirname "$SPEC_MODEL")" > "$OUT/demo.txt"
fi
SPEC=(python bench/bench_speculative.py --model "$SPEC_MODEL" --dtype bfloat16)
if python bench/bench_speculative.py --help | grep -q -- "--compile"; then
    SPEC+=(--compile)
fi
"${SPEC[@]}" | tee "$OUT/speculative.txt"
python bench/bench_recipe_time.py --preset paper --recipes induction polynomial --seeds 2 --deepspeed_config ds_configs/zero0_bf16.json | tee "$OUT/recipes.txt"

python - "$OUT" <<'PY'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
rows = [r for f in ("train.json", "train_selective.json") for r in json.loads((out / f).read_text())]
print("\n== summary (" + str(out) + ") ==")
print(f"{'1B training':<34} {'tokens/s':>9} {'MFU':>6} {'peak GB':>8}")
for r in rows:
    name = f"n={r['n']} {r['mode']} recompute {r['policy']}"
    print(f"{name:<34} {r['tokens_per_s']:>9.0f} {r['mfu'] or 0:>6.1%} {r['peak_mem_gb'] or 0:>8.1f}")
print("(MFU counts model FLOPs only: recomputation is not counted)")
for line in json.loads((out / "train_profile.json").read_text())[0]["profile"]:
    print(line)
print("\nbench_mtp_memory.py (bf16): see memory.txt; last lines:")
print("\n".join((out / "memory.txt").read_text().splitlines()[-6:]))
print("\nbench_speculative.py: see speculative.txt; table:")
print("\n".join(l for l in (out / "speculative.txt").read_text().splitlines() if l[:1] == " " or "speedup" in l))
print("\nbench_recipe_time.py (paper presets, training only):")
print("\n".join(l for l in (out / "recipes.txt").read_text().splitlines() if "hours of training" in l))
PY
