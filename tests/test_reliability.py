"""Reliability: resume after SIGKILL, SIGTERM, NaN, gradient checkpointing, several processes."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import copy_task, tiny_recipe
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from shardtune.artifacts.checkpoint import check_checkpoint, list_checkpoints
from shardtune.cli import app
from shardtune.core.errors import Diverged
from shardtune.recipe.schema import recipe_from_dict
from shardtune.training.loop import train

ROOT = Path(__file__).parents[1]


def write(tmp_path, name, **sections) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(tmp_path, output={"dir": str(tmp_path / name)}, **sections)))
    return path


def shardtune(*args, **kw):
    return subprocess.Popen(
        [sys.executable, "-m", "shardtune", "train", *map(str, args)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def train_here(recipe: Path) -> None:
    """The one-process reference run, in this process (a second process would only add its start-up:
    the comparisons it serves allow the all-reduce's rounding, far above thread-count effects)."""
    from shardtune.recipe.schema import load_recipe

    train(load_recipe(recipe))


def same_adapter(a: Path, b: Path, atol: float = 1e-6, exact: bool = False) -> None:
    x, y = load_file(a / "adapter.safetensors"), load_file(b / "adapter.safetensors")
    assert x.keys() == y.keys()
    for k in x:
        if exact:
            assert torch.equal(x[k], y[k]), k
        else:
            torch.testing.assert_close(x[k], y[k], atol=atol, rtol=1e-5, msg=k)


LONG = {
    "adapter": {"method": "lora", "rank": 4, "dropout": 0.1},  # dropout: the RNG state must be restored
    "train": {"max_steps": 160, "save_every": 10, "batch_size": 4, "grad_accum": 2},
    "data": {"num_samples": 200},
}


def test_sigkill_then_resume_gives_the_same_adapter(tmp_path):
    reference = write(tmp_path, "ref", **LONG)
    killed = write(tmp_path, "killed", **LONG)
    assert shardtune(reference, "-q").wait(timeout=300) == 0

    proc = shardtune(killed, "-q")
    deadline = time.time() + 120
    while not (tmp_path / "killed" / "checkpoint-30").exists():
        assert proc.poll() is None, "run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "adapter.safetensors").exists()  # it really died mid-run

    resumed = shardtune(killed, "--resume", "-q")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    same_adapter(tmp_path / "ref", tmp_path / "killed", exact=True)  # bit for bit


def test_resume_from_a_named_checkpoint(tmp_path):
    recipe = write(
        tmp_path, "run", adapter={"method": "fossil", "rank": 4}, train={"max_steps": 12, "save_every": 4}
    )
    assert shardtune(recipe, "-q").wait(timeout=300) == 0
    first = load_file(tmp_path / "run" / "adapter.safetensors")
    proc = shardtune(recipe, "--resume-from", tmp_path / "run" / "checkpoint-8", "-q")
    assert proc.wait(timeout=300) == 0
    again = load_file(tmp_path / "run" / "adapter.safetensors")
    for k in first:
        torch.testing.assert_close(first[k], again[k], atol=1e-6, rtol=1e-5)


def test_sigterm_writes_a_checkpoint_and_exits_143(tmp_path):
    recipe = write(tmp_path, "run", **LONG)
    proc = shardtune(recipe)
    deadline = time.time() + 120
    while (
        not (tmp_path / "run" / "metrics.jsonl").exists()
        or not (tmp_path / "run" / "metrics.jsonl").read_text()
    ):
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "stopped by SIGTERM" in err and "--resume" in err and "Traceback" not in err
    lines = err.strip().splitlines()  # the run's summary lines, then one error line that ends it
    assert [line for line in lines if line.startswith("error:")] == lines[-1:]
    assert list((tmp_path / "run").glob("checkpoint-*"))
    assert shardtune(recipe, "--resume", "-q").wait(timeout=300) == 0


def ctrl_c_once(proc: subprocess.Popen, when) -> tuple[int, str]:
    """SIGINT (what Ctrl-C sends) to the command once ``when()`` holds; its exit code and stderr."""
    deadline = time.time() + 120
    while not when():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def sigint_as_a_terminal_leaves_it():  # (a shell running the tests in the background ignores it)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("nproc", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_ctrl_c_exits_130_naming_the_last_checkpoint_and_the_command_that_continues(tmp_path, nproc):
    """Ctrl-C stops at once (no checkpoint written): one line with the step, the last checkpoint and
    the command that continues from it, which does. With --nproc the terminal's SIGINT reaches the
    launcher alone (its processes lead sessions of their own); still one line, no torch talk."""
    recipe = write(tmp_path, "run", **LONG)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = shardtune(recipe, "-q", "--nproc", nproc, env=env, preexec_fn=sigint_as_a_terminal_leaves_it)
    code, err = ctrl_c_once(proc, lambda: (tmp_path / "run" / "checkpoint-20").exists())
    assert code == 130, err
    found = re.fullmatch(
        r"error: interrupted after step (\d+); last checkpoint: (\S+); continue with: shardtune train (\S+) "
        r"--resume" + (" --nproc 2" if nproc > 1 else "") + "\n",
        err,
    )
    assert found, err
    step, checkpoint = int(found.group(1)), Path(found.group(2))
    assert checkpoint == list_checkpoints(tmp_path / "run")[-1] and 20 <= check_checkpoint(checkpoint) <= step
    assert shardtune(found.group(3), "--resume", "--nproc", nproc, "-q", env=env).wait(timeout=300) == 0
    assert (tmp_path / "run" / "adapter.safetensors").exists()


def test_ctrl_c_before_the_first_checkpoint_says_there_is_none(tmp_path):
    recipe = write(tmp_path, "run", **{**LONG, "train": {**LONG["train"], "save_every": 0}})
    proc = shardtune(recipe, "-q", preexec_fn=sigint_as_a_terminal_leaves_it)
    metrics = tmp_path / "run" / "metrics.jsonl"
    code, err = ctrl_c_once(proc, lambda: metrics.exists() and metrics.read_text())
    assert code == 130, err
    assert re.fullmatch(r"error: interrupted after step \d+; last checkpoint: none written yet\n", err), err


def test_nan_loss_stops_with_exit_3_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    recipe = recipe_from_dict(tiny_recipe(tmp_path, train={"max_steps": 12, "save_every": 3}))
    from transformers import LlamaForCausalLM

    real_forward = LlamaForCausalLM.forward
    calls = {"n": 0}

    def poisoned(self, *a, **kw):
        out = real_forward(self, *a, **kw)
        calls["n"] += 1
        if calls["n"] == 5 and out.loss is not None:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(LlamaForCausalLM, "forward", poisoned)
    with pytest.raises(Diverged, match=r"loss became nan at step 5.*checkpoint-3") as err:
        train(recipe)
    assert err.value.exit_code == 3
    ckpt = tmp_path / "run" / "checkpoint-3"
    assert all(torch.isfinite(t).all() for t in load_file(ckpt / "adapter.safetensors").values())


def test_a_replacing_run_that_fails_says_where_the_earlier_run_is_kept(tmp_path, monkeypatch):
    train(recipe_from_dict(tiny_recipe(tmp_path, train={"max_steps": 2})))
    earlier = (tmp_path / "run" / "adapter.safetensors").read_bytes()
    from transformers import LlamaForCausalLM

    real_forward = LlamaForCausalLM.forward

    def poisoned(self, *a, **kw):
        out = real_forward(self, *a, **kw)
        if out.loss is not None:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(LlamaForCausalLM, "forward", poisoned)
    replacing = tiny_recipe(tmp_path, output={"overwrite": True})
    with pytest.raises(Diverged) as err:
        train(recipe_from_dict(replacing))
    (aside,) = tmp_path.glob(".run.replaced-*")
    assert str(err.value).endswith(
        f"; the earlier run in {tmp_path / 'run'} is kept at {aside} until a run there finishes"
    )
    assert (aside / "adapter.safetensors").read_bytes() == earlier
    assert "is kept at" in (tmp_path / "run" / "train.log").read_text()


def test_gradient_checkpointing_gives_the_same_adapter(tmp_path):
    base = {"adapter": {"method": "sharelora", "rank": 4}, "train": {"max_steps": 5}}
    train(recipe_from_dict(tiny_recipe(tmp_path / "a", **base)))
    gc = {**base, "train": {"max_steps": 5, "gradient_checkpointing": True}}
    train(recipe_from_dict(tiny_recipe(tmp_path / "b", **gc)))
    same_adapter(tmp_path / "a" / "run", tmp_path / "b" / "run")


def two_processes(recipe: Path, *args) -> subprocess.CompletedProcess:
    proc = shardtune(recipe, "--nproc", "2", "-q", *args, env={**os.environ, "OMP_NUM_THREADS": "1"})
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.parametrize(
    "method,strategy",
    [
        ("lora", "ddp"),
        ("mos", "ddp"),
        ("sharelora", "ddp"),
        ("mos", "fsdp"),
        ("sharelora", "fsdp"),
        ("lors", "fsdp"),
        ("vblora", "fsdp"),  # the one bank at the root, sharded
        ("vera", "fsdp"),  # frozen projections at the root: buffers, replicated, not sharded
    ],
)
def test_two_processes_equal_one_with_the_same_global_batch(tmp_path, method, strategy):
    """2 gloo processes × batch 4 == 1 process × batch 8, with DDP and with FSDP (shared stores at the root)."""
    from conftest import TINY_OPTIONS

    sections = {
        "adapter": {"method": method, **TINY_OPTIONS[method]},
        "data": {"task": None, "path": str(copy_task(tmp_path)), "eval_samples": 0, "chat_template": False},
        "train": {"max_steps": 6, "batch_size": 8},
    }
    one = write(tmp_path, "one", **sections)
    two = write(
        tmp_path, "two", **{**sections, "train": {"max_steps": 6, "batch_size": 4, "strategy": strategy}}
    )
    train_here(one)
    two_processes(two)
    # all-reduce sums in another order; a wrong global batch or data split differs by ~1e-2
    same_adapter(tmp_path / "one", tmp_path / "two", atol=1e-4)
    log = (tmp_path / "two" / "train.log").read_text()
    assert log.count("adapter written") == 1  # only the main process writes files and logs
    if strategy == "fsdp":
        # every shared store (MoS A/B pools, ShareA's A per type) is sharded by the root unit
        stores = sum(
            k.startswith("shardtune_stores.") for k in load_file(tmp_path / "two" / "adapter.safetensors")
        )
        assert stores == {"mos": 14, "sharelora": 7, "lors": 0, "vblora": 1, "vera": 2}[method]
        sharded = {"vera": 0}.get(method, stores)
        assert (
            f"FSDP over 2 processes: 2 units (LlamaDecoderLayer) + the root, which holds the shared adapter stores ({sharded} tensors)"
            in log
        )
        held = float(re.search(r"each process holds ([\d.]+)% of the parameters", log).group(1))
        assert 49 < held < 52  # each of the 2 processes holds half of every parameter (+ padding)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_mos_with_gradient_checkpointing_on_two_processes_equals_one(tmp_path, strategy):
    """MoS gathers every layer's factors once per step at the model root and keeps them for the blocks
    that gradient checkpointing recomputes in backward: under DDP and FSDP (pools sharded by the root
    unit) too, 2 processes × batch 4 train what 1 process × batch 8 does."""
    from conftest import TINY_OPTIONS

    sections = {
        "adapter": {"method": "mos", **TINY_OPTIONS["mos"]},
        "data": {"task": None, "path": str(copy_task(tmp_path)), "eval_samples": 0, "chat_template": False},
        "train": {"max_steps": 6, "batch_size": 8, "gradient_checkpointing": True},
    }
    one = write(tmp_path, "one", **sections)
    train = {**sections["train"], "batch_size": 4, "strategy": strategy}
    two = write(tmp_path, "two", **{**sections, "train": train})
    train_here(one)
    two_processes(two)
    same_adapter(tmp_path / "one", tmp_path / "two", atol=1e-4)


def test_fsdp_checkpoints_resume_under_fsdp_and_on_one_process(tmp_path):
    """An FSDP checkpoint holds whole tensors: resuming it sharded again, or in one process, ends where
    the uninterrupted FSDP run ended."""
    data = {"task": None, "path": str(copy_task(tmp_path)), "eval_samples": 0, "chat_template": False}
    adapter = {"method": "mos", "rank": 4, "equivalent_rank": 4, "private_rank": 1, "shards_per_vector": 2}
    fsdp = {"max_steps": 8, "batch_size": 4, "save_every": 4, "strategy": "fsdp"}
    two_processes(write(tmp_path, "ref", adapter=adapter, data=data, train=fsdp))
    checkpoint = tmp_path / "ref" / "checkpoint-4"
    assert (
        load_file(checkpoint / "adapter.safetensors").keys()
        == load_file(tmp_path / "ref" / "adapter.safetensors").keys()
    )
    moments = load_file(checkpoint / "optimizer.safetensors")
    pool = load_file(checkpoint / "adapter.safetensors")["shardtune_stores.pools.A_q_proj"]
    assert moments["state.0.exp_avg"].shape == pool.shape  # whole, not a shard

    two_processes(
        write(tmp_path, "again", adapter=adapter, data=data, train=fsdp), "--resume-from", checkpoint
    )
    same_adapter(tmp_path / "ref", tmp_path / "again", atol=1e-6)

    one = {**fsdp, "batch_size": 8, "strategy": "ddp"}
    assert (
        shardtune(
            write(tmp_path, "one", adapter=adapter, data=data, train=one), "-q", "--resume-from", checkpoint
        ).wait(timeout=300)
        == 0
    )
    same_adapter(tmp_path / "ref", tmp_path / "one", atol=1e-4)


def test_fsdp_composes_with_bf16_checkpointing_lors_init_and_scoring(tmp_path):
    """LoRS's gradient init (before sharding), bf16 mixed precision, gradient checkpointing, explicit
    wrap classes, no resharding, and exact-match scoring (generation in lockstep) under FSDP."""
    recipe = write(
        tmp_path,
        "run",
        adapter={"method": "lors", "rank": 4, "alpha": 4, "init": "gradient", "init_samples": 8},
        train={
            "max_steps": 8,
            "batch_size": 4,
            "precision": "bf16",
            "gradient_checkpointing": True,
            "strategy": "fsdp",
            "fsdp": {"wrap": ["LlamaDecoderLayer"], "reshard_after_forward": False},
        },
        eval={"score": True, "score_base": True, "max_new_tokens": 8, "batch_size": 8},
    )
    two_processes(recipe)
    run = tmp_path / "run"
    result = json.loads((run / "result.json").read_text())
    assert result["steps"] == 8 and result["task_score"] is not None and result["task_score_base"] is not None
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]
    log = (run / "train.log").read_text()
    assert "FSDP over 2 processes: 2 units (LlamaDecoderLayer)" in log
    assert "initialised from the dense gradient" in log and "tuned model: exact match" in log
    from shardtune.artifacts.checkpoint import load_adapted_model

    model, _, meta = load_adapted_model(run)  # whole tensors, loadable in one process
    assert meta["trainable_parameters"] == result["trainable_parameters"]


