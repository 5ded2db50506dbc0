"""The recipes' results table (Markdown + JSON) and plot (PNG), written under temporary names and renamed."""

from __future__ import annotations

import os
import statistics
from collections import defaultdict
from pathlib import Path

from mtplm.data.manifest import write_json_atomic
from mtplm.pretrain.plot import pyplot, save


def _key(v: str):
    return (0, int(v), "") if v.isdigit() else (1, 0, v)


def write_table(rows: list[dict], out: Path, header: str, difficulty: str) -> None:
    """One row per model; `difficulty` names the group the task metric is broken down by."""
    write_json_atomic(out / "results.json", {"header": header, "difficulty": difficulty, "rows": rows})
    groups = sorted({g for r in rows for g in r["accuracy_by"]}, key=_key)
    cols = ["model", "n", "seed", "parameters (non-embedding)", "tokens seen", "val loss per head", "accuracy",
            *[f"{difficulty}={g}" for g in groups]]
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [r["model"], str(r["n"]), str(r["seed"]), f"{r['parameters']:,} ({r['non_embedding_parameters']:,})",
                 f"{r['tokens_seen']:,}", " ".join(f"{x:.3f}" for x in r["val_head_losses"]),
                 f"{r['accuracy']:.3f}", *[f"{r['accuracy_by'][g]:.3f}" if g in r["accuracy_by"] else "-"
                                           for g in groups]]
        lines.append("| " + " | ".join(cells) + " |")
    if any("digit_accuracy_by" in r for r in rows):
        lines += ["", f"Share of answer digits right (partial credit; chance 1/7 = 0.143), by {difficulty}:", "",
                  "| model | " + " | ".join(f"{difficulty}={g}" for g in groups) + " |", "|" + "---|" * (len(groups) + 1)]
        lines += ["| " + " | ".join([r["model"], *[f"{r['digit_accuracy_by'].get(g, float('nan')):.3f}"
                                                   for g in groups]]) + " |" for r in rows]
    tmp = out / ".results.md.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, out / "results.md")


def _mean_spread(values: list[float]) -> tuple[float, float, float]:
    return statistics.mean(values), min(values), max(values)


def plot_by_difficulty(rows: list[dict], path: Path, difficulty: str, title: str) -> None:
    """Task accuracy against difficulty, one line per (size, n): the mean over seeds, the band min..max; beside
    it the share of answer digits right where the rows have it."""
    plt = pyplot()
    metrics = [("accuracy_by", "exact-match accuracy")]
    if all("digit_accuracy_by" in r for r in rows):
        metrics.append(("digit_accuracy_by", "share of answer digits right"))
    fig, axes = plt.subplots(1, len(metrics), figsize=(7 * len(metrics), 4.5), squeeze=False)
    lines = defaultdict(list)
    for r in rows:
        lines[(r["size"], r["n"])].append(r)
    for ax, (key, ylabel) in zip(axes[0], metrics):
        for (size, n), rs in sorted(lines.items()):
            groups = sorted({g for r in rs for g in r[key]}, key=_key)
            stats = [_mean_spread([r[key][g] for r in rs if g in r[key]]) for g in groups]
            x = list(range(len(groups)))
            ax.plot(x, [s[0] for s in stats], marker="o", label=f"{size} n={n} ({len(rs)} seeds)")
            ax.fill_between(x, [s[1] for s in stats], [s[2] for s in stats], alpha=0.15)
            ax.set_xticks(x, groups)
        _label(ax, difficulty, ylabel, title)
    _save(plt, fig, path)


def _label(ax, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()


def _save(plt, fig, path: Path) -> None:
    fig.tight_layout()
    save(fig, path)
    plt.close(fig)


def plot_by_tokens(rows: list[dict], path: Path, title: str) -> None:
    """Accuracy at each evaluated checkpoint against training tokens, one line per (size, n), mean over seeds."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    lines = defaultdict(lambda: defaultdict(list))
    for r in rows:
        for point in r["curve"]:
            lines[(r["size"], r["n"])][point["tokens"]].append(point["accuracy"])
    for (size, n), points in sorted(lines.items()):
        xs = sorted(points)
        stats = [_mean_spread(points[x]) for x in xs]
        ax.plot(xs, [s[0] for s in stats], marker="o", label=f"{size} n={n}")
        ax.fill_between(xs, [s[1] for s in stats], [s[2] for s in stats], alpha=0.15)
    _label(ax, "training tokens", "accuracy on a name's second token", title)
    _save(plt, fig, path)
