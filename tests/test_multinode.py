"""Several machines, on loopback: two launchers started as a cluster's nodes start them
(`shardtune train R --nproc 2 --launch-args "--num_machines 2 --machine_rank N --main_process_ip
127.0.0.1 --main_process_port P"`), here both on 127.0.0.1. A successful run ends quietly on every
machine, trains the adapter of one machine or one process, and a machine lost (SIGKILL, or SIGSTOP:
it hangs) or pre-empted (SIGTERM) ends every other one in one line, with a checkpoint to resume from."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import TINY_OPTIONS, copy_task, tiny_recipe
from test_reliability import same_adapter

from shardtune.artifacts.checkpoint import check_checkpoint, list_checkpoints
from shardtune.recipe.schema import recipe_from_dict
from shardtune.training.loop import train

ROOT = Path(__file__).parents[1]

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TIMEOUT_S = 20  # train.timeout_s of these runs: heartbeats every 0.5 s; a dead process is named within ~2 s


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (the launcher's processes lead sessions of their own)."""
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo += children.get(found[-1], [])
    return found


class Machine:
    """One node's `shardtune train --nproc N --launch-args ...` (after its exec: the node's launcher)."""

    def __init__(self, recipe: Path, rank: int, machines: int, port: int, *args, nproc: int = 2):
        flags = f"--num_machines {machines} --machine_rank {rank} --main_process_ip 127.0.0.1 --main_process_port {port}"
        command = [sys.executable, "-m", "shardtune", "train", str(recipe), "--nproc", str(nproc), "-q"]
        self.proc = subprocess.Popen(
            [*command, *map(str, args), "--launch-args", flags],
            cwd=ROOT,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def signal_all(self, sig: int) -> None:
        """As a cluster delivers it (Slurm: every process of the job step), or as a machine dies."""
        for pid in descendants(self.proc.pid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def finish(self, timeout: float = 300) -> tuple[int, str]:
        _, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, err


def keep_signalling(machines: list[Machine], sig: int, every_s: float) -> None:
    """``sig`` to every process of every machine, then again every ``every_s`` until all have ended."""
    while any(machine.proc.poll() is None for machine in machines):
        for machine in machines:
            if machine.proc.poll() is None:
                machine.signal_all(sig)
        time.sleep(every_s)


def start(recipe: Path, *args, machines: int = 2) -> list[Machine]:
    port = free_port()
    return [Machine(recipe, rank, machines, port, *args) for rank in range(machines)]


def quietly_done(machines: list[Machine]) -> None:
    """Every machine exits 0 with nothing on stderr (-q: no progress; no warning, error or traceback)."""
    for rank, machine in enumerate(machines):
        code, err = machine.finish()
        assert (code, err) == (0, ""), f"machine {rank} exited {code}:\n{err[-3000:]}"


def write(tmp_path: Path, name: str, **sections) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(tmp_path, output={"dir": str(tmp_path / name)}, **sections)))
    return path


