"""Training checkpoints on top of DeepSpeed's: layout, the `latest` pointer, pruning, RNG and config checks.

    <out_dir>/checkpoints/latest                        the newest *complete* tag, replaced atomically
    <out_dir>/checkpoints/step_00000100/                DeepSpeed's files (model, optimizer, LR schedule)
    <out_dir>/checkpoints/step_00000100/mtp_config.json the full training config
    <out_dir>/checkpoints/step_00000100/rng_rank{r}.pt  each rank's RNG states
    <out_dir>/checkpoints/step_00000100/COMPLETE        written last, after every rank finished

DeepSpeed's own `latest` file is not used (save_latest=False): it is written before other ranks are
known to be done, so a crash could leave it pointing at a half-written checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from mtplm.data.fingerprint import TOKENIZER, differences

from ..config import TrainConfig, to_dict
from ..consistency import broadcast, refuse_together, stop_together
from .reshard import (CHANGES_KEY, UNIVERSAL, ReshardError, layout_changes, load_universal, needs_reshard,
                      plan_batch, saved_layout, write_universal)

LATEST = "latest"
COMPLETE = "COMPLETE"
CONFIG_FILE = "mtp_config.json"
DATA_KEY = "data_fingerprint"  # in DeepSpeed's client state: what the run read, to compare on resume
_TAG_RE = re.compile(r"^step_(\d+)$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def rng_state() -> dict:
    state = {
        "python": torch.tensor(list(random.getstate()[1]), dtype=torch.int64),
        "python_pos": torch.tensor(random.getstate()[2] if random.getstate()[2] is not None else -1),
        "numpy_keys": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "numpy_pos": torch.tensor(np.random.get_state()[2]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate((3, tuple(int(x) for x in state["python"].tolist()), int(state["python_pos"]) if int(state["python_pos"]) >= 0 else None))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), int(state["numpy_pos"]), 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class CheckpointSaveError(RuntimeError):
    """A rank could not write its part of a checkpoint; every rank raises it, and `latest` is left alone."""


class _RecordingCheckpointEngine:
    """Stands in for DeepSpeed's checkpoint engine during one save. A rank whose write fails (disk full, a path it
    cannot write) records the error and carries on, so it still joins the collectives inside
    engine.save_checkpoint instead of leaving the other ranks waiting in them."""

    def __init__(self, inner, failures: list[str]):
        self._inner, self._failures = inner, failures

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def _record(self, path, write):
        try:
            write()
        except Exception as e:  # torch.save reports a failed write as RuntimeError, os calls as OSError
            self._failures.append(f"{path}: {e}")

    def save(self, state_dict, path):
        self._record(path, lambda: self._inner.save(state_dict, path))

    def makedirs(self, path, exist_ok=False):
        self._record(path, lambda: self._inner.makedirs(path, exist_ok=exist_ok))


def _gather_failures(failures: list[str]) -> list[tuple[int, str]]:
    """Collective: every rank's first failure, so that all ranks take the same decision."""
    reports = [None] * dist.get_world_size()
    dist.all_gather_object(reports, failures[0] if failures else None)
    return [(r, m) for r, m in enumerate(reports) if m]


