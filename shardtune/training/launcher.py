"""`shardtune train --nproc N`: N processes on this machine under `accelerate launch`, one launcher
per machine (``--launch-args "--num_machines M --machine_rank R ..."`` for several).

:func:`launch` builds that command and becomes it (``exec``: the `shardtune` process is replaced, so
a signal sent to the command reaches the launcher itself). `python -m shardtune.training.launcher ARGS`
(what it runs) is `accelerate launch ARGS` — torch's elastic agent starting and watching this
machine's processes — with five differences:

* how a failed run ends: each process has already printed its one-line error, so the launcher stays
  quiet and exits with the code of the first process that failed (2 bad input, 3 diverged, 4 a lost
  process, 143 SIGTERM, ...), or with 128 + the signal number when a process was killed;
* SIGTERM (a cluster's pre-emption notice) is handed on to the processes, which finish their step,
  write one checkpoint and exit with 143; the launcher waits for them, however long that takes, and
  exits with 143 too (torch's agent would kill them 30 s later and end in a traceback);
* when a process ends by itself with an error, the others of this machine are given
  :data:`FINISH_GRACE_S` to end by themselves before torch stops them with SIGTERM: they
  usually met the same error a moment later, and the first process of each machine (the one that
  prints its line) must not be cut short because a silent one left first;
* torch's agent keeps its (unused) logs in a directory of the launcher's own, ``shardtune-launch-*``
  in the temporary directory, removed when the launch ends where still empty (torch's own
  ``torchelastic_*`` would be left behind, one per run; a launcher killed outright leaves its own);
  ``--launch-args "--log_dir DIR"`` is the user's and kept;
* a successful run over several machines ends quietly on every machine. torch's exit barrier makes
  every machine's launcher wait for all the others through the store that the launcher of machine 0
  keeps: once the last one checks in, machine 0's launcher leaves and its store closes, while the
  last one may still be asking the store whether everybody has arrived — and prints a C++ traceback
  ("Failed to recv ... Did the remote server shutdown or crash?"). Here (:func:`_exit_barrier`) the
  other launchers only check in, and machine 0's waits until all have: the store outlives every
  launcher that uses it.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from datetime import timedelta

from shardtune.core.errors import BadInput, first_line

# torchelastic's keys of the exit barrier below (its own use another prefix)
FINISHED = "shardtune/launcher/finished"
ALL_FINISHED = "shardtune/launcher/all-finished"
# how long the other processes of a machine may take to end by themselves once one ended with an error
FINISH_GRACE_S = 5.0


def launch_command(
    nproc: int, train_args: list[str], launch_args: str | None, cpu: bool
) -> tuple[list[str], dict[str, str]]:
    """The command (and its environment) that runs `shardtune train TRAIN_ARGS` in NPROC processes on
    this machine, on each of the machines that ``launch_args`` name; the user's flags come last, so
    they win."""
    import torch

    flags = launch_flags(launch_args)
    machines = _machines(flags)
    check_process_count(nproc, cpu or not torch.cuda.is_available())
    env = dict(os.environ)
    command = [sys.executable, "-m", "shardtune.training.launcher", "--num_processes", str(nproc * machines)]
    command += ["--multi_gpu", "--main_process_port", "0", "--num_machines", "1"]
    command += ["--mixed_precision", "no", "--dynamo_backend", "no"]  # the recipe sets precision itself
    if cpu or not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "1"  # gloo; `accelerate launch --cpu` would start one process only
    # torch's C++ side warns on stderr, in blocks of stack frames, about every request that meets a
    # connection its peer closed: when a machine is lost, shardtune names it in one line instead.
    # Its errors still show; TORCH_CPP_LOG_LEVEL=WARNING brings the warnings back.
    env.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    command += flags
    command += ["-m", "shardtune", "train", *train_args]
    return command, env


def launch(nproc: int, train_args: list[str], launch_args: str | None, cpu: bool) -> int:
    """Become the launcher of :func:`launch_command` (on POSIX this does not return); elsewhere run
    it and return its exit code."""
    command, env = launch_command(nproc, train_args, launch_args, cpu)
    sys.stdout.flush()
    sys.stderr.flush()
    if os.name == "posix":
        os.execve(command[0], command, env)
    return subprocess.call(command, env=env)


def check_process_count(nproc: int, cpu: bool) -> None:
    """``--nproc`` that this machine can hold: one process per GPU; on CPUs (gloo) at most
    :data:`PROCESSES_PER_CORE` per core (at least 8: a laptop may test a 4-process run on 2 cores,
    slowly). More would start that many copies of the model (``--nproc 100000`` would start them
    all)."""
    import torch

    if cpu:
        cores = os.cpu_count() or 1
        have, what = max(8, PROCESSES_PER_CORE * cores), f"processes on its {cores} CPU cores"
    else:
        have = torch.cuda.device_count()
        what = f"processes, one per GPU ({have} GPUs)"
    if nproc > have:
        raise BadInput(
            f"--nproc {nproc}: this machine runs at most {have} {what} (--nproc counts the processes "
            "of one machine)"
        )


PROCESSES_PER_CORE = 4


def machine_count(launch_args: str | None) -> int:
    """How many machines ``launch_args`` (the user's ``--launch-args``) spread the run over: with more
    than one, even a single process per machine is launched."""
    return _machines(launch_flags(launch_args))


def launch_flags(launch_args: str | None) -> list[str]:
    """The user's ``--launch-args`` split as a shell splits them; unbalanced quotes: one line."""
    try:
        return shlex.split(launch_args or "")
    except ValueError as e:
        raise BadInput(f"--launch-args: {e} in {launch_args!r}") from None


def _machines(flags: list[str]) -> int:
    """``--num_machines`` of the user's launch flags (1 when absent); a multi-machine launch must
    also say where this machine stands and where they meet."""
    values = _flag_values(flags)
    raw = values.get("--num_machines", "1")
    if not raw.isdigit() or int(raw) < 1:
        raise BadInput(f"--launch-args: --num_machines must be a positive whole number, got {raw!r}")
    machines = int(raw)
    missing = [f for f in ("--machine_rank", "--main_process_ip", "--main_process_port") if f not in values]
    if machines > 1 and missing:
        raise BadInput(
            f"--launch-args: --num_machines {machines} needs {', '.join(missing)} too (the machine's place "
            "0..N-1, and the address and port of machine 0, the same on every machine)"
        )
    # A place or a port that cannot be would have this machine wait for peers that never come.
    rank = values.get("--machine_rank", "0")
    if not rank.isdigit() or int(rank) >= machines:
        raise BadInput(
            f"--launch-args: --machine_rank must be a whole number from 0 to {machines - 1} "
            f"(--num_machines {machines}), got {rank!r}"
        )
    port = values.get("--main_process_port")
    if port is not None and (not port.isdigit() or not 0 < int(port) < 65536):
        raise BadInput(f"--launch-args: --main_process_port must be a port from 1 to 65535, got {port!r}")
    return machines


def _flag_values(flags: list[str]) -> dict[str, str]:
    """``--flag value`` and ``--flag=value`` pairs (the last one of a flag wins, as with argparse)."""
    values = {}
    for i, flag in enumerate(flags):
        if flag.startswith("--") and "=" in flag:
            name, value = flag.split("=", 1)
            values[name] = value
        elif flag.startswith("--") and i + 1 < len(flags):
            values[flag] = flags[i + 1]
    return values


# ---------------------------------------------------------------------------------------------------
# python -m shardtune.training.launcher


def main(argv: list[str]) -> int:
    """`accelerate launch ARGV`, ending in an exit code (module docstring)."""
    from accelerate.commands.launch import launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException

    global _finishing
    _finishing = False
    args = launch_command_parser().parse_args(argv)
    # torch's agent makes a directory for its logs in every launch (``torchelastic_*``, left behind,
    # empty: shardtune redirects nothing); unless the user names one, it is ours, removed at the end
    own_log_dir = args.log_dir is None
    if own_log_dir:
        args.log_dir = tempfile.mkdtemp(prefix="shardtune-launch-")
    # SIGTERM is ours once the processes run (before, it ends the launcher as usual); the agent
    # handles the other signals (it forwards them and stops the processes).
    os.environ["PET_SIGNALS_TO_HANDLE"] = "SIGINT,SIGHUP,SIGQUIT"
    _adapt_the_agent()
    # torch's elastic agent logs each failed process at ERROR, and Ctrl-C as "Received 2 death
    # signal, shutting down workers": the processes say why themselves. Its loggers set their own
    # level (so the parent's is not enough): each one imported by now.
    for name in list(logging.root.manager.loggerDict):
        if name == "torch.distributed.elastic" or name.startswith("torch.distributed.elastic."):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        return _launch_and_read_the_outcome(args)
    except SignalException as e:  # a SIGTERM in the instant between the outcome and `_finishing`
        return 128 + int(e.sigval)
    finally:
        # the processes are gone: a SIGTERM from now on (a scheduler repeats it) changes nothing, and
        # must not turn their exit code into a traceback
        _finishing = True
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if own_log_dir:
            _remove_empty_dirs(args.log_dir)


# Set once the launch has an outcome: from then on a SIGTERM is no longer raised in the launcher (where
# it would land in the middle of its exit, as a traceback), whatever instant it comes in.
_finishing = False


def _launch_and_read_the_outcome(args) -> int:
    from accelerate.commands.launch import launch_command as accelerate_launch
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    global _finishing
    try:
        try:
            accelerate_launch(args)
        except ChildFailedError as e:
            _finishing = True
            rank, failure = e.get_first_failure()
            if failure.exitcode >= 0:
                return failure.exitcode
            return _killed(rank, -failure.exitcode)
        _finishing = True
        return 0
    # SIGINT, SIGHUP, SIGQUIT (or SIGTERM once no process is left: while the failure above is read,
    # too, where it would otherwise end in a traceback): stopped
    except SignalException as e:
        _finishing = True
        return 128 + int(e.sigval)


def _remove_empty_dirs(top: str) -> None:
    """Remove the empty directories of the tree ``top``, deepest first: a file (a log torch wrote,
    anything else) keeps its directory and every one above it."""
    for path, _dirs, _files in os.walk(top, topdown=False):
        try:
            os.rmdir(path)
        except OSError:
            pass


def _killed(rank: int, number: int) -> int:
    try:
        name = signal.Signals(number).name
    except ValueError:
        name = f"signal {number}"
    sys.stderr.write(f"error: process {rank} was killed by {name}\n")
    return 128 + number


def _forward_to_processes(signum, _frame) -> None:
    """SIGTERM to the launcher: hand it to this machine's processes and keep waiting for them (when
    none is left, stop here, unless the launch is already finishing)."""
    if _finishing:
        return
    workers = _workers()
    if not workers:
        from torch.distributed.elastic.multiprocessing.api import SignalException

        raise SignalException(f"Process {os.getpid()} got signal: {signum}", sigval=signal.Signals(signum))
    for pid in workers:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def _workers() -> list[int]:
    """The processes this launcher started: its children that lead their own session (torch's agent
    starts each in a new one). Read from /proc; none where there is no /proc."""
    me, found = os.getpid(), []
    try:
        entries = [e for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return []
    for entry in entries:
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        parent, session = int(fields[1]), int(fields[3])
        if parent == me and session == int(entry):
            found.append(int(entry))
    return found


def _adapt_the_agent() -> None:
    """In torch's elastic agent (of this launcher process only): :func:`_exit_barrier` for its own,
    SIGTERM handed on to the processes from the moment they are started, and a process that ended
    with an error lets the others end by themselves (:func:`_let_the_others_finish`) before torch
    stops them."""
    from torch.distributed.elastic.agent.server.api import SimpleElasticAgent
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
    from torch.distributed.elastic.multiprocessing.api import SubprocessContext

    if getattr(SimpleElasticAgent._exit_barrier, "__name__", "") != "_exit_barrier_of_shardtune":
        torch_barrier = SimpleElasticAgent._exit_barrier

        def _exit_barrier_of_shardtune(agent) -> None:
            _exit_barrier(agent, torch_barrier)

        SimpleElasticAgent._exit_barrier = _exit_barrier_of_shardtune
    if getattr(LocalElasticAgent._start_workers, "__name__", "") != "_start_workers_of_shardtune":
        start_workers = LocalElasticAgent._start_workers

        def _start_workers_of_shardtune(agent, worker_group):
            started = start_workers(agent, worker_group)
            signal.signal(signal.SIGTERM, _forward_to_processes)
            return started

        LocalElasticAgent._start_workers = _start_workers_of_shardtune
    if getattr(SubprocessContext._capture_process_failures, "__name__", "") != "_capture_of_shardtune":
        capture = SubprocessContext._capture_process_failures

        def _capture_of_shardtune(pcontext, done_local_ranks: set[int]) -> None:
            capture(pcontext, done_local_ranks)
            if _let_the_others_finish(pcontext, done_local_ranks, FINISH_GRACE_S):
                first = dict(pcontext._failures)
                capture(pcontext, done_local_ranks)  # those that ended meanwhile
                pcontext._failures.update(first)  # (and the first keep the time they ended at)

        SubprocessContext._capture_process_failures = _capture_of_shardtune


def _let_the_others_finish(pcontext, done_local_ranks: set[int], grace_s: float) -> bool:
    """Once a process ended with an exit code (it said why, or left the saying to the first process
    of its machine), wait until the others have ended too, at most ``grace_s``: they met the same
    error a moment later, or will notice a lost process, and torch closes every process still
    running (SIGTERM) as soon as one failed, which would cut their line short. True if it waited."""
    failures = getattr(pcontext, "_failures", {})
    running = getattr(pcontext, "_running_local_ranks", set()) - done_local_ranks
    if not running or not any(f.exitcode >= 0 for f in failures.values()):
        return False
    deadline = time.monotonic() + grace_s
    handlers = pcontext.subprocess_handlers
    while time.monotonic() < deadline and any(handlers[r].proc.poll() is None for r in running):
        time.sleep(0.02)
    return True


def _exit_barrier(agent, torch_barrier) -> None:
    """Run by each machine's launcher once its processes succeeded (module docstring): every launcher
    checks in; the one that keeps the store (machine 0's, under the static rendezvous that
    `accelerate launch` uses) leaves only when all have, the others at once. With another rendezvous
    (whose store may live elsewhere), torch's own barrier."""
    from torch.distributed.elastic.rendezvous.static_tcp_rendezvous import StaticTCPRendezvous

    group = agent._worker_group
    if not isinstance(group.spec.rdzv_handler, StaticTCPRendezvous):
        torch_barrier(agent)
        return
    store, machines = agent._store, group.group_world_size
    previous = store.timeout
    store.set_timeout(timedelta(seconds=agent._exit_barrier_timeout))
    try:
        if store.add(FINISHED, 1) == machines:
            store.set(ALL_FINISHED, "1")
        if group.group_rank == 0:
            store.wait([ALL_FINISHED])
    except Exception as e:  # the run succeeded; a machine whose launcher vanished afterwards is no error
        first = first_line(e)
        sys.stderr.write(f"warning: not every machine's launcher checked out: {first}\n")
    finally:
        store.set_timeout(previous)


if __name__ == "__main__":
    exit_code = main(sys.argv[1:])
    # The outcome is decided. Python gives SIGTERM back to the system's default while it tears down,
    # so a late copy of a cluster's notice would turn this exit into a kill (-15, and no line said).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(exit_code)
