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


def _row(cells) -> str:
    return "| " + " | ".join(cells) + " |"


def write_table(rows: list[dict], out: Path, header: str, difficulty: str | None) -> None:
    """One row per model, then the seeds' summary and verdicts; `difficulty` names the group the task metric is
    broken down by (None: the recipe has no accuracy, bytes)."""
    summary = summarise(rows) if difficulty else []
    write_json_atomic(out / "results.json", {"header": header, "difficulty": difficulty, "rows": rows,
                                             "summary": summary})
    groups = sorted({g for r in rows for g in r.get("accuracy_by", {})}, key=_key)
    cols = ["model", "n", "seed", "parameters (non-embedding)", "tokens seen", "val loss per head",
            *(["accuracy", *[f"{difficulty}={g}" for g in groups]] if difficulty else [])]
    lines = [header, "", _row(cols), "|" + "---|" * len(cols)]
    for r in rows:
        cells = [r["model"], str(r["n"]), str(r["seed"]), f"{r['parameters']:,} ({r['non_embedding_parameters']:,})",
                 f"{r['tokens_seen']:,}", " ".join(f"{x:.3f}" for x in r["val_head_losses"])]
        if difficulty:
            cells += [f"{r['accuracy']:.3f}", *[f"{r['accuracy_by'][g]:.3f}" if g in r["accuracy_by"] else "-"
                                                for g in groups]]
        lines.append(_row(cells))
    if summary:
        lines += ["", "Mean over seeds [min, max], and the verdict against n = 1 of the same size: better or worse "
                      "where the seeds' ranges do not overlap with at least 3 seeds each (a one-sided permutation p of "
                      "at most 1/20), else indistinguishable:", "",
                  _row(["size", "n", "seeds", "accuracy", *[f"{difficulty}={g}" for g in groups]]),
                  "|" + "---|" * (len(groups) + 4)]
        for s in summary:
            lines.append(_row([s["size"], str(s["n"]), str(s["seeds"]), _cell(s["accuracy"]),
                               *[_cell(s["accuracy_by"].get(g)) for g in groups]]))
    if any("accuracy_by_op" in r for r in rows):
        ops = sorted({o for r in rows for o in r["accuracy_by_op"]})
        lines += ["", "Exact match at m = 1 by operator:", "", _row(["model", *ops]), "|" + "---|" * (len(ops) + 1)]
        lines += [_row([r["model"], *[f"{r['accuracy_by_op'].get(o, float('nan')):.3f}" for o in ops]])
                  for r in rows]
    if any("copies_a_name" in r for r in rows):
        lines += ["", "What the predictions at the final checkpoint are: the share that copy the second token of some "
                      "earlier name, and the accuracy of copying one of the earlier names at random (1/k with k names "
                      "before; accuracy near it with copies near 1 is copying without matching the name's first "
                      "token):", "", _row(["model", "accuracy", "copies a name", "random-name accuracy"]),
                  "|---|---|---|---|"]
        lines += [_row([r["model"], f"{r['accuracy']:.3f}", f"{r['copies_a_name']:.3f}",
                        f"{r['random_name_accuracy']:.3f}"]) for r in rows]
    lines += decoding_lines(rows)
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


def verdict(these: list[float], baseline: list[float]) -> str:
    """better / worse where the two sets of seeds do not overlap and there are at least 3 of each (the chance of
    no overlap by luck alone, one way, is then at most 1/20), else indistinguishable."""
    if min(len(these), len(baseline)) < 3:
        return "indistinguishable"
    if min(these) > max(baseline):
        return "better"
    if max(these) < min(baseline):
        return "worse"
    return "indistinguishable"


def _stats(values: list[float], baseline: list[float] | None) -> dict:
    mean, lo, hi = _mean_spread(values)
    return {"mean": mean, "min": lo, "max": hi, "values": values,
            **({"verdict": verdict(values, baseline)} if baseline is not None else {})}


def _cell(s: dict | None) -> str:
    if s is None:
        return "-"
    v = f" {s['verdict']}" if "verdict" in s else ""
    return f"{s['mean']:.3f} [{s['min']:.3f}, {s['max']:.3f}]{v}"