def save_checkpoint(engine, cfg: TrainConfig, step: int, client_state: dict) -> Path:
    """Collective: every rank must call it. Returns the tag folder. Raises CheckpointSaveError on every rank if
    any rank failed to write its part, after leaving the process group (the run ends); the checkpoint is then not
    marked complete and `latest` is not moved."""
    root = checkpoint_dir(cfg.train.out_dir)
    tag = tag_for(step)
    rank = dist.get_rank()
    folder = root / tag
    if rank == 0:
        # Saving over a complete checkpoint of the same step (a resumed run that ends where it started, or a new
        # run in the same out_dir): unmark it before its files are rewritten, so a crash meanwhile cannot leave
        # a folder marked complete that mixes two saves.
        (folder / COMPLETE).unlink(missing_ok=True)
        # Then its files go: a save of another layout writes other files (fewer ranks, other partitions), and
        # leftovers of the old one (or its layout-free form, reshard.py) would be read as part of the new one.
        for old in folder.iterdir() if folder.is_dir() else []:
            if old.is_dir():
                shutil.rmtree(old)
            else:
                old.unlink(missing_ok=True)
    dist.barrier()
    failures: list[str] = []
    ds_engine = engine.checkpoint_engine
    engine.checkpoint_engine = _RecordingCheckpointEngine(ds_engine, failures)
    try:
        engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    finally:
        engine.checkpoint_engine = ds_engine
    if not failures:
        rng_file = folder / f"rng_rank{rank}.pt"
        try:
            torch.save(rng_state(), rng_file)
        except Exception as e:
            failures.append(f"{rng_file}: {e}")
    failed = _gather_failures(failures)
    if not failed and rank == 0:
        try:
            _atomic_write(folder / CONFIG_FILE, json.dumps(to_dict(cfg), indent=2) + "\n")
            (folder / COMPLETE).write_text(str(step) + "\n")
            _atomic_write(root / LATEST, tag + "\n")
        except Exception as e:
            failures.append(f"{folder}: {e}")
    failed = failed or _gather_failures(failures)
    if failed:
        latest = root / LATEST
        previous = latest.read_text().strip() if latest.is_file() else None
        # Every rank agreed on the failure and ends the run: leave the process group together, as a rank that
        # exits inside it can tear the connections down under a peer (gloo then aborts that peer's process).
        dist.destroy_process_group()
        raise CheckpointSaveError(
            f"checkpoint {folder} was not saved: "
            + "; ".join(f"rank {r} could not write {m}" for r, m in failed)
            + (f". {latest} still names {previous}" if previous else ". There is no earlier complete checkpoint"))
    if rank == 0:
        prune(root, cfg.train.keep_last)
    dist.barrier()
    return folder


def complete_tags(root: Path) -> list[str]:
    tags = [p.name for p in root.iterdir() if _TAG_RE.match(p.name) and (p / COMPLETE).is_file()] if root.is_dir() else []
    return sorted(tags, key=lambda t: int(_TAG_RE.match(t).group(1)))


