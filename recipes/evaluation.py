"""A recipe's trained models measured with mtp-eval's functions: per-head validation loss, and each recipe's own
metric (polynomial: greedy exact match by m and by operator; induction: teacher-forced name accuracy at every
kept checkpoint; bytes: self-speculative decoding of held-out code). Each result is cached in the model's folder,
so a re-run measures only what is missing."""

from __future__ import annotations

import json
from pathlib import Path

from mtplm.data.manifest import write_json_atomic

from . import byte_code, induction, polynomial
from .presets import Preset
from .training import log

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
    if tasks is not None:  # the answer is ring_terms digits; the model ends it with the end-of-document token
        calls["eval_tasks.json"] = ["--tasks", str(tasks), "--max-new-tokens", str(preset.ring_terms),
                                    "--prepend-eod", "--completions", str(folder / "completions.jsonl")]
    result = {}
    for name, argv in calls.items():
        path = folder / name
        if not path.is_file() or ("--completions" in argv and not Path(argv[argv.index("--completions") + 1]).is_file()):
            argv = common + argv + ["--output", str(path)]
            run(parse_args(argv), argv)
        result.update(json.loads(path.read_text()))
    return result


def induction_curve(folder: Path, preset: Preset, seq_len: int, test: Path) -> list[dict]:
    """Name accuracy at every kept checkpoint (and the final model), by occurrence; beside it the share of
    predictions that copy some earlier name's second token ("copies_a_name") and the accuracy of copying one of
    the earlier names at random ("random_name_accuracy"): accuracy at that level with copies_a_name near 1 is
    copying without matching the name's first token, not induction."""
    from mtplm.data.tokenizer import ByteTokenizer
    from mtplm.inference.evaluate import load_for_eval

    from .induction_eval import copy_diagnosis, next_token_predictions

    path = folder / "induction_eval.json"
    if path.is_file():
        curve = json.loads(path.read_text())["curve"]
        if all("copies_a_name" in point for point in curve):  # else written before the diagnosis: redo
            return curve
    tok = ByteTokenizer()
    stories = [json.loads(line)["text"] for line in test.read_text().splitlines()]
    # A story follows an end-of-document token, as in training's packed samples; cut to the context.
    seqs = [([tok.eod_id] + tok.encode(s))[:seq_len] for s in stories]
    found = [induction.name_positions(s) for s in seqs]
    tokens_at = consumed_tokens(folder)
    steps = sorted(int(p.name[5:]) for p in (folder / "checkpoints").glob("step_*") if (p / "COMPLETE").is_file())
    curve = []
    for step in steps:
        model, _, _ = load_for_eval(folder / "checkpoints" / f"step_{step:08d}")
        predicted = next_token_predictions(model, seqs, [[p for p, _ in f] for f in found], preset.eval_batch_size,
                                           tok.eod_id)
        by: dict[str, list[int]] = {}
        every, copies, level = [], [], []
        for s, f, pred in zip(seqs, found, predicted):
            for (p, k), t in zip(f, pred):
                ok = t == s[p + 1]
                by.setdefault(induction.occurrence_group(k), []).append(ok)
                copied, guess = copy_diagnosis(s, p, t, induction.LEAD_BYTES)
                every.append(ok), copies.append(copied), level.append(guess)
        curve.append({"step": step, "tokens": tokens_at.get(step, 0), "positions": len(every),
                      "accuracy": sum(every) / len(every), "by": {g: sum(v) / len(v) for g, v in by.items()},
                      "copies_a_name": sum(copies) / len(copies), "random_name_accuracy": sum(level) / len(level)})
    write_json_atomic(path, {"test": str(test), "curve": curve})
    return curve


def evaluate_model(recipe: str, preset: Preset, folder: Path, cfg: dict, test: Path, size: str, n: int, seed: int,
                   mcfg, counts) -> dict:
    """One row of the results: the model, its parameters, tokens seen, validation loss per head and its metric."""
    name = folder.name
    ev = mtp_eval(folder, cfg, preset, test if recipe == "polynomial" else None)
    row = {"model": name, "size": size, "n": n, "seed": seed, "parameters": counts.total,
           "non_embedding_parameters": counts.trunk_blocks + counts.heads + mcfg.dim,
           "tokens_seen": max(consumed_tokens(folder).values()),
           "val_head_losses": ev["dataset"]["head_losses"]}
    if recipe == "polynomial":
        t = ev["tasks"][0]
        row.update(accuracy=t["accuracy"], accuracy_by={m: s["accuracy"] for m, s in t["by"]["m"].items()},
                   accuracy_by_op={o: s["accuracy"] for o, s in t["by"].get("op", {}).items()},
                   digit_accuracy_by=polynomial.digit_accuracy_by_m(folder / "completions.jsonl"))
    elif recipe == "induction":
        curve = induction_curve(folder, preset, cfg["data"]["seq_len"], test)
        row.update(accuracy=curve[-1]["accuracy"], accuracy_by=curve[-1]["by"], curve=curve,
                   copies_a_name=curve[-1]["copies_a_name"], random_name_accuracy=curve[-1]["random_name_accuracy"])
    elif n > 1:
        row.update(decoding=decoding(folder, preset, test))
    log(f"{name}: " + (f"accuracy {row['accuracy']:.3f}, " if "accuracy" in row else "")
        + "validation loss per head " + " ".join(f"{x:.3f}" for x in row["val_head_losses"]))
    return row


def decoding(folder: Path, preset: Preset, test: Path) -> dict:
    """Self-speculative greedy decoding of the held-out code prompts, eager (and compiled where the preset says),
    by number of drafts k (recipes/byte_code.py)."""
    import torch

    from mtplm.data.tokenizer import ByteTokenizer
    from mtplm.inference.evaluate import load_for_eval

    path = folder / "decoding.json"
    if path.is_file():
        return json.loads(path.read_text())
    tok = ByteTokenizer()
    prompts = [tok.encode(json.loads(line)["prompt"]) for line in test.read_text().splitlines()]
    model, _, _ = load_for_eval(folder / "final")
    model = model.float()
    result = {"prompts": len(prompts), "prompt_tokens": byte_code.PROMPT_BYTES, "new_tokens": byte_code.NEW_BYTES,
              "threads": torch.get_num_threads()}
    for mode in ("eager", "compiled") if preset.decode_compiled else ("eager",):
        log(f"{folder.name}: {mode} decoding of {len(prompts)} held-out prompts, k = 0..{model.cfg.n_future_tokens - 1}")
        result[mode] = byte_code.decoding_speed(model, prompts, byte_code.NEW_BYTES, mode == "compiled")
    write_json_atomic(path, result)
    return result


