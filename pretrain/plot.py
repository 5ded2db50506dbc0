"""mtp-plot: PNG figures of one or more training runs from their metrics.jsonl.

    mtp-plot runs/n1 runs/n4 [--output plots/]

Writes loss.png (per-head training and validation loss against tokens seen, one line per head, runs
overlaid), lr.png, throughput.png (tokens/s) and, when the validation records hold them, acceptance.png
(teacher-forced acceptance per draft position and the implied tokens per forward). Needs matplotlib: pip
install "mtplm[plot]" (pip install -e ".[plot]" in a checkout).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
from pathlib import Path

PLOT_EXTRA = ('matplotlib is not installed; install the plot extra: pip install "mtplm[plot]" '
              '(pip install -e ".[plot]" in a checkout)')
TRAIN_FIELDS = ("step", "head_losses", "lr", "tokens_per_s")
VALID_FIELDS = ("step", "head_losses")


class MetricsError(ValueError):
    """A metrics file that cannot be plotted; the message names the file (and line)."""


def read_metrics(run_dir: Path, metrics_file: str = "metrics.jsonl") -> tuple[list[dict], list[dict]]:
    """(train records, validation records) of a run, in step order. A last line without its newline is a
    record still being written by a running job and is left out; any other bad line is refused."""
    path = run_dir / metrics_file
    if not path.is_file():
        raise MetricsError(f"{path}: no such file (expected a training run's train.out_dir, which holds "
                           f"{metrics_file})")
    text = path.read_text()
    lines = text.split("\n")
    if not text.endswith("\n"):
        lines = lines[:-1]
    records = {"train": [], "valid": []}
    known = ("train", "valid", "tasks")  # task accuracies (train.eval_tasks) are not plotted
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            raise MetricsError(f"{path}:{i}: not a JSON record") from None
        kind = rec.get("kind") if isinstance(rec, dict) else None
        if kind not in known:
            raise MetricsError(f"{path}:{i}: expected an object with \"kind\" \"train\", \"valid\" or \"tasks\"")
        if kind not in records:
            continue
        for key in TRAIN_FIELDS if kind == "train" else VALID_FIELDS:
            if key not in rec:
                raise MetricsError(f"{path}:{i}: the {kind} record has no \"{key}\"")
        if not isinstance(rec["head_losses"], list) or not rec["head_losses"]:
            raise MetricsError(f"{path}:{i}: \"head_losses\" must be a non-empty list")
        for key in ("step", "lr", "tokens_per_s", "consumed_tokens", "head_losses", "acceptance", "tokens_per_forward"):
            values = rec.get(key, [])
            if not all(_is_number(v) for v in (values if isinstance(values, list) else [values])):
                raise MetricsError(f"{path}:{i}: \"{key}\" must be a number (or a list of numbers), got {values!r}")
        records[kind].append(rec)
    if not records["train"]:
        raise MetricsError(f"{path}: no training records")
    return records["train"], records["valid"]


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class Run:
    def __init__(self, label: str, train: list[dict], valid: list[dict]):
        self.label, self.train, self.valid = label, train, valid
        # Tokens seen: the trainer logs consumed_tokens; logs from before it was logged fall back to steps.
        self.by_tokens = all("consumed_tokens" in r for r in train)
        tokens = {r["step"]: r["consumed_tokens"] for r in train} if self.by_tokens else {}
        self.x_of = (lambda step: tokens.get(step, math.nan)) if self.by_tokens else (lambda step: step)

    def xs(self, records):
        return [self.x_of(r["step"]) for r in records]


def labels_for(run_dirs: list[Path]) -> list[str]:
    names = [p.resolve().name for p in run_dirs]
    return names if len(set(names)) == len(names) else [str(p) for p in run_dirs]


def save(fig, path: Path) -> None:
    """Written under a temporary name and renamed: no half-written figure under the final name."""
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, path)


def matplotlib_available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def pyplot():
    """matplotlib.pyplot on the Agg backend: files only, no display needed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_runs(runs: list[Run], out_dir: Path) -> list[Path]:
    plt = pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    xlabel = "tokens seen" if all(r.by_tokens for r in runs) else "step"
    if xlabel == "step":
        for r in runs:
            r.by_tokens, r.x_of = False, (lambda step: step)
    styles = ["-", "--", ":", "-."]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    written = []

    def finish(fig, axes, name):
        for ax in axes:
            ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / name
        save(fig, path)
        plt.close(fig)
        written.append(path)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, kind in zip(axes, ("train", "valid")):
        ax.set_title(f"{'training' if kind == 'train' else 'validation'} loss per head")
        ax.set_ylabel("cross-entropy")
        for i, run in enumerate(runs):
            records = run.train if kind == "train" else run.valid
            if not records:
                continue
            for k in range(len(records[0]["head_losses"])):
                ax.plot(run.xs(records), [r["head_losses"][k] for r in records], styles[i % len(styles)],
                        color=colors[k % len(colors)], marker="o" if kind == "valid" else None, markersize=3,
                        label=f"{run.label} head {k + 1}")
    finish(fig, axes, "loss.png")

    for name, key, title in (("lr.png", "lr", "learning rate"), ("throughput.png", "tokens_per_s", "tokens/s")):
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.set_title(title)
        for i, run in enumerate(runs):
            ax.plot(run.xs(run.train), [r[key] for r in run.train], styles[i % len(styles)],
                    color=colors[i % len(colors)], label=run.label)
        finish(fig, [ax], name)

    if any("acceptance" in r for run in runs for r in run.valid):
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        axes[0].set_title("teacher-forced acceptance per draft position")
        axes[1].set_title("implied tokens per forward")
        for i, run in enumerate(runs):
            records = [r for r in run.valid if "acceptance" in r]
            if not records:
                continue
            for ax, key, what in ((axes[0], "acceptance", "draft"), (axes[1], "tokens_per_forward", "drafts")):
                for j in range(len(records[0][key])):
                    ax.plot(run.xs(records), [r[key][j] for r in records], styles[i % len(styles)], marker="o",
                            markersize=3, color=colors[j % len(colors)], label=f"{run.label} {j + 1} {what}"
                            if what == "drafts" else f"{run.label} draft {j + 1}")
        finish(fig, axes, "acceptance.png")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mtp-plot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="a training run's train.out_dir")
    parser.add_argument("--output", type=Path, default=None, help="folder for the PNGs (default: FIRST_RUN_DIR/plots)")
    parser.add_argument("--metrics-file", default="metrics.jsonl", help="train.metrics_file of the runs")
    args = parser.parse_args(argv)
    if not matplotlib_available():
        print(f"mtp-plot: {PLOT_EXTRA}", file=sys.stderr)
        return 1
    try:
        runs = [Run(label, *read_metrics(d, args.metrics_file))
                for d, label in zip(args.run_dirs, labels_for(args.run_dirs))]
    except MetricsError as e:
        print(f"mtp-plot: {e}", file=sys.stderr)
        return 1
    for path in plot_runs(runs, args.output or args.run_dirs[0] / "plots"):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