def prune(root: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    tags = complete_tags(root)
    for tag in tags[:-keep_last]:
        shutil.rmtree(root / tag, ignore_errors=True)
    # Folders without COMPLETE older than the newest complete one are debris of an interrupted save.
    if tags:
        newest = int(_TAG_RE.match(tags[-1]).group(1))
        for p in root.iterdir():
            m = _TAG_RE.match(p.name)
            if m and int(m.group(1)) < newest and not (p / COMPLETE).is_file():
                shutil.rmtree(p, ignore_errors=True)


def resolve_resume(resume: str, out_dir: str | Path) -> Path | None:
    """'none' -> None; 'auto' -> newest complete checkpoint in out_dir (or None); else a checkpoints folder or tag."""
    if resume == "none":
        return None
    if resume == "auto":
        root = checkpoint_dir(out_dir)
        latest = root / LATEST
        if latest.is_file():
            tag = latest.read_text().strip()
            if (root / tag / COMPLETE).is_file():
                return root / tag
        tags = complete_tags(root)
        return root / tags[-1] if tags else None
    path = Path(resume)
    if (path / LATEST).is_file():
        path = path / path.joinpath(LATEST).read_text().strip()
    if not (path / COMPLETE).is_file():
        raise FileNotFoundError(f"train.resume: {path} is not a complete checkpoint (no {COMPLETE} marker); "
                                f"give a checkpoints folder with a '{LATEST}' file, or a step_* folder")
    return path


# Fields whose change makes a checkpoint a different model or different data; refused on resume. The layout
# (data-parallel, tensor and pipeline sizes, ZeRO stage, micro-batch and accumulation) may change as long as the
# global batch stays (reshard.py).
_MUST_MATCH = [("model", k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "n_future_tokens",
                                      "multiple_of", "ffn_dim_multiplier", "tie_embeddings", "vocab_pad_multiple")]
# data.datasets and data.tokenizer are compared by content (load_checkpoint), not by path: data may move, or be
# node-local copies.
_MUST_MATCH += [("data", "seq_len"), ("data", "seed")]


def config_differences(saved: dict, cfg: TrainConfig) -> list[str]:
    current, defaults = to_dict(cfg), to_dict(TrainConfig())
    diffs = []
    for section, key in _MUST_MATCH:
        # A key the checkpoint predates had its default value then.
        a, b = saved.get(section, {}).get(key, defaults[section][key]), current[section][key]
        if a != b:
            diffs.append(f"{section}.{key}: checkpoint {a!r}, this run {b!r}")
    return diffs


def resume_config_problem(folder: Path, cfg: TrainConfig) -> str | None:
    saved = json.loads((folder / CONFIG_FILE).read_text())
    diffs = config_differences(saved, cfg)
    if not diffs:
        return None
    return (f"cannot resume from {folder}: its configuration differs from this run's:\n  " + "\n  ".join(diffs)
            + "\nTo start a changed model from these weights (e.g. n_future_tokens 4 -> 1 for fine-tuning), use "
              "--train.init_from with a consolidated model instead of --train.resume.")


def checkpoint_files(folder: Path) -> dict[str, int]:
    """Every file of a checkpoint folder (relative path -> size)."""
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def unreadable(folder: Path, files: dict[str, int]) -> str | None:
    """Why this rank cannot read the checkpoint that rank 0 listed as `files`, or None."""
    if not folder.is_dir():
        return f"{folder} does not exist here"
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        return f"{folder}: {len(missing)} of the {len(files)} files rank 0 sees are missing here (e.g. {missing[0]})"
    changed = [f for f, size in files.items() if (folder / f).stat().st_size != size]
    if changed:
        return (f"{folder}: {len(changed)} files differ in size from rank 0's view (e.g. {changed[0]}: "
                f"{(folder / changed[0]).stat().st_size} bytes here, {files[changed[0]]} on rank 0)")
    try:
        (folder / COMPLETE).read_bytes()
    except OSError as e:
        return f"{folder / COMPLETE}: {e}"
    return None


def _batch_plan(folder: Path, cfg: TrainConfig, dp_world: int) -> tuple[int | None, str | None]:
    """(accumulation steps that keep the checkpoint's global batch, or None; the refusal, or None)."""
    try:
        saved = saved_layout(folder)
    except Exception:  # noqa: BLE001 - unreadable here: load_checkpoint says why, after every rank checked its view
        return cfg.train.grad_accum_steps, None
    gas, why = plan_batch(saved, cfg.train.micro_batch_size, cfg.train.grad_accum_steps, dp_world,
                          cfg.parallel.tensor, cfg.parallel.pipeline)
    return gas, None if why is None else f"cannot resume from {folder}: {why}"


def decide_resume(cfg: TrainConfig, ds_cfg: dict | None = None) -> Path | None:
    """Collective. Rank 0 decides what to resume from (or that there is nothing) and checks the configuration
    against that checkpoint once; every rank then checks it can read the very same checkpoint, and if one cannot,
    all stop together. Ranks that looked on their own could pick different checkpoints and train apart.
    On another parallel layout, train.grad_accum_steps (and ds_cfg's batch keys) are changed here to keep the
    checkpoint's global batch."""
    t = cfg.train
    decision = None
    if dist.get_rank() == 0:
        try:
            folder = resolve_resume(t.resume, t.out_dir)
            decision = {"tag": None, "error": None} if folder is None else {
                "tag": folder.name, "root": str(folder.parent.resolve()), "files": checkpoint_files(folder),
                "error": resume_config_problem(folder, cfg)}
            if folder is not None and decision["error"] is None:
                dp_world = dist.get_world_size() // (cfg.parallel.tensor * cfg.parallel.pipeline)
                decision["grad_accum"], decision["error"] = _batch_plan(folder, cfg, dp_world)
        except (OSError, ValueError) as e:
            decision = {"tag": None, "error": str(e)}
    decision = broadcast(decision)
    if decision["error"]:
        stop_together(decision["error"])
    if decision["tag"] is None:
        return None
    if decision["grad_accum"] != t.grad_accum_steps:
        t.grad_accum_steps = decision["grad_accum"]
        if ds_cfg is not None:
            ds_cfg["gradient_accumulation_steps"] = t.grad_accum_steps
            ds_cfg["train_batch_size"] = t.micro_batch_size * t.grad_accum_steps * (
                dist.get_world_size() // (cfg.parallel.tensor * cfg.parallel.pipeline))
    # `auto` is relative to each rank's own out_dir (nodes may mount the shared filesystem at different paths).
    root = checkpoint_dir(t.out_dir) if t.resume == "auto" else Path(decision["root"])
    folder = root / decision["tag"]
    try:
        problem = unreadable(folder, decision["files"])
    except OSError as e:
        problem = f"{folder}: {e}"
    refuse_together(problem,
                    f"train.resume: rank 0 resumes from {decision['tag']} ({decision['root']}), which not every "
                    f"rank can read (checkpoints must be on a filesystem every rank shares, and complete):")
    return folder


def data_problem(folder: Path, saved: dict, data_fp: dict | None, cfg_tokenizer: str | None) -> str | None:
    """The checkpoint's datasets against this run's, by fingerprint; by path for checkpoints that predate it."""
    if DATA_KEY in saved:
        # data.seq_len and data.seed are checked with the configuration; split and weights may change on resume.
        lines = differences(saved[DATA_KEY], data_fp, "checkpoint", "this run", params=[TOKENIZER])
    else:
        old_data = json.loads((folder / CONFIG_FILE).read_text()).get("data", {})
        now = {"datasets": [d["path"] for d in data_fp["datasets"]] if data_fp else [], "tokenizer": cfg_tokenizer}
        lines = [f"data.{k}: checkpoint {old_data.get(k)!r}, this run {now[k]!r} (this checkpoint predates data "
                 f"fingerprints, so it is compared by path)" for k in now if old_data.get(k, now[k]) != now[k]]
    if not lines:
        return None
    return (f"cannot resume from {folder}: it was trained on other data (datasets are identified by documents, "
            f"tokens and a hash of their index, so a moved copy is fine):\n  " + "\n  ".join(lines))


def _layout_now(engine, cfg: TrainConfig) -> dict:
    t, p = cfg.train, cfg.parallel
    precision = "bf16" if engine.bfloat16_enabled() else "fp16" if engine.fp16_enabled() else "fp32"
    return {"data_parallel": dist.get_world_size() // (p.tensor * p.pipeline), "tensor": p.tensor,
            "pipeline": p.pipeline, "zero_stage": engine.zero_optimization_stage(), "precision": precision,
            "micro_batch_size": t.micro_batch_size, "grad_accum_steps": t.grad_accum_steps}


def _reshard_plan(engine, cfg: TrainConfig, folder: Path) -> dict:
    """Collective: rank 0 compares the checkpoint's layout with this run's and, for a layout DeepSpeed cannot load
    into, writes the checkpoint's layout-free form."""
    plan = None
    if dist.get_rank() == 0:
        try:
            saved, now = saved_layout(folder), _layout_now(engine, cfg)
            plan = {"changes": layout_changes(saved, now), "reshard": needs_reshard(saved, now), "error": None}
            if plan["reshard"]:
                write_universal(folder)
        except Exception as e:  # noqa: BLE001 - the other ranks wait for this decision: they must hear of it
            plan = {"error": f"train.resume: cannot carry {folder} into this layout: {e}"}
    plan = broadcast(plan)
    if plan["error"]:
        stop_together(plan["error"])
    return plan


def load_checkpoint(engine, cfg: TrainConfig, folder: Path, data_fp: dict | None = None) -> dict:
    """Collective. `folder` comes from decide_resume (configuration already checked); the data fingerprint is
    kept in DeepSpeed's client state, so it is compared, on rank 0, once that is loaded. A checkpoint of another
    layout is loaded through its layout-free form (reshard.py); client_state[CHANGES_KEY] says what changed."""
    plan = _reshard_plan(engine, cfg, folder)
    if plan["reshard"]:
        client_state, problem = None, None
        try:
            client_state = load_universal(engine, folder, cfg.model.n_trunk_layers)
        except ReshardError as e:
            problem = str(e)
        refuse_together(problem, f"train.resume: cannot carry {folder} into this layout:")
        plan["changes"].append(f"optimizer state (fp32 masters, Adam moments, step) carried over through "
                               f"{folder / UNIVERSAL}")
    else:
        _, client_state = engine.load_checkpoint(str(folder.parent), tag=folder.name)
    refuse_together(None if client_state is not None else "DeepSpeed could not load it",
                    f"train.resume: {folder} could not be loaded on every rank:")
    client_state[CHANGES_KEY] = plan["changes"]
    problem = data_problem(folder, client_state, data_fp, cfg.data.tokenizer) if dist.get_rank() == 0 else None
    problem = broadcast(problem)
    if problem:
        stop_together(problem)
    # Every rank starts from the same seed; in another layout the ranks are other ranks, so they take rank 0's.
    rng_file = folder / f"rng_rank{0 if plan['reshard'] else dist.get_rank()}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    return client_state
