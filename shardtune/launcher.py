"""`shardtune train --nproc N`: re-run the command under `accelerate launch` with N processes.

:func:`launch` builds that command; `python -m shardtune.launcher ARGS` (what it runs) is
`accelerate launch ARGS`.

The difference is how a failed run ends. Plain `accelerate launch` answers a failed process with the
launcher's own traceback and exit code 1; here each process has already printed its one-line error, so
the launcher stays quiet and exits with the code of the first process that failed (2 for bad input,
3 for a diverged run, ...), or with 128 + the signal number when a process was killed.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import subprocess
import sys


def launch(nproc: int, train_args: list[str], launch_args: str | None, cpu: bool) -> int:
    """Re-run `shardtune train TRAIN_ARGS` under `accelerate launch` (through :func:`main`, which
    turns a failed process into its exit code instead of a traceback) with NPROC processes; the
    user's ``launch_args`` come last, so they win. Returns the exit code."""
    import torch

    env = dict(os.environ)
    command = [sys.executable, "-m", "shardtune.launcher", "--num_processes", str(nproc)]
    command += ["--multi_gpu", "--main_process_port", "0", "--num_machines", "1"]
    command += ["--mixed_precision", "no", "--dynamo_backend", "no"]  # the recipe sets precision itself
    if cpu or not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "1"  # gloo; `accelerate launch --cpu` would start one process only
    command += shlex.split(launch_args or "")
    command += ["-m", "shardtune", "train", *train_args]
    return subprocess.call(command, env=env)


def main(argv: list[str]) -> int:
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args(argv)
    # torch's elastic agent logs each failed process at ERROR; the processes said why themselves.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        launch_command(args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        if failure.exitcode >= 0:
            return failure.exitcode
        number = -failure.exitcode
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        sys.stderr.write(f"error: process {rank} was killed by {name}\n")
        return 128 + number
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