def test_fsdp_on_one_process_trains_unsharded_and_says_so(tmp_path):
    train(recipe_from_dict(tiny_recipe(tmp_path / "a", train={"max_steps": 3})))
    train(recipe_from_dict(tiny_recipe(tmp_path / "b", train={"max_steps": 3, "strategy": "fsdp"})))
    same_adapter(tmp_path / "a" / "run", tmp_path / "b" / "run")
    assert "fsdp with one process: nothing to shard" in (tmp_path / "b" / "run" / "train.log").read_text()


def test_unconnected_processes_are_refused(tmp_path, monkeypatch):
    from shardtune.core.errors import BadInput

    monkeypatch.setenv("WORLD_SIZE", "2")  # but no rendezvous (MASTER_ADDR, RANK, …)
    with pytest.raises(BadInput, match="2 processes were launched but cannot connect: .*MASTER_ADDR"):
        train(recipe_from_dict(tiny_recipe(tmp_path)))


def test_torchrun_on_cpus_trains_like_nproc(tmp_path):
    """torchrun (no Accelerate launcher, no ACCELERATE_USE_CPU) connects its processes over gloo."""
    sections = {
        "adapter": {"method": "lora", "rank": 4},
        "data": {"task": None, "path": str(copy_task(tmp_path)), "eval_samples": 0, "chat_template": False},
        "train": {"max_steps": 4, "batch_size": 4},
    }
    via_nproc = write(tmp_path, "nproc", **sections)
    via_torchrun = write(tmp_path, "torchrun", **sections)
    two_processes(via_nproc)
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        + ["-m", "shardtune", "train", str(via_torchrun), "-q"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**env, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    same_adapter(tmp_path / "nproc", tmp_path / "torchrun", atol=1e-6)


def test_nproc_hands_multi_node_flags_to_accelerate_launch(monkeypatch):
    from shardtune.training import launcher

    execs = []

    def execve(path, command, env):  # the launcher would run in this process's place, and exit
        execs.append((path, command, env))
        raise SystemExit(7)

    monkeypatch.setattr(launcher.os, "execve", execve)
    flags = "--num_machines 2 --machine_rank 1 --main_process_ip 10.0.0.1 --main_process_port 29500"
    with pytest.raises(SystemExit):
        launcher.launch(8, ["r.yaml", "--set", "train.lr=1e-3"], flags, cpu=False)
    path, command, env = execs[0]
    assert path == command[0] == sys.executable
    launch_at = command.index("shardtune.training.launcher")  # accelerate launch, ending in an exit code
    assert command[launch_at + 1 : launch_at + 3] == ["--num_processes", "16"]  # 8 on each of 2 machines
    joined = " ".join(command)
    assert flags in joined and joined.index(flags) > joined.index("--main_process_port 0")  # the user's win
    assert command[-6:] == ["-m", "shardtune", "train", "r.yaml", "--set", "train.lr=1e-3"]


def test_a_failure_in_several_processes_ends_in_one_line_and_its_exit_code(tmp_path):
    """Bad input met by every process: the main one says it once; the launcher adds no traceback."""
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "adapter.json").write_text("{}")
    recipe = write(tmp_path, "again")
    recipe.write_text(recipe.read_text().replace(str(tmp_path / "again"), str(taken)))
    proc = shardtune(recipe, "--nproc", "2", "-q", env={**os.environ, "OMP_NUM_THREADS": "1"})
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: output.dir: {taken} holds files shardtune did not write; choose a new or empty directory"
    ], err
    assert "Traceback" not in err and "ChildFailedError" not in err


