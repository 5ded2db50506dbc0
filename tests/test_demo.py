"""The README's first command, shortened: mtp-demo builds its corpus, trains, generates and writes its plots."""

import os
import subprocess
import sys

from dist_launch import REPO


def test_demo_runs_end_to_end_and_writes_its_plots(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "mtplm.pretrain.demo", "--train.steps", "4",
                           "--train.eval_interval", "2", "--train.out_dir", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "final" / "model.safetensors").is_file()
    plots = [line for line in proc.stdout.splitlines() if line.startswith("[demo] plots: ")]
    assert plots, proc.stdout[-3000:]
    for name in ("loss.png", "lr.png", "throughput.png", "acceptance.png"):
        path = out / "plots" / name
        assert str(path) in plots[0] and path.stat().st_size > 1000
