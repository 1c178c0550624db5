"""A real single-node Slurm on 127.0.0.1 for the tests: Debian's slurmctld and slurmd (package
slurm-wlm), configured here in a folder of the test's own (its slurm.conf, state, spool, logs, ports
of its own), so that it touches nothing of the machine's and several can run side by side.

`.ci/run` installs the package where it can (root, apt); where the daemons are missing or do not come
up, `start` raises `SlurmUnavailable` with the reason, and the tests skip with it."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("slurmctld", "slurmd", "sbatch", "scontrol", "squeue")


class SlurmUnavailable(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config(folder: Path, node: str, cpus: int) -> str:
    """One controller and one node (this machine, under the name ``node``), one partition; jobs may be
    requeued; the periodic checks (time limits, --signal) as often as Slurm allows."""
    return f"""\
ClusterName=shardtune-test
SlurmctldHost={socket.gethostname().split(".")[0]}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
AuthInfo=cred_expire=5
CredType=cred/none
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool/%n
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd-%n.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={folder}/jobcomp.log
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
MinJobAge=3600
KillWait=30
SchedulerParameters=sched_interval=1
MpiDefault=none
NodeName={node} NodeHostname={socket.gethostname().split(".")[0]} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=test Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


class LocalSlurm:
    """``with LocalSlurm(folder) as slurm:`` a running controller and node; ``slurm.env`` is the
    environment for sbatch/scontrol (SLURM_CONF); ``slurm.job(id)`` reads `scontrol show job`."""

    def __init__(self, folder: Path, cpus: int | None = None):
        self.folder, self.node = Path(folder), "node0"
        self.cpus = cpus or os.cpu_count() or 1
        self.env = {**os.environ, "SLURM_CONF": str(self.folder / "slurm.conf")}
        self.daemons: list[subprocess.Popen] = []

    def __enter__(self) -> LocalSlurm:
        missing = [name for name in DAEMONS if shutil.which(name) is None]
        if missing:
            raise SlurmUnavailable(
                f"Slurm is not installed here (no {', '.join(missing)}; apt package slurm-wlm)"
            )
        if os.geteuid() != 0:
            raise SlurmUnavailable("slurmd needs root to start jobs")
        for sub in ("state", f"spool/{self.node}"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        (self.folder / "slurm.conf").write_text(config(self.folder, self.node, self.cpus))
        try:
            self._daemon(["slurmctld", "-D", "-i", "-f", str(self.folder / "slurm.conf")])
            self._daemon(["slurmd", "-D", "-N", self.node, "-f", str(self.folder / "slurm.conf")])
            self._wait_for_idle_node()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for daemon in reversed(self.daemons):
            if daemon.poll() is None:
                daemon.send_signal(signal.SIGTERM)
        for daemon in self.daemons:
            try:
                daemon.wait(timeout=20)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()

    def _daemon(self, command: list[str]) -> None:
        # (in the test's process group: a test run killed as a whole takes the daemons with it)
        log = open(self.folder / f"{command[0]}.out", "w")  # noqa: SIM115 (kept open with the daemon)
        self.daemons.append(subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT))

    def _wait_for_idle_node(self, timeout: float = 60) -> None:
        deadline, state = time.monotonic() + timeout, ""
        while time.monotonic() < deadline:
            for daemon in self.daemons:
                if daemon.poll() is not None:
                    raise SlurmUnavailable(f"{daemon.args[0]} exited: {self._tail(daemon.args[0])}")
            done = self.run("sinfo", "-h", "-N", "-o", "%t", check=False)
            state = done.stdout.strip()
            if state.startswith("idle"):
                return
            time.sleep(0.5)
        raise SlurmUnavailable(f"the Slurm node did not come up in {timeout:.0f} s (state {state!r})")

    def _tail(self, name: str) -> str:
        logs = [self.folder / f"{name}.out", self.folder / f"{name}.log"]
        text = "".join(p.read_text(errors="replace") for p in logs if p.exists())
        return " | ".join(text.strip().splitlines()[-5:])

    def run(self, *command: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        done = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=60, **kwargs)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(command)}: {done.stderr.strip()}")
        return done

    def submit(self, *args: str, cwd: Path, env: dict | None = None) -> int:
        done = subprocess.run(
            ["sbatch", "--parsable", *args],
            env={**(env or os.environ), "SLURM_CONF": self.env["SLURM_CONF"]},
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if done.returncode != 0:
            raise AssertionError(f"sbatch {' '.join(args)}: {done.stderr.strip()}")
        return int(done.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job -o`: every Key=Value of the job (Restarts, JobState, ExitCode, ...)."""
        line = self.run("scontrol", "show", "job", "-o", str(job_id)).stdout
        return dict(re.findall(r"(\w+)=(\S*)", line))

    def wait(self, job_id: int, states: set[str], timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job["JobState"] in states:
                return job
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} still {job['JobState']} after {timeout:.0f} s: {job}")
            time.sleep(0.5)

    def completions(self) -> list[dict[str, str]]:
        """The job completion log (jobcomp/filetxt): one record per end of a job, requeues included."""
        log = self.folder / "jobcomp.log"
        lines = log.read_text().splitlines() if log.exists() else []
        return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in lines]