SAYS_WHY_LAST = """
import os, sys, time
if os.environ["LOCAL_RANK"] == "0":
    time.sleep(1.5)  # the first process (the one that prints) is slower than the silent one
    sys.stderr.write("error: said by the first process\\n")
    sys.stderr.flush()
os._exit(2)
"""


def test_a_silent_process_that_leaves_first_does_not_cut_the_first_ones_line(tmp_path):
    """Two processes meet the same error; the silent one leaves at once. torch's agent would SIGTERM
    the first one before it has printed (and exit 2 with nothing said); the launcher lets it end."""
    (tmp_path / "worker.py").write_text(SAYS_WHY_LAST)
    done = subprocess.run(
        [sys.executable, "-m", "shardtune.training.launcher", "--num_processes", "2", "--num_machines", "1"]
        + ["--multi_gpu", "--main_process_port", "0", "--mixed_precision", "no", "--dynamo_backend", "no"]
        + [str(tmp_path / "worker.py")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"},
    )
    assert (done.returncode, done.stderr) == (2, "error: said by the first process\n")


def test_sigterm_stays_caught_after_an_error_in_one_of_several_processes():
    """A process of several that leaves the loop with an error is about to print why: a late SIGTERM
    (the launcher's copy, torch's agent stopping the others) must not kill it. Alone, or on success,
    the previous handler comes back."""
    from shardtune.training.loop import StopFlag

    previous = signal.getsignal(signal.SIGTERM)
    try:
        for several, error in [(True, True), (True, False), (False, True)]:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            with contextlib.suppress(RuntimeError), StopFlag(several) as flag:
                if error:
                    raise RuntimeError("met in the loop")
            caught = several and error
            assert (signal.getsignal(signal.SIGTERM) is signal.SIG_DFL) == (not caught)
            if caught:
                os.kill(os.getpid(), signal.SIGTERM)  # handled here: it only sets the flag
                assert flag.raised
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_the_launcher_passes_on_exit_codes_and_names_a_killed_process(monkeypatch, capsys):
    from accelerate.commands import launch as accelerate_launch
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from shardtune.training import launcher

    def fails_with(code):
        def launch_command(args):
            failure = ProcessFailure(local_rank=1, pid=1, exitcode=code, error_file="/nonexistent")
            raise ChildFailedError("shardtune", {1: failure})

        return launch_command

    argv = ["--num_processes", "2", "-m", "shardtune", "train", "r.yaml"]
    monkeypatch.setattr(accelerate_launch, "launch_command", fails_with(3))
    assert launcher.main(argv) == 3 and capsys.readouterr().err == ""  # the process said why itself
    monkeypatch.setattr(accelerate_launch, "launch_command", fails_with(-9))
    assert launcher.main(argv) == 137
    assert capsys.readouterr().err == "error: process 1 was killed by SIGKILL\n"
    monkeypatch.setattr(accelerate_launch, "launch_command", lambda args: None)
    assert launcher.main(argv) == 0

    def late_sigterm(rank, number):  # SIGTERM while the failure is read, no process left to hand it to
        raise SignalException("got signal: 15", sigval=signal.SIGTERM)

    monkeypatch.setattr(accelerate_launch, "launch_command", fails_with(-9))
    monkeypatch.setattr(launcher, "_killed", late_sigterm)
    assert launcher.main(argv) == 143 and capsys.readouterr().err == ""

    def sigterm_while_finishing(top):  # a scheduler's repeated SIGTERM as the launcher cleans up
        launcher._forward_to_processes(signal.SIGTERM, None)

    for outcome, code in ((lambda args: None, 0), (fails_with(143), 143)):
        monkeypatch.setattr(accelerate_launch, "launch_command", outcome)
        monkeypatch.setattr(launcher, "_remove_empty_dirs", sigterm_while_finishing)
        assert launcher.main(argv) == code and capsys.readouterr().err == ""
    monkeypatch.setattr(launcher, "_finishing", False)  # the processes run, and none is left: stopped
    with pytest.raises(SignalException):
        launcher._forward_to_processes(signal.SIGTERM, None)


# ---------------------------------------------------------------------------------------------------
# A resume that is refused: before the run directory is written, in one line naming the key or file


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory) -> Path:
    """A finished 4-step run with checkpoint-1..3 (to copy: each test edits its own)."""
    tmp = tmp_path_factory.mktemp("four")
    train(recipe_from_dict(resume_raw(tmp)))
    return tmp / "run"