def one_machine(recipe: Path, *args, nproc: int) -> None:
    """`shardtune train RECIPE --nproc N` to its end, with exit 0, nothing on stderr and nothing left in
    the temporary directory (torch's agent would leave a `torchelastic_*` directory per launch there)."""
    tmp = recipe.parent / f"tmp-{recipe.stem}"
    tmp.mkdir(exist_ok=True)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "shardtune",
            "train",
            str(recipe),
            "--nproc",
            str(nproc),
            "-q",
            *map(str, args),
        ],
        cwd=ROOT,
        env={**ENV, "TMPDIR": str(tmp)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert (done.returncode, done.stderr) == (0, ""), done.stderr[-3000:]
    assert list(tmp.iterdir()) == []


def wait_for(path: Path, machines: list[Machine], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert all(m.proc.poll() is None for m in machines), "the run ended before it could be interrupted"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


# ---------------------------------------------------------------------------------------------------
# The launchers' exit


WORKER = """
import os, time, torch.distributed as dist
dist.init_process_group("gloo")
dist.barrier()
if os.environ["GROUP_RANK"] == "1":
    time.sleep(0.3)  # machine 1's processes finish last: its launcher checks out last
os._exit(0)
"""

SLOW_LAUNCHER = """
import os, sys, time
from torch.distributed.elastic.agent.server.api import SimpleElasticAgent
from shardtune.training import launcher

class Slow:
    # the store as machine 1's launcher sees it on a busy machine: descheduled after each write
    def __init__(self, store):
        self._store = store
    def __getattr__(self, name):
        return getattr(self._store, name)
    def add(self, *args):
        value = self._store.add(*args)
        time.sleep(0.5)
        return value
    def set(self, *args):
        self._store.set(*args)
        time.sleep(0.5)

rendezvous = SimpleElasticAgent._rendezvous
def slow_rendezvous(self, *args, **kwargs):
    result = rendezvous(self, *args, **kwargs)
    if os.environ["MACHINE"] == "1":
        self._store = Slow(self._store)
    return result
SimpleElasticAgent._rendezvous = slow_rendezvous
if os.environ.get("TORCH_EXIT_BARRIER"):
    launcher._exit_barrier = lambda agent, torch_barrier: torch_barrier(agent)  # the control: torch's own
sys.exit(launcher.main(sys.argv[1:]))
"""


def launchers_on_two_machines(tmp_path: Path, **env) -> list[tuple[int, str]]:
    (tmp_path / "worker.py").write_text(WORKER)
    (tmp_path / "launcher.py").write_text(SLOW_LAUNCHER)
    port, procs = free_port(), []
    for rank in range(2):
        flags = f"--num_processes 2 --multi_gpu --num_machines 2 --machine_rank {rank} --main_process_ip 127.0.0.1"
        procs.append(
            subprocess.Popen(
                [sys.executable, str(tmp_path / "launcher.py"), *flags.split()]
                + ["--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no"]
                + [str(tmp_path / "worker.py")],
                cwd=ROOT,
                env={**ENV, "ACCELERATE_USE_CPU": "1", "MACHINE": str(rank), **env},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    return [(p.wait(timeout=120), p.stderr.read()) for p in procs]


def test_the_last_launcher_to_finish_leaves_quietly(tmp_path):
    """Machine 1's launcher checks out last and is slow about it: under torch's exit barrier machine 0's
    launcher leaves at once, its store with it, and machine 1 prints a traceback; under shardtune's,
    machine 0's launcher waits until every launcher has checked out, and neither prints anything."""
    control = launchers_on_two_machines(tmp_path, TORCH_EXIT_BARRIER="1")
    assert "Failed to recv" in control[1][1]  # the race, reproduced (else this test proves nothing)
    assert launchers_on_two_machines(tmp_path) == [(0, ""), (0, "")]


# ---------------------------------------------------------------------------------------------------
# The same adapter on 2 machines × 2 processes, 1 machine × 4 and 1 process


DATA = {"task": None, "eval_samples": 0, "chat_template": False}


@pytest.mark.slow
@pytest.mark.parametrize(
    "method,strategy",
    [
        ("lora", "ddp"),
        ("mos", "ddp"),
        ("sharelora", "ddp"),
        ("lora", "fsdp"),
        ("mos", "fsdp"),
        ("sharelora", "fsdp"),
    ],
)
def test_two_machines_train_what_one_machine_and_one_process_train(tmp_path, method, strategy):
    """2 machines × 2 processes × batch 4 == 1 machine × 4 processes × batch 4 == 1 process × batch 16,
    and both machines end with exit 0 and nothing on stderr."""
    data = {**DATA, "path": str(copy_task(tmp_path))}
    adapter = {"method": method, **TINY_OPTIONS[method]}
    several = {"max_steps": 4, "batch_size": 4, "strategy": strategy, "timeout_s": TIMEOUT_S}
    two = write(tmp_path, "two", adapter=adapter, data=data, train=several)
    quietly_done(start(two))
    one_machine(write(tmp_path, "four", adapter=adapter, data=data, train=several), nproc=4)
    train(
        recipe_from_dict(
            tiny_recipe(
                tmp_path / "one", adapter=adapter, data=data, train={"max_steps": 4, "batch_size": 16}
            )
        )
    )
    same_adapter(tmp_path / "two", tmp_path / "four", atol=1e-6)  # the same 4 processes, met otherwise
    same_adapter(tmp_path / "two", tmp_path / "one" / "run", atol=1e-4)  # all-reduce sums in another order
    log = (tmp_path / "two" / "train.log").read_text()
    assert log.count("adapter written") == 1  # one main process over both machines
    if strategy == "fsdp":
        assert "FSDP over 4 processes" in log and "each process holds 25.0% of the parameters" in log


# ---------------------------------------------------------------------------------------------------
# A machine lost, a machine hung, every machine pre-empted

# FSDP: DDP regroups its gradient buckets after a run's first step, so a resumed DDP run sums some
# gradients across processes in another order than the uninterrupted one (~1e-6 apart); FSDP does not.
LONG = {
    "adapter": {"method": "lora", "rank": 4},
    "train": {"max_steps": 30, "batch_size": 4, "save_every": 2, "timeout_s": TIMEOUT_S, "strategy": "fsdp"},
    "logging": {"every": 2},
}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """The run the interrupted ones must end as: 2 machines × 2 processes, from start to end."""
    tmp_path = tmp_path_factory.mktemp("uninterrupted")
    quietly_done(start(write(tmp_path, "run", data={**DATA, "path": str(copy_task(tmp_path))}, **LONG)))
    return tmp_path / "run"


def interrupted(tmp_path: Path) -> tuple[Path, list[Machine]]:
    """The same run on 2 machines, once it has written checkpoint-4."""
    recipe = write(tmp_path, "run", data={**DATA, "path": str(copy_task(tmp_path))}, **LONG)
    machines = start(recipe)
    wait_for(tmp_path / "run" / "checkpoint-4", machines)
    return recipe, machines


def newest_whole_checkpoint(run: Path) -> Path:
    """The newest checkpoint, read in full as --resume reads it (no half-written file, no adapter yet)."""
    newest = list_checkpoints(run)[-1]
    assert check_checkpoint(newest) == int(newest.name.split("-")[1])
    assert not (run / "adapter.safetensors").exists()
    return newest


@pytest.mark.slow
@pytest.mark.parametrize("lost", [1, 0])
def test_a_lost_machine_stops_the_other_which_names_it_and_the_run_resumes(tmp_path, uninterrupted, lost):
    """SIGKILL to every process of one machine: the other stops within seconds, exit 4, one line naming
    the lost processes (machine 0 lost: its launcher's store with them), the last checkpoint whole.
    Resumed on 2 machines, or on 1 machine with 2 processes × batch 8 (the same global batch), the run
    ends as if never interrupted."""
    recipe, machines = interrupted(tmp_path)
    machines[lost].signal_all(signal.SIGKILL)
    killed = time.monotonic()
    code, err = machines[1 - lost].finish()
    stopped_after = time.monotonic() - killed
    assert code == 4, err
    named = (
        r"processes 2, 3 \(node 1\)"
        if lost
        else r"node 0 \(processes 0, 1: the rendezvous store at 127.0.0.1:\d+, kept by its launcher, is gone\)"
    )
    assert re.fullmatch(
        rf"error: lost {named}: silent for \d+ s; last checkpoint: \S+/checkpoint-\d+; continue with: "
        rf"shardtune train \S+/recipe.yaml --resume --nproc 2 --launch-args '--num_machines 2 "
        rf"--machine_rank {1 - lost} --main_process_ip 127.0.0.1 --main_process_port \d+'\n",
        err,
    ), err
    assert stopped_after < 10, stopped_after  # ~4 heartbeats (2 s) after the collective failed, not T
    assert machines[lost].finish()[0] == -signal.SIGKILL
    newest = newest_whole_checkpoint(tmp_path / "run")
    assert f"last checkpoint: {newest};" in err

    if lost:
        quietly_done(start(recipe, "--resume"))
        same_adapter(uninterrupted, tmp_path / "run", atol=1e-6)
    else:
        one_machine(recipe, "--resume", "--set", "train.batch_size=8", nproc=2)
        same_adapter(uninterrupted, tmp_path / "run", atol=1e-4)


@pytest.mark.slow
def test_every_machine_left_names_the_lost_one(tmp_path):
    """3 machines × 1 process, machine 1 killed: machines 0 and 2 both exit 4 with the one line."""
    one = {**LONG, "train": {**LONG["train"], "strategy": "ddp"}}
    recipe = write(tmp_path, "run", data={**DATA, "path": str(copy_task(tmp_path))}, **one)
    port = free_port()
    machines = [Machine(recipe, rank, 3, port, nproc=1) for rank in range(3)]
    wait_for(tmp_path / "run" / "checkpoint-4", machines)
    machines[1].signal_all(signal.SIGKILL)
    for rank in (0, 2):
        code, err = machines[rank].finish(timeout=60)
        assert code == 4, err
        assert re.fullmatch(
            rf"error: lost process 1 \(node 1\): silent for \d+ s; last checkpoint: .* --machine_rank {rank} .*\n",
            err,
        ), err
    assert machines[1].finish()[0] == -signal.SIGKILL
    newest_whole_checkpoint(tmp_path / "run")


@pytest.mark.slow
def test_a_machine_that_hangs_is_named_after_timeout_s(tmp_path):
    """SIGSTOP to machine 1 (it answers nothing, closes nothing): machine 0 waits train.timeout_s, then
    stops with exit 4 and the one line — not at the collective's later timeout, not earlier."""
    timeout_s = 8
    recipe = write(
        tmp_path,
        "run",
        data={**DATA, "path": str(copy_task(tmp_path))},
        **{**LONG, "train": {**LONG["train"], "max_steps": 400, "timeout_s": timeout_s, "strategy": "ddp"}},
    )
    machines = start(recipe)
    wait_for(tmp_path / "run" / "checkpoint-4", machines)
    machines[1].signal_all(signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        code, err = machines[0].finish(timeout=60)
        waited = time.monotonic() - stopped
    finally:
        machines[1].signal_all(signal.SIGKILL)
        machines[1].finish()
    assert code == 4, err
    assert re.fullmatch(
        r"error: lost processes 2, 3 \(node 1\): silent for [89] s; last checkpoint: .*\n", err
    ), err
    assert timeout_s - 0.5 < waited < timeout_s + 3, waited
    newest_whole_checkpoint(tmp_path / "run")


@pytest.mark.slow
def test_sigterm_to_every_machine_writes_one_checkpoint_and_one_machine_resumes(tmp_path, uninterrupted):
    """Pre-emption: SIGTERM to every process of both machines, and again every 50 ms until they have
    ended (a late copy, torch's agent stopping the others: no process dies before it has said why).
    One checkpoint, at the step every process stopped at; both machines exit 143 with one line
    each; resumed on one machine with 2 processes × batch 8 (the same global batch), the run ends as
    the uninterrupted one."""
    recipe, machines = interrupted(tmp_path)
    repeating = threading.Thread(target=keep_signalling, args=(machines, signal.SIGTERM, 0.05))
    repeating.start()
    ends = [machine.finish() for machine in machines]
    repeating.join()
    steps = set()
    for rank, (code, err) in enumerate(ends):
        assert code == 143, err
        found = re.fullmatch(
            r"error: stopped by SIGTERM at step (\d+); checkpoint written to (\S+); continue with: "
            rf"shardtune train \S+ --resume --nproc 2 --launch-args '--num_machines 2 --machine_rank {rank} .*'\n",
            err,
        )
        assert found, err
        steps.add(int(found.group(1)))
        assert Path(found.group(2)) == tmp_path / "run" / f"checkpoint-{found.group(1)}"
    (step,) = steps  # every process stopped at the same step
    assert newest_whole_checkpoint(tmp_path / "run").name == f"checkpoint-{step}"

    one_machine(recipe, "--resume", "--set", "train.batch_size=8", nproc=2)
    same_adapter(uninterrupted, tmp_path / "run", atol=1e-4)


@pytest.mark.slow
def test_sigterm_to_the_command_alone_reaches_its_processes(tmp_path):
    """`kill PID` of `shardtune train --nproc 2` (Docker, a job script's trap): the launcher hands
    SIGTERM on; the processes write their checkpoint and it exits 143 once they did (DDP)."""
    ddp = {**LONG, "train": {**LONG["train"], "strategy": "ddp"}}
    recipe = write(tmp_path, "run", data={**DATA, "path": str(copy_task(tmp_path))}, **ddp)
    proc = subprocess.Popen(
        [sys.executable, "-m", "shardtune", "train", str(recipe), "--nproc", "2", "-q"],
        cwd=ROOT,
        env=ENV,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not (tmp_path / "run" / "checkpoint-4").exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert re.fullmatch(r"error: stopped by SIGTERM at step \d+; .* --resume --nproc 2\n", err), err
    newest_whole_checkpoint(tmp_path / "run")


# ---------------------------------------------------------------------------------------------------
# Bad input, and the heartbeats alone


@pytest.mark.parametrize(
    "args,message",
    [
        (["--set", "train.timeout_s=0"], "error: train.timeout_s: must be at least 1, got 0"),
        (["--set", "train.timeout_s=soon"], "error: train.timeout_s: must be a number, got 'soon'"),
        (
            ["--nproc", "2", "--launch-args", "--num_machines 2 --machine_rank 1"],
            "error: --launch-args: --num_machines 2 needs --main_process_ip, --main_process_port too",
        ),
        (
            ["--nproc", "2", "--launch-args", "--num_machines=two"],
            "error: --launch-args: --num_machines must be a positive whole number, got 'two'",
        ),
        (  # a place outside the machines: it would wait for ever for peers that never come
            [
                "--launch-args",
                "--num_machines 2 --machine_rank 5 --main_process_ip 127.0.0.1 --main_process_port 29511",
            ],
            "error: --launch-args: --machine_rank must be a whole number from 0 to 1 (--num_machines 2), "
            "got '5'",
        ),
        (
            ["--launch-args", "--num_machines 2 --machine_rank -1 --main_process_ip h --main_process_port 1"],
            "error: --launch-args: --machine_rank must be a whole number from 0 to 1",
        ),
        (
            ["--nproc", "2", "--launch-args", "--machine_rank 1"],
            "error: --launch-args: --machine_rank must be a whole number from 0 to 0 (--num_machines 1)",
        ),
        (
            [
                "--launch-args",
                "--num_machines 2 --machine_rank 1 --main_process_ip h --main_process_port 70000",
            ],
            "error: --launch-args: --main_process_port must be a port from 1 to 65535, got '70000'",
        ),
    ],
)
def test_bad_timeouts_and_machine_flags_are_one_line_and_exit_2(tmp_path, args, message):
    recipe = write(tmp_path, "run")
    done = subprocess.run(
        [sys.executable, "-m", "shardtune", "train", str(recipe), *args],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith(message), done.stderr


def test_nproc_is_per_machine():
    from shardtune.training.launcher import launch_command

    flags = "--num_machines 3 --machine_rank 2 --main_process_ip 10.0.0.1 --main_process_port 29500"
    command, env = launch_command(2, ["r.yaml"], flags, cpu=True)
    at = command.index("--num_processes")
    assert command[at + 1] == "6"  # accelerate launch counts processes over all machines
    assert env["ACCELERATE_USE_CPU"] == "1"


def test_heartbeats_name_a_silent_process_and_only_a_silent_one(monkeypatch):
    """Three processes' watches on one store: while all beat, a failed collective is no loss
    (explain() says nothing); once rank 2 stops, rank 0's watch names it (and its machine)."""
    import torch.distributed as dist

    from shardtune.training.peers import PeerWatch

    port = free_port()
    server = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    watches = [PeerWatch(2.0, rank, 3, 2, ("127.0.0.1", port)) for rank in range(3)]  # 0.25 s beats
    for watch in watches:
        watch._thread.start()
    time.sleep(1.0)
    started = time.monotonic()
    assert watches[1].explain() is None  # waited ~6 heartbeats: everyone beats
    assert time.monotonic() - started >= 1.4
    watches[2].close()
    started = time.monotonic()
    assert watches[0].explain() == "lost process 2 (node 1): silent for 1 s"
    assert time.monotonic() - started < 1.5
    for watch in watches[:2]:
        watch.close()
    del server


def test_the_store_gone_after_a_loss_names_the_lost_process_not_machine_0():
    """3 machines × 1 process, seen from process 2: process 1 went silent, then machine 0 (which named
    it) left and its store with it. Process 1 is named; with no earlier silence, machine 0 is."""
    from shardtune.training.peers import PeerWatch

    watch = PeerWatch(20.0, 2, 3, 1, ("127.0.0.1", 1))  # never started: its state is set by hand
    now = time.monotonic()
    watch._counts = [50, 30, 51]
    watch._changed = [now - 0.2, now - 6.0, now - 0.2]  # process 1 silent for 6 s, 12 heartbeats
    watch._store_lost_since = now - 0.1
    lost = watch._silent(4 * watch.interval)  # asked: a collective failed
    assert lost is not None and lost[0] == [1]
    watch._changed[1] = now - 0.2  # everyone beat until the store went: machine 0 is lost
    assert watch._silent(4 * watch.interval) is None  # not yet: 4 heartbeats without the store
    watch._store_lost_since = now - 2.5
    lost = watch._silent(4 * watch.interval)
    assert lost is not None and lost[0] is None
    assert "node 0 (processes 0: the rendezvous store" in watch.describe(*lost)
