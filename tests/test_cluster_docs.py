"""docs/cluster.md, run: the Slurm scripts (on CPUs, gloo processes for GPUs; several nodes through a
stand-in `srun` on 127.0.0.1) train, are stopped by SIGTERM with one checkpoint and exit 143, and
resume; the shell pipelines print what the page says."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).parents[1]
DOC = ROOT / "docs" / "cluster.md"
SCRIPT = ROOT / "examples" / "slurm" / "train-one-node.sbatch"
MULTI_NODE = ROOT / "examples" / "slurm" / "train-multi-node.sbatch"


def blocks(markdown: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", markdown, re.S)


def shell_env(tmp_path: Path, **extra) -> dict:
    bin_dir = str(Path(sys.executable).parent)  # the venv's shardtune
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1", **extra}


def block_with(text: str) -> str:
    (found,) = [block for block in blocks(DOC.read_text()) if text in block]
    return found


def test_the_page_shows_the_scripts_as_they_are():
    assert SCRIPT.read_text() in blocks(DOC.read_text())
    assert MULTI_NODE.read_text() in blocks(DOC.read_text())


def tiny(tmp_path: Path, **train) -> Path:
    recipe = yaml.safe_load((ROOT / "recipes" / "tiny.yaml").read_text())
    recipe["train"].update(train)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    return tmp_path / "r.yaml"


def python_processes(pid: int) -> list[int]:
    """The Python processes at or below ``pid`` (shardtune's launchers and training processes), as a
    cluster's signal reaches every process of a job step (the shells around them are left alone)."""
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError):
            continue
        children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo += children.get(found[-1], [])
    pythons = []
    for p in found:
        try:
            first = Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")[0].decode()
        except OSError:
            continue
        if Path(first).name.startswith("python"):
            pythons.append(p)
    return pythons


def started(job: subprocess.Popen, run: Path, timeout: float = 180) -> None:
    """Wait until the job trains (its first metrics line is written)."""
    metrics, deadline = run / "metrics.jsonl", time.monotonic() + timeout
    while not (metrics.exists() and metrics.read_text()):
        assert job.poll() is None, job.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)


def error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr[-3000:]
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.mark.slow
def test_the_slurm_script_trains_and_a_requeued_job_resumes(tmp_path):
    recipe = yaml.safe_load((ROOT / "recipes" / "tiny.yaml").read_text())
    recipe["train"].update({"max_steps": 8, "batch_size": 4, "save_every": 4, "keep_checkpoints": 5})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    env = shell_env(
        tmp_path, RECIPE=str(tmp_path / "r.yaml"), SLURM_GPUS_ON_NODE="2", RUN=str(tmp_path / "run")
    )
    job = subprocess.run(["bash", str(SCRIPT)], env=env, cwd=ROOT, capture_output=True, text=True)
    assert job.returncode == 0, job.stderr
    assert json.loads(job.stdout)["steps"] == 8 and (tmp_path / "run" / "checkpoint-4").is_dir()
    first = load_file(tmp_path / "run" / "adapter.safetensors")
    requeued = subprocess.run(["bash", str(SCRIPT)], env=env, cwd=ROOT, capture_output=True, text=True)
    assert requeued.returncode == 0, requeued.stderr
    assert "resumed from" in requeued.stderr  # the checkpoint branch of the script, from the run's recipe
    again = load_file(tmp_path / "run" / "adapter.safetensors")
    for key in first:
        torch.testing.assert_close(again[key], first[key], atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("jq") is None, reason="the pipelines use jq")