def resume_raw(tmp_path: Path, **train_keys) -> dict:
    train_section = {"max_steps": 4, "batch_size": 8, "save_every": 1, "keep_checkpoints": 5, **train_keys}
    return tiny_recipe(
        tmp_path,
        data={"num_samples": 64, "eval_samples": 8, "max_length": 64},
        train=train_section,
        output={"dir": str(tmp_path / "run")},
    )


@pytest.fixture
def copied(tmp_path, four_steps) -> tuple[Path, Path]:
    """(recipe file, run) of a copy of the 4-step run."""
    shutil.copytree(four_steps, tmp_path / "run")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(resume_raw(tmp_path)))
    return recipe, tmp_path / "run"


def files_of(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): p.read_bytes().hex()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def refused_resume(args: list, expected: str) -> str:
    """`shardtune train ARGS` exits 2 with one line holding ``expected``; no traceback."""
    result = CliRunner().invoke(app, ["train", *map(str, args), "-q"])
    err = result.stderr.strip()
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert err.startswith("error: ") and expected in err and len(err.splitlines()) == 1, err
    return err


def edit_state(checkpoint: Path, change) -> None:
    path = checkpoint / "trainer_state.json"
    state = json.loads(path.read_text())
    change(state)
    path.write_text(json.dumps(state))


