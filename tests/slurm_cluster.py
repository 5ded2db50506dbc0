"""A real one-node Slurm on this host for tests: munged, slurmctld and slurmd started from a generated slurm.conf in
a folder of their own (own ports, state, spool, munge socket and key), so they never touch a Slurm the machine may
already run. Clients reach it through SLURM_CONF in the environment that `env()` returns; jobs inherit it.

    python tests/slurm_cluster.py DIR      # start one by hand, print the variable to export; Ctrl-C or SIGTERM stops it
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel", "srun")
# Slurm's cred_expire (default 120 s) is also how long a requeued job waits before it may start again.
REQUEUE_DELAY_S = 10
KILL_WAIT_S = 75  # the grace between SIGTERM and SIGKILL on scancel, pre-emption, requeue and the time limit


class SlurmUnavailable(Exception):
    """Slurm or munge is not installed, or its daemons did not start (the reason is the message)."""


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


SLURM_CONF = """\
ClusterName=mtptest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket},cred_expire={requeue_delay}
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
KillWait={kill_wait}
MinJobAge=600
InactiveLimit=0
# A requeued job becomes eligible after cred_expire; these passes start it within seconds of that.
SchedulerParameters=sched_interval=2,bf_interval=2
# More CPUs than the host has, so that jobs asking for several tasks run side by side (nothing is bound).
SlurmdParameters=config_overrides
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE OverSubscribe=YES State=UP
"""


class SlurmCluster:
    def __init__(self, folder: Path):
        self.dir = Path(folder)
        self.host = socket.gethostname().split(".")[0]
        self.procs: list[subprocess.Popen] = []

    def env(self, **extra) -> dict:
        return dict(os.environ, SLURM_CONF=str(self.dir / "slurm.conf"), **extra)

    def start(self, timeout: float = 60) -> "SlurmCluster":
        missing = [d for d in DAEMONS if shutil.which(d) is None and not Path("/usr/sbin", d).exists()]
        if missing:
            raise SlurmUnavailable(f"not installed: {', '.join(missing)} (apt-get install slurm-wlm munge)")
        if os.geteuid() != 0:
            raise SlurmUnavailable("the test Slurm's daemons must run as root")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o700)  # munged refuses key and socket folders that others may write
        for sub in ("state", "spool", "munge"):
            (self.dir / sub).mkdir(exist_ok=True)
        munge = self.dir / "munge"
        ctld_port, slurmd_port = _free_ports(2)
        subprocess.run(["mungekey", "--create", "--force", "--keyfile", str(munge / "munge.key")], check=True,
                       capture_output=True)
        (self.dir / "slurm.conf").write_text(SLURM_CONF.format(
            host=self.host, ctld_port=ctld_port, slurmd_port=slurmd_port, munge_socket=munge / "munge.socket",
            dir=self.dir, cpus=max(32, os.cpu_count()), kill_wait=KILL_WAIT_S, requeue_delay=REQUEUE_DELAY_S))
        self._spawn(["munged", "--foreground", "--force", f"--socket={munge / 'munge.socket'}",
                     f"--key-file={munge / 'munge.key'}", f"--pid-file={munge / 'munged.pid'}",
                     f"--log-file={munge / 'munged.log'}", f"--seed-file={munge / 'munged.seed'}"], "munged")
        self._wait(lambda: (munge / "munge.socket").exists(), timeout, "munged did not create its socket")
        conf = str(self.dir / "slurm.conf")
        self._spawn(["slurmctld", "-D", "-i", "-f", conf], "slurmctld")
        self._wait(lambda: self._run("scontrol", "ping").returncode == 0 and "UP" in self._run("scontrol", "ping")
                   .stdout, timeout, "slurmctld does not answer `scontrol ping`")
        self._spawn(["slurmd", "-D", "-f", conf, "-N", self.host], "slurmd")
        self._wait(lambda: "idle" in self._run("sinfo", "-h", "-o", "%T").stdout, timeout,
                   "the node did not become idle")
        return self

    def _spawn(self, cmd: list[str], name: str) -> None:
        log = open(self.dir / f"{name}.out", "ab")
        self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env(),
                                           start_new_session=True))

    def _run(self, *cmd) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env(), capture_output=True, text=True, timeout=30)

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [p.args[0] for p in self.procs if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                self.stop()
                logs = "".join(f"\n--- {p.name}\n" + p.read_text(errors="replace")[-1500:]
                               for p in sorted(self.dir.glob("*.out")) + sorted(self.dir.glob("*.log")))
                raise SlurmUnavailable(f"{what}{f' ({dead[0]} exited)' if dead else ''}{logs}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.procs and all(p.poll() is None for p in self.procs[-1:]):
            # Jobs still running (a failed test): their processes are killed while slurmd can still find them;
            # slurmstepd outlives slurmd otherwise.
            self._run("scancel", "--full", "--signal=KILL", "--user=root")
            pids = self._run("scontrol", "listpids").stdout.split("\n")[1:]
            for pid in (line.split()[0] for line in pids if line.split() and line.split()[0].isdigit()):
                try:
                    os.kill(int(pid), 9)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 30
            while self._run("squeue", "-h").stdout.strip() and time.monotonic() < deadline:
                time.sleep(0.5)
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self.procs = []

    # --- what the tests ask of it

    def sbatch(self, *args, cwd: Path | str, env: dict | None = None) -> str:
        proc = subprocess.run(["sbatch", "--parsable", *args], cwd=cwd, env=env or self.env(), capture_output=True,
                              text=True, timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)}: {proc.stderr}")
        return proc.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict:
        """`scontrol show job` as a dict (one array task: JOBID_TASK); {} once Slurm no longer knows it."""
        out = self._run("scontrol", "-o", "show", "job", job_id).stdout
        fields = {}
        for word in out.split():
            key, _, value = word.partition("=")
            fields.setdefault(key, value)
        return fields

    def scontrol(self, *args) -> subprocess.CompletedProcess:
        return self._run("scontrol", *args)

    def scancel(self, *args) -> subprocess.CompletedProcess:
        return self._run("scancel", *args)


if __name__ == "__main__":
    import signal

    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started in the background
    cluster = SlurmCluster(Path(sys.argv[1])).start()
    print(f"export SLURM_CONF={cluster.dir / 'slurm.conf'}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
