"""Start real multi-process runs on CPU (gloo), the way a launcher does: one process per rank with
RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT in its environment."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_all(procs: list[subprocess.Popen], timeout: float) -> list[tuple[int, str]]:
    """(exit code, output) of every process; past the timeout all of them are killed (one hung rank would
    otherwise keep the others waiting in a collective)."""
    results = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            out, _ = p.communicate()
            out += "\n[timed out]"
        results.append((p.returncode, out))
    return results


def run_ranks(world_size: int, argv: list[str], timeout: float = 600, log_dir: Path | None = None) -> None:
    """Run `python argv...` as world_size ranks; raise with every rank's output if any fails."""
    port = free_port()
    procs = []
    for rank in range(world_size):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        procs.append(subprocess.Popen([sys.executable, *argv], env=env, cwd=REPO, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    results = wait_all(procs, timeout)
    outputs = [out for _, out in results]
    failed = any(rc != 0 for rc, _ in results)
    if log_dir is not None:
        for rank, out in enumerate(outputs):
            (Path(log_dir) / f"stdout_rank{rank}.txt").write_text(out)
    if failed:
        detail = "\n".join(f"----- rank {r} (exit {p.returncode}) -----\n{o[-4000:]}"
                           for r, (p, o) in enumerate(zip(procs, outputs)))
        raise RuntimeError(f"distributed run failed: {' '.join(argv)}\n{detail}")