def shrink_a_moment(checkpoint: Path) -> None:
    tensors = load_file(checkpoint / "optimizer.safetensors")
    key = next(k for k in tensors if k.endswith(".exp_avg"))
    tensors[key] = tensors[key][:1].clone()
    save_file(tensors, checkpoint / "optimizer.safetensors")


BROKEN_STATES = {
    "python_rng null": (
        lambda c: edit_state(c, lambda s: s.update(python_rng=None)),
        "trainer_state.json: key 'python_rng'",
    ),
    "python_rng cut short": (
        lambda c: edit_state(c, lambda s: s["python_rng"].__setitem__(1, [1, 2])),
        "trainer_state.json: key 'python_rng'",
    ),
    "no param groups": (
        lambda c: edit_state(c, lambda s: s.update(param_groups=[])),
        "trainer_state.json: key 'param_groups'",
    ),
    "lr a string": (
        lambda c: edit_state(c, lambda s: s["param_groups"][0].update(lr="x")),
        "trainer_state.json: key 'param_groups[0].lr' must be a finite number",
    ),
    "too few parameters": (
        lambda c: edit_state(c, lambda s: s["param_groups"][0].update(params=[0, 1])),
        "the optimizer state does not fit this adapter",
    ),
    "a moment of another shape": (
        shrink_a_moment,
        "optimizer.safetensors: tensor 'state.0.exp_avg' has shape",
    ),
    "step not the directory's": (
        lambda c: edit_state(c, lambda s: s.update(step=100)),
        "trainer_state.json: key 'step' is 100 but the directory is checkpoint-2",
    ),
    "batch beyond the epoch": (
        lambda c: edit_state(c, lambda s: s.update(batch_in_epoch=999)),
        "trainer_state.json: key 'batch_in_epoch' is 999 but an epoch of this run has 8 batches",
    ),
}


