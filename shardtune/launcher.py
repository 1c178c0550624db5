"""`python -m shardtune.launcher ARGS` is `accelerate launch ARGS` for `shardtune train --nproc N`.

The difference is how a failed run ends. Plain `accelerate launch` answers a failed process with the
launcher's own traceback and exit code 1; here each process has already printed its one-line error, so
the launcher stays quiet and exits with the code of the first process that failed (2 for bad input,
3 for a diverged run, ...), or with 128 + the signal number when a process was killed.
"""

from __future__ import annotations

import logging
import signal
import sys


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
