"""tests/zygote.py, the pre-imported `shardtune` of the documented-command tests: a command run
through it is the command (output, exit code, files, signals), it really is served pre-imported, and
what it cannot serve runs as a fresh process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]


def shell(env: dict, script: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], env=env, cwd=cwd, capture_output=True, text=True
    )


def base_env() -> dict:
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "OMP_NUM_THREADS": "1",
    }


def test_a_served_command_is_the_command(tmp_path, preimported):
    env = preimported.env(base_env())
    train = "shardtune train recipes/tiny.yaml -q --json --set train.max_steps=2 --set output.dir={}"
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    served = shell(env, train.format("served"), tmp_path)
    real = shell(base_env(), train.format("real"), tmp_path)
    assert served.returncode == real.returncode == 0, served.stderr
    assert json.loads(served.stdout)["final_loss"] == json.loads(real.stdout)["final_loss"]
    assert (tmp_path / "served" / "adapter.safetensors").read_bytes() == (
        tmp_path / "real" / "adapter.safetensors"
    ).read_bytes()
    bad = shell(env, "shardtune train missing.yaml", tmp_path)
    assert (bad.returncode, bad.stdout, bad.stderr) == (
        2,
        "",
        shell(base_env(), "shardtune train missing.yaml", tmp_path).stderr,
    )
    closed = shell(env, "shardtune methods | head -1", tmp_path)
    assert closed.returncode == 0 and closed.stderr == "" and closed.stdout.startswith("lora")
    log = preimported.log(env)
    assert log.count("served ['train'") == 2 and "served ['methods']" in log and "refused" not in log


def test_signals_reach_the_command_and_a_killed_client_kills_it(tmp_path, preimported):
    env = preimported.env(base_env())
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    long = ["shardtune", "train", "recipes/tiny.yaml", "-q", "--set", "train.max_steps=100000"]

    def started(out: str) -> subprocess.Popen:
        client = subprocess.Popen(
            [*long, "--set", f"output.dir={out}"], env=env, cwd=tmp_path, stderr=subprocess.PIPE, text=True
        )
        deadline = time.monotonic() + 60
        metrics = tmp_path / out / "metrics.jsonl"  # (a step's line: training has begun)
        while not (metrics.exists() and metrics.stat().st_size) and time.monotonic() < deadline:
            time.sleep(0.1)
        return client

    stopped = started("stopped")
    stopped.send_signal(signal.SIGTERM)  # to the client: the command checkpoints and exits 143
    assert stopped.wait(60) == 143
    said = stopped.stderr.read()
    assert "stopped by SIGTERM" in said and list((tmp_path / "stopped").glob("checkpoint-*")), said

    killed = started("killed")
    killed.kill()
    killed.wait()
    log = preimported.log(env)
    pid = int(log.strip().splitlines()[-1].rsplit(" ", 1)[1])
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{pid}").exists(), "the command outlived its killed client"


def test_another_environment_runs_a_fresh_process(tmp_path, preimported):
    env = preimported.env(base_env())
    done = shell(
        env,
        "HF_HUB_OFFLINE=1 shardtune methods | head -1; SHARDTUNE_X=1 shardtune tasks > /dev/null",
        tmp_path,
    )
    assert done.returncode == 0 and done.stdout.startswith("lora"), done.stderr
    log = preimported.log(env)
    assert "refused ['methods']" in log or os.environ.get("HF_HUB_OFFLINE") == "1"
    assert "refused ['tasks']: environment differs in ['SHARDTUNE_X']" in log
