"""docs/cluster.md, run: the Slurm script (on CPUs, gloo processes for GPUs) trains, is stopped by
SIGTERM and resumes exactly; the shell pipelines print what the page says."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).parents[1]
DOC = ROOT / "docs" / "cluster.md"
SCRIPT = ROOT / "examples" / "slurm" / "train-one-node.sbatch"


def blocks(markdown: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", markdown, re.S)


def shell_env(tmp_path: Path, **extra) -> dict:
    bin_dir = str(Path(sys.executable).parent)  # the venv's shardtune
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1", **extra}


def test_the_page_shows_the_script_as_it_is():
    assert SCRIPT.read_text() in blocks(DOC.read_text())


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
def test_the_pipelines_print_what_the_page_says(tmp_path):
    shutil.copytree(ROOT / "recipes", tmp_path / "recipes")
    pipelines, exit_codes = blocks(DOC.read_text())[1:3]
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", pipelines],
        cwd=tmp_path,
        env=shell_env(tmp_path),
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
    done = subprocess.run(
        ["bash", "-c", exit_codes], cwd=tmp_path, env=shell_env(tmp_path), capture_output=True, text=True
    )
    assert done.stdout.strip() == "done", done.stderr