@pytest.mark.parametrize("broken", BROKEN_STATES)
def test_a_resume_refused_for_its_checkpoint_leaves_the_run_as_it_was(copied, broken):
    recipe, run = copied
    breaks, expected = BROKEN_STATES[broken]
    breaks(run / "checkpoint-2")
    before = files_of(run.parent)
    refused_resume([recipe, "--resume-from", run / "checkpoint-2"], expected)
    assert files_of(run.parent) == before  # metrics.jsonl not cut back, recipe.yaml not rewritten


def test_a_resume_with_no_step_left_is_refused(copied):
    recipe, run = copied
    before = files_of(run.parent)
    refused_resume(
        [recipe, "--resume-from", run / "checkpoint-3", "--set", "train.max_steps=2"],
        "train.max_steps: 2 is not past the checkpoint's step 3",
    )
    refused_resume([recipe, "--resume", "--set", "train.max_steps=3"], "train.max_steps: 3 is not past")
    assert files_of(run.parent) == before


def test_a_run_that_logged_no_loss_writes_null_not_nan(tmp_path, monkeypatch):
    from shardtune.training.loop import Trainer

    monkeypatch.setattr(
        Trainer, "log_metrics", lambda self, evaluations: None
    )  # as a run that trains no step
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(resume_raw(tmp_path, max_steps=1, save_every=0)))
    result = CliRunner().invoke(app, ["train", str(recipe), "-q", "--json"])
    assert result.exit_code == 0, result.output

    def no_constant(name):
        raise AssertionError(f"{name} in JSON")

    for text in (result.stdout, (tmp_path / "run" / "result.json").read_text()):
        assert json.loads(text, parse_constant=no_constant)["final_loss"] is None


