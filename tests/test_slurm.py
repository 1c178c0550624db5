"""The shipped one-node sbatch script on a real Slurm (Debian's slurmctld + slurmd on 127.0.0.1, set up
by tests/slurm_cluster.py; skipped with the reason where Slurm cannot start): at its time limit the job
writes a checkpoint and requeues itself, pre-empted (`scontrol requeue`) Slurm requeues it; either way
it resumes from the checkpoint and ends COMPLETED with the adapter of an uninterrupted run, bit for bit.

The script is submitted as a user would, with this machine's sizes on the command line (no GPUs, two
CPUs, processes on the CPU instead of GPUs) and a one-minute time limit whose warning comes 40 s before
the end (or earlier: Slurm checks its timers every 30 s and may warn up to a minute early)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from slurm_cluster import LocalSlurm, SlurmUnavailable

ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / "examples" / "slurm" / "train-one-node.sbatch"
MULTI_NODE = ROOT / "examples" / "slurm" / "train-multi-node.sbatch"
VENV = Path(sys.executable).parents[1]
THIS_MACHINE = ("--gres=none", "--cpus-per-task=2", "--mem=0")


@dataclass
class Run:
    """A recipe, how many processes train it, and the adapter it ends with when never stopped."""

    recipe: Path
    nproc: int
    uninterrupted: dict[str, torch.Tensor] | None = None


def a_recipe(folder: Path, steps: int, log_every: int) -> Path:
    data = yaml.safe_load((ROOT / "recipes" / "tiny.yaml").read_text())
    data["train"].update({"max_steps": steps, "batch_size": 4, "save_every": 100_000, "keep_checkpoints": 2})
    data["logging"]["every"] = log_every
    (folder / "r.yaml").write_text(yaml.safe_dump(data))
    return folder / "r.yaml"


def uninterrupted(run: Run, folder: Path) -> subprocess.Popen:
    """The same script, outside Slurm, never stopped (its adapter: :func:`finish_uninterrupted`)."""
    return subprocess.Popen(
        ["bash", str(SCRIPT)],
        env=job_env(run.recipe, folder / "uninterrupted", run.nproc),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish_uninterrupted(run: Run, process: subprocess.Popen, folder: Path) -> Run:
    _, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    run.uninterrupted = load_file(folder / "uninterrupted" / "adapter.safetensors")
    return run


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    try:
        with LocalSlurm(tmp_path_factory.mktemp("slurm")) as cluster:
            yield cluster
    except SlurmUnavailable as reason:
        pytest.skip(str(reason))


@pytest.fixture(scope="module")
def time_limited(slurm, tmp_path_factory) -> dict[str, tuple]:
    """Both scripts submitted at once with a one-minute time limit on a run longer than that: one
    process each (as on one GPU), 8,000 steps (at most about 140 steps/s here, and the warning of a
    one-minute job comes at most about 50 s after its start: no start can finish them). The
    uninterrupted run trains meanwhile. {script name: (job, its log, its folder, the run)}."""
    folder = tmp_path_factory.mktemp("long")
    run = Run(a_recipe(folder, steps=8000, log_every=500), nproc=1)
    jobs = {}
    for script in (SCRIPT, MULTI_NODE):
        where = folder / script.stem
        where.mkdir()
        job, log = submit(slurm, run, where, "--time=1", "--signal=B:USR1@40", "--nodes=1", script=script)
        jobs[script.stem] = (job, log, where, run)
    finish_uninterrupted(run, uninterrupted(run, folder), folder)
    return jobs


@pytest.fixture(scope="module")
def short_run(slurm, tmp_path_factory) -> Run:
    """Two processes (the launcher hands the SIGTERM on), a few seconds of steps."""
    folder = tmp_path_factory.mktemp("short")
    run = Run(a_recipe(folder, steps=600, log_every=50), nproc=2)
    return finish_uninterrupted(run, uninterrupted(run, folder), folder)


def job_env(recipe: Path, run: Path, nproc: int) -> dict[str, str]:
    return {
        **os.environ,
        "RECIPE": str(recipe),
        "RUN": str(run),
        "NPROC": str(nproc),
        "VENV": str(VENV),
        "OMP_NUM_THREADS": "1",
    }


def submit(
    slurm: LocalSlurm, run: Run, folder: Path, *options: str, script: Path = SCRIPT
) -> tuple[int, Path]:
    job = slurm.submit(
        f"--output={folder}/slurm-%j.log",
        *THIS_MACHINE,
        *options,
        str(script),
        cwd=folder,
        env=job_env(run.recipe, folder / "run", run.nproc),
    )
    return job, folder / f"slurm-{job}.log"


def assert_same_adapter(run: Path, uninterrupted: dict[str, torch.Tensor]) -> None:
    resumed = load_file(run / "adapter.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    for key, value in uninterrupted.items():
        assert torch.equal(resumed[key], value), key


@pytest.mark.slow
@pytest.mark.parametrize("script", [SCRIPT.stem, MULTI_NODE.stem], ids=["one-node", "multi-node-on-one"])
def test_at_its_time_limit_the_job_checkpoints_requeues_itself_and_resumes(slurm, time_limited, script):
    """The multi-node script runs here on one node (`--nodes=1`: one srun task, one machine of the
    rendezvous): its warning stops the job step with `scancel --signal=TERM`, not srun."""
    job, log, folder, run = time_limited[script]
    final = slurm.wait(job, {"COMPLETED", "FAILED", "TIMEOUT", "CANCELLED", "NODE_FAIL"}, timeout=400)
    text = log.read_text()
    assert final["JobState"] == "COMPLETED" and final["ExitCode"] == "0:0", text[-3000:]
    restarts = int(final["Restarts"])
    assert restarts >= 1, f"the job finished before its time limit: {text[-2000:]}"
    # every start before the last ended at the warning, most with a checkpoint that the next start
    # resumed from (a warning that comes before training has begun stops a job with nothing to save)
    stops = re.findall(r"error: stopped by SIGTERM at step (\d+); checkpoint written to (\S+);", text)
    resumes = re.findall(r"resumed from (\S+) at step (\d+)", text)
    assert 1 <= len(stops) <= restarts, text[-3000:]
    assert resumes == [(path, step) for step, path in stops]  # each resumes where the last stopped
    assert "DUE TO TIME LIMIT" not in text  # requeued before Slurm's own kill
    ends = [record["JobState"] for record in slurm.completions() if record["JobId"] == str(job)]
    assert ends == ["PENDING"] * restarts + ["COMPLETED"]  # jobcomp: each requeue, then the end
    assert_same_adapter(folder / "run", run.uninterrupted)


@pytest.mark.slow
def test_a_preempted_job_checkpoints_is_requeued_by_slurm_and_resumes(slurm, short_run, tmp_path):
    job, log = submit(slurm, short_run, tmp_path, "--time=30")
    metrics, deadline = tmp_path / "run" / "metrics.jsonl", time.monotonic() + 300
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):  # trained 100 steps
        assert slurm.job(job)["JobState"] in {"PENDING", "RUNNING"} and time.monotonic() < deadline
        time.sleep(0.2)
    slurm.run("scontrol", "requeue", str(job))  # as a pre-emption with PreemptMode=REQUEUE does
    final = slurm.wait(job, {"COMPLETED", "FAILED", "TIMEOUT", "CANCELLED", "NODE_FAIL"}, timeout=300)
    text = log.read_text()
    assert final["JobState"] == "COMPLETED" and final["Restarts"] == "1", text[-3000:]
    assert "DUE TO JOB REQUEUE" in text
    (stop,) = re.findall(r"error: stopped by SIGTERM at step (\d+); checkpoint written to (\S+);", text)
    assert re.findall(r"resumed from (\S+) at step (\d+)", text) == [(stop[1], stop[0])]
    assert_same_adapter(tmp_path / "run", short_run.uninterrupted)
