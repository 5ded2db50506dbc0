"""Start-up agreement between ranks, before the first step: the same data everywhere, one checkpoint folder that
every rank sees. A multi-node run whose nodes disagree would otherwise train apart without a word (nodes that
draw from different global orders, a resume that one node cannot read) until a collective mismatch much later.

Each check is one collective. A rank that finds a problem does not raise on its own (the others would wait in
their next collective forever): every rank reports, and if any report is bad every rank raises the same
RunRefused, which names the node, host and rank of each failure.
"""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

import torch.distributed as dist

from mtplm.data.config import DataConfig
from mtplm.data.fingerprint import data_fingerprint, differences, digest


class RunRefused(ValueError):
    """Raised on every rank with the same message; nothing has been trained."""


def stop_together(message: str):
    """Called by every rank at once with the same message: leave the process group cleanly (a rank that simply
    exited could tear the connections down under one still inside it), then raise."""
    dist.destroy_process_group()
    raise RunRefused(message)


def where() -> str:
    """This rank, its node (as the launcher numbers it) and host, for messages."""
    # torchrun sets GROUP_RANK, DeepSpeed's launcher CROSS_RANK; both are the node's index.
    node = os.environ.get("GROUP_RANK", os.environ.get("CROSS_RANK"))
    return f"rank {dist.get_rank()} ({f'node {node}, ' if node is not None else ''}host {socket.gethostname()})"


def gather(obj) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj):
    """Rank 0's obj, on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _stop_if_any(problems: list[tuple[str, str | None]], headline: str) -> None:
    """problems: every rank's (where, problem or None), the same list on every rank."""
    bad = [f"{w}: {p}" for w, p in problems if p]
    if bad:
        stop_together(f"{headline}\n  " + "\n  ".join(bad) + "\nEvery rank stopped before the first step.")


def refuse_together(problem: str | None, headline: str) -> None:
    """Collective: each rank passes its problem or None; if any rank has one, all raise the same RunRefused."""
    _stop_if_any(gather((where(), problem)), headline)


def agree_on_data(cfg: DataConfig, n_future_tokens: int) -> dict | None:
    """Collective: every rank fingerprints the data it will read; refused unless all fingerprints are equal.
    Returns the fingerprint (None when the config names no datasets)."""
    fp, problem = None, None
    try:
        fp = data_fingerprint(cfg, n_future_tokens)
    except Exception as e:  # noqa: BLE001 - a missing or broken copy on one node: the others must hear of it
        problem = f"cannot read its data: {e}"
    reports = gather((where(), problem, digest(fp), fp))
    _stop_if_any([r[:2] for r in reports], "data: not every rank can read its datasets:")
    ref_where, _, ref_digest, ref_fp = reports[0]
    lines = [line for w, _, d, other in reports[1:] if d != ref_digest
             for line in differences(ref_fp, other, ref_where, w)]
    if lines:
        stop_together("data: ranks would read different data (every node needs an identical copy of every "
                      "dataset, or one shared copy), so their global sample orders would disagree:\n  "
                      + "\n  ".join(lines) + "\nEvery rank stopped before the first step.")
    return fp


def check_shared_folder(folder: Path) -> None:
    """Collective: rank 0 writes a uniquely named file into folder; every rank must see it."""
    if dist.get_world_size() == 1:
        return
    probe = folder / f".shared-probe-{uuid.uuid4().hex}" if dist.get_rank() == 0 else None
    problem = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if probe is not None:
            probe.write_text(probe.name)
    except OSError as e:
        problem = f"cannot write into {folder}: {e}"
    name = broadcast(probe.name if probe is not None else None)  # after rank 0 wrote it
    if problem is None:
        try:
            seen = (folder / name).read_text() == name
        except OSError:
            seen = False
        problem = None if seen else f"does not see {folder / name}, a file rank 0 wrote into its {folder}"
    try:
        refuse_together(problem, (
            "train.out_dir: the checkpoint folder is not shared by every rank. DeepSpeed writes a checkpoint "
            "from all ranks into one folder (model states from one, optimizer shards from each) and reads it "
            "back the same way, so train.out_dir must be on a filesystem that every node mounts (NFS, Lustre, "
            "GPFS, ...), not a node-local disk:"))
    finally:
        if probe is not None:
            probe.unlink(missing_ok=True)