@pytest.mark.parametrize(
    "override,message",
    [
        ("model.name=tiny-qwen2", "model.name: the checkpoint was trained with 'tiny-llama'"),
        ("model.dtype=bf16", "model.dtype: the checkpoint was trained with 'fp32'"),
        ("data.task=reverse", "data.task: the checkpoint was trained with 'repeat'"),
        ("data.num_samples=32", "data.num_samples: the checkpoint was trained with 64"),
        ("train.seed=1", "train.seed: the checkpoint was trained with 0"),
        ("train.batch_size=4", "train.batch_size: the checkpoint was trained with 8"),
        ("train.grad_accum=2", "train.grad_accum: the checkpoint was trained with 1"),
    ],
)
def test_a_resume_that_would_continue_another_run_is_refused(copied, override, message):
    recipe, run = copied
    before = files_of(run.parent)
    err = refused_resume([recipe, "--resume", "--set", override], message)
    assert "but the recipe says " + override.split("=")[1].strip("'") in err.replace("'", "")
    assert files_of(run.parent) == before


def test_a_resume_may_extend_the_run_and_change_its_schedule(copied):
    recipe, run = copied
    overrides = ["train.max_steps=6", "train.lr=0.001", "train.schedule=constant", "logging.every=1"]
    args = ["train", str(recipe), "-q", "--resume", *[a for o in overrides for a in ("--set", o)]]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads((run / "result.json").read_text())["steps"] == 6