def test_the_pipelines_print_what_the_page_says(tmp_path, preimported):
    shutil.copytree(ROOT / "recipes", tmp_path / "recipes")
    pipelines, exit_codes = block_with("jq -r .run_dir"), block_with("case $status")
    env = preimported.env(shell_env(tmp_path))
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", pipelines],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "runs/tiny"
    assert float(lines[1]) > 0
    assert any(line.startswith("lora ") for line in lines) and "fossil" in lines
    assert "tiny-llama" in lines
    sweep = json.loads("".join(lines[lines.index("[") :]))
    assert [row["trainable"] for row in sweep] == sorted(row["trainable"] for row in sweep) and len(
        sweep
    ) == 3
    done = subprocess.run(["bash", "-c", exit_codes], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.stdout.strip() == "done", done.stderr


@pytest.mark.slow
def test_sigterm_to_the_slurm_script_writes_one_checkpoint_and_exits_143(tmp_path):
    """`--signal=B:TERM@120`: SIGTERM to the batch shell, which is `shardtune train --nproc 2` (exec),
    then the launcher (exec). One checkpoint, at the step named, exit 143, one error line, no traceback
    (the requeued job's resume: the test above, and the multi-node one below)."""
    recipe = tiny(tmp_path, max_steps=400, batch_size=4, save_every=1000, keep_checkpoints=5)
    env = shell_env(tmp_path, RECIPE=str(recipe), SLURM_GPUS_ON_NODE="2", RUN=str(tmp_path / "run"))
    job = subprocess.Popen(
        ["bash", str(SCRIPT)], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    started(job, tmp_path / "run")
    job.send_signal(signal.SIGTERM)  # the batch shell's pid
    out, err = job.communicate(timeout=180)
    assert job.returncode == 143, err[-3000:]
    (line,) = error_lines(err)
    found = re.fullmatch(
        r"error: stopped by SIGTERM at step (\d+); checkpoint written to (\S+); continue with: "
        r"shardtune train \S+/recipe.yaml --resume --nproc 2",
        line,
    )
    assert found, line
    assert [p.name for p in (tmp_path / "run").glob("checkpoint-*")] == [f"checkpoint-{found.group(1)}"]
    assert Path(found.group(2)) == tmp_path / "run" / f"checkpoint-{found.group(1)}"
    assert out == ""  # no result: the run did not finish


FAKE_SRUN = """#!/bin/bash
# srun's stand-in: the job step's tasks, one per node, all on this machine (SLURM_NODEID 0..N-1)
pids=()
for ((node = 0; node < SLURM_JOB_NUM_NODES; node++)); do
  SLURM_NODEID=$node "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""


@pytest.mark.slow
def test_the_multi_node_slurm_script_is_preempted_on_every_node_and_resumes(tmp_path):
    """The multi-node script, 2 nodes × 1 process on 127.0.0.1: SIGTERM to every process of the step
    (`--signal=TERM@120`, or a pre-emption): one checkpoint, every node exits 143 with one line; the
    requeued job resumes from it on both nodes and finishes, quietly."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "srun").chmod(0o755)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    recipe = tiny(tmp_path, max_steps=24, batch_size=4, save_every=1000, keep_checkpoints=5)
    env = shell_env(
        tmp_path,
        RECIPE=str(recipe),
        RUN=str(tmp_path / "run"),
        SLURM_GPUS_ON_NODE="1",
        SLURM_JOB_NUM_NODES="2",
        MAIN_ADDR="127.0.0.1",
        MAIN_PORT=str(port),
    )
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    job = subprocess.Popen(
        ["bash", str(MULTI_NODE)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    started(job, tmp_path / "run")
    for pid in python_processes(job.pid):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    out, err = job.communicate(timeout=180)
    assert job.returncode == 143, err[-3000:]
    lines = error_lines(err)
    assert len(lines) == 2 and all(line.startswith("error: stopped by SIGTERM at step") for line in lines), (
        err
    )
    assert {re.search(r"--machine_rank (\d)", line).group(1) for line in lines} == {"0", "1"}
    assert len(list((tmp_path / "run").glob("checkpoint-*"))) == 1 and out == ""

    requeued = subprocess.run(
        ["bash", str(MULTI_NODE)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    assert error_lines(requeued.stderr) == [] and "resumed from" in requeued.stderr
    assert json.loads(requeued.stdout)["steps"] == 24  # one summary, from the main process