def summarise(rows: list[dict]) -> list[dict]:
    """Per (size, n): the accuracy over seeds, overall and by difficulty, each n > 1 with its verdict against
    n = 1 of the same size (when that was trained)."""
    by = defaultdict(list)
    for r in rows:
        by[(r["size"], r["n"])].append(r)
    out = []
    for (size, n), rs in by.items():
        base = by.get((size, 1)) if n > 1 else None
        groups = sorted({g for r in rs for g in r["accuracy_by"]}, key=_key)
        out.append({"size": size, "n": n, "seeds": len(rs),
                    "accuracy": _stats([r["accuracy"] for r in rs], base and [r["accuracy"] for r in base]),
                    "accuracy_by": {g: _stats([r["accuracy_by"][g] for r in rs if g in r["accuracy_by"]],
                                              base and [r["accuracy_by"][g] for r in base if g in r["accuracy_by"]])
                                    for g in groups}})
    return out


def decoding_lines(rows: list[dict]) -> list[str]:
    """The bytes recipe's decoding table: per model with drafts, per k and mode."""
    lines = []
    for r in rows:
        d = r.get("decoding")
        if not d:
            continue
        modes = [m for m in ("eager", "compiled") if m in d]
        lines += ["", f"{r['model']}: {d['prompts']} held-out prompts of {d['prompt_tokens']} bytes, "
                      f"{d['new_tokens']} new bytes each, batch 1, {d['threads']} threads. Speed-up over k = 0 of the "
                      f"same mode; 'differ': outputs unlike eager plain greedy decoding's.", "",
                  _row(["k", "tokens/forward", "acceptance by draft position",
                        *[f"{m} {c}" for m in modes for c in ("tokens/s", "speed-up", "differ")]]),
                  "|" + "---|" * (3 + 3 * len(modes))]
        for i, e in enumerate(d["eager"]):
            cells = [str(e["k"]), f"{e['tokens_per_forward']:.2f}", " ".join(f"{a:.2f}" for a in e["acceptance"]) or "-"]
            for m in modes:
                x = d[m][i]
                cells += [f"{x['tokens_per_second']:.1f}", f"{x['speedup']:.2f}", str(x["differ"])]
            lines.append(_row(cells))
        if "compiled" in d:
            ratio = d["compiled"][0]["tokens_per_second"] / d["eager"][0]["tokens_per_second"]
            lines.append(f"\nCompiled plain decoding is {ratio:.2f}x eager plain decoding.")
    return lines


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


def curves_by_tokens(rows: list[dict]) -> dict:
    """(size, n) -> [(training tokens, mean, min, max)] of accuracy over seeds, at the checkpoints every seed of
    that (size, n) has: a run that was stopped and continued keeps a checkpoint at its stop, and a mean over that
    one seed would read as a dip or a jump of the whole line."""
    lines = defaultdict(lambda: defaultdict(list))
    seeds = defaultdict(int)
    for r in rows:
        seeds[(r["size"], r["n"])] += 1
        for point in r["curve"]:
            lines[(r["size"], r["n"])][point["tokens"]].append(point["accuracy"])
    return {key: [(x, *_mean_spread(points[x])) for x in sorted(points) if len(points[x]) == seeds[key]]
            for key, points in sorted(lines.items())}


def plot_by_tokens(rows: list[dict], path: Path, title: str) -> None:
    """Accuracy at each evaluated checkpoint against training tokens, one line per (size, n), mean over seeds."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (size, n), points in curves_by_tokens(rows).items():
        xs = [p[0] for p in points]
        ax.plot(xs, [p[1] for p in points], marker="o", label=f"{size} n={n}")
        ax.fill_between(xs, [p[2] for p in points], [p[3] for p in points], alpha=0.15)
    levels = [r["random_name_accuracy"] for r in rows if "random_name_accuracy" in r]
    if levels:  # the level that copying a random earlier name reaches
        ax.axhline(sum(levels) / len(levels), color="grey", linestyle="--", label="copying a random earlier name")
    _label(ax, "training tokens", "accuracy on a name's second token", title)
    _save(plt, fig, path)


def plot_decoding(rows: list[dict], path: Path, title: str) -> None:
    """Tokens per forward and speed-up over plain decoding against the number of drafts k, one line per model
    with drafts (and per mode for the speed-up)."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    for r in rows:
        d = r.get("decoding")
        if not d:
            continue
        ks = [e["k"] for e in d["eager"]]
        left.plot(ks, [e["tokens_per_forward"] for e in d["eager"]], marker="o", label=r["model"])
        for mode, style in (("eager", "-"), ("compiled", "--")):
            if mode in d:
                right.plot(ks, [e["speedup"] for e in d[mode]], style, marker="o", label=f"{r['model']} {mode}")
    _label(left, "drafts k", "tokens per forward", title)
    _label(right, "drafts k", "speed-up over plain decoding (same mode)", title)
    _save(plt, fig, path)