def test_resume_options_are_checked(copied):
    recipe, run = copied
    before = files_of(run.parent)
    refused_resume(
        [recipe, "--resume", "--resume-from", run / "checkpoint-3"], "--resume and --resume-from: give one"
    )
    refused_resume([recipe, "--resume-from", ""], "--resume-from: the value is empty")
    err = refused_resume([recipe, "--resume-from", run], f"--resume-from: {run} is a run directory")
    assert f"its latest checkpoint is {run / 'checkpoint-3'}" in err
    assert files_of(run.parent) == before


def test_resume_from_a_directory_named_latest_is_that_directory(copied, monkeypatch):
    """(``latest`` is what --resume means inside; --resume-from latest names a directory)"""
    recipe, run = copied
    monkeypatch.chdir(run.parent)
    (run.parent / "latest").mkdir()
    refused_resume([recipe, "--resume-from", "latest"], "--resume-from: latest is not a checkpoint directory")


def test_sigterm_outside_the_loop_ends_the_run_within_seconds(tmp_path):
    """SIGTERM during the final evaluation (a long task score): no step to finish, so the run stops at
    once (exit 143, one error line naming the phase and the last checkpoint), writes no adapter from
    a half-done evaluation, and a resume from its checkpoint finishes the run."""
    recipe = write(
        tmp_path,
        "run",
        data={"task": "repeat", "num_samples": 64, "eval_samples": 256, "max_length": 48},
        train={"max_steps": 4, "save_every": 2},
        eval={"score": True, "max_new_tokens": 400, "batch_size": 8},
    )
    proc = shardtune(recipe)
    deadline = time.time() + 120
    seen = []
    for line in proc.stderr:  # "eval loss ..." comes right before the final task score
        seen.append(line)
        if line.startswith("eval loss"):
            break
        assert time.time() < deadline and proc.poll() is None, "".join(seen)
    proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    rest = proc.stderr.read()
    proc.wait(timeout=60)
    assert time.monotonic() - signalled < 5, rest
    assert proc.returncode == 143, rest
    errors = [line for line in rest.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in rest, rest
    assert errors[0].startswith("error: stopped by SIGTERM after the last step"), errors
    assert "last checkpoint: " in errors[0] and "--resume" in errors[0]
    assert not (tmp_path / "run" / "adapter.safetensors").exists()
    resumed = shardtune(recipe, "--resume", "-q", "--set", "eval.max_new_tokens=4")
    assert resumed.wait(timeout=300) == 0
    assert (tmp_path / "run" / "adapter.safetensors").is_file()
