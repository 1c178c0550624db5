"""Which processes of a run over several processes are still there: heartbeats through the store.

The processes of a launch meet in a key-value store (a ``TCPStore`` at ``MASTER_ADDR:MASTER_PORT``;
under ``accelerate launch`` and ``torchrun`` it is kept by the launcher of the first machine, node 0).
:class:`PeerWatch` runs a daemon thread in every process that, every ``interval`` seconds, adds 1
to this process's counter there and reads every process's counter in one request. A process whose
counter stops moving is *lost*: it died, or its machine did, hangs, or was cut off from the network.

How a loss ends the run, bounded by ``train.timeout_s`` (T):

* a process that dies (killed, crashed, its machine rebooted) closes its connections, and the
  collective the others are in fails at once (gloo: "Connection reset by peer"). The training loop
  then asks :meth:`PeerWatch.explain`, which names the processes silent for ``4 × interval``: the
  run stops with :class:`~shardtune.core.errors.ProcessLost` within seconds.
* a machine that vanishes without closing anything (power, network) leaves the others waiting inside
  a collective. Once its processes have been silent for T, the thread stops this process itself:
  one line naming them, exit code 4 (the collective would only end at its own timeout, and under
  NCCL in the watchdog's abort). Collectives time out later, at T + 4 × interval (:func:`collective_timeout`),
  so a lost machine is always named; a process that hangs while still beating (a deadlock) ends there.
* the store itself gone (node 0's launcher died) counts as node 0 lost, after the same delays. So
  that a loss elsewhere is not mistaken for that, machine 0's processes, once they have named the
  lost ones, wait (a few heartbeats at most) until every process left has too (:meth:`PeerWatch._settle`):
  their launcher, and its store, leave only after them.

The thread has its own connection to the store and never touches the training's collectives.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta

from shardtune.core.errors import EXIT_LOST

log = logging.getLogger("shardtune")

PREFIX = "shardtune/heartbeat"


def heartbeat_interval(timeout_s: float) -> float:
    """Seconds between two heartbeats: T/40, at least 0.25 s, at most 5 s (600 s → 5 s)."""
    return min(5.0, max(0.25, timeout_s / 40))


def collective_timeout(timeout_s: float) -> timedelta:
    """The process group's timeout: after a lost machine is named (T), before a hung collective fails."""
    return timedelta(seconds=timeout_s + 4 * heartbeat_interval(timeout_s))


class PeerWatch:
    """Heartbeats of one process and a watch on everyone else's (module docstring).

    ``describe(lost, silent_s)`` turns a verdict — the lost ranks, or ``None`` when the store itself is
    gone — into the one line the user reads (the trainer adds the last checkpoint and how to resume).
    """

    def __init__(self, timeout_s: float, rank: int, world: int, local_world: int, address: tuple[str, int]):
        self.timeout_s, self.rank, self.world, self.local_world = timeout_s, rank, world, local_world
        self.address = address
        self.interval = heartbeat_interval(timeout_s)
        self.describe: Callable[[list[int] | None, float], str] = default_description(self)
        attempt = f"{PREFIX}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        self._keys = [f"{attempt}/{r}" for r in range(world)]
        self._settled_key = f"{attempt}/settled"  # how many processes have named the lost ones
        self._store = self._probe = None
        self._all_beating = False
        now = time.monotonic()
        self._counts: list[int | None] = [None] * world
        self._changed = [now] * world  # when each counter was last seen to move
        self._store_lost_since: float | None = None
        self._asked = threading.Event()  # the training loop's collective failed: who is gone?
        self._answered = threading.Event()
        self._verdict: str | None = None
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="shardtune-heartbeat", daemon=True)

    @classmethod
    def for_launch(cls, timeout_s: float) -> PeerWatch | None:
        """A started watch for this launched process, or None outside a launch with a TCP store."""
        env = os.environ
        try:
            rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
            local_world = int(env.get("LOCAL_WORLD_SIZE", world))
            address = (env["MASTER_ADDR"], int(env["MASTER_PORT"]))
        except (KeyError, ValueError):
            return None
        if world < 2:
            return None
        watch = cls(timeout_s, rank, world, max(1, local_world), address)
        watch._thread.start()
        return watch

    def node_of(self, rank: int) -> int:
        """The machine (``--machine_rank``) of a rank: launchers number ranks machine by machine."""
        return rank // self.local_world

    def close(self) -> None:
        """Stop beating (the run is over, however it ended)."""
        self._closed.set()
        self._thread.join(timeout=self.interval + 1)
        if not self._thread.is_alive():
            self._disconnect()

    def explain(self) -> str | None:
        """After a collective failed: wait a few heartbeats for the processes that went silent and
        return the line naming them; None when every process still beats (the error is not a loss)."""
        self._asked.set()
        self._answered.wait(6 * self.interval)
        return self._verdict

    # --- the thread -------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._closed.is_set():
            self._beat()
            lost = self._silent(4 * self.interval if self._asked.is_set() else self.timeout_s)
            if lost is not None and not self._closed.is_set():
                self._verdict = self.describe(*lost)
                self._settle(lost[0])
                if self._asked.is_set():
                    self._answered.set()  # the training loop stops with it
                    return
                self._stop_this_process()
            self._closed.wait(self.interval)

    def _beat(self) -> None:
        """Add 1 to this process's counter and read everybody's; note when each last moved."""
        try:
            if self._store is None:
                self._connect()
            elif self._host_closed():
                raise ConnectionError("the store's host closed the connection")
            self._store.add(self._keys[self.rank], 1)
            counts = self._read()
        except Exception:  # the store's host is unreachable, whatever the error
            self._disconnect()
            if self._store_lost_since is None:
                self._store_lost_since = time.monotonic()
            return
        self._store_lost_since = None
        now = time.monotonic()
        for r, count in enumerate(counts):
            if count is not None and count != self._counts[r]:
                self._counts[r], self._changed[r] = count, now

    # The store's C++ client logs a warning block on stderr for every request that meets a closed
    # server. A plain socket held open to the same address tells, silently, when the server is gone:
    # the client is used only while it is there, and made again only once a plain connect succeeds.

    def _connect(self) -> None:
        import torch.distributed as dist

        timeout = max(1.0, 2 * self.interval)
        self._probe = socket.create_connection(self.address, timeout=timeout)
        host, port = self.address
        self._store = dist.TCPStore(
            host, port, is_master=False, timeout=timedelta(seconds=timeout), wait_for_workers=False
        )

    def _host_closed(self) -> bool:
        """The server closed the plain connection (it never writes to it: readable means closed)."""
        try:
            readable, _, _ = select.select([self._probe], [], [], 0)
            return bool(readable) and self._probe.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _disconnect(self) -> None:
        if self._probe is not None:
            self._probe.close()
        self._probe = self._store = None

    def _read(self) -> list[int | None]:
        """Every counter in one request once all exist; before that, the ones that do."""
        store = self._store
        if not self._all_beating:
            self._all_beating = store.check(self._keys)
            if not self._all_beating:
                return [int(store.get(k)) if store.check([k]) else None for k in self._keys]
        return [int(v) for v in store.multi_get(self._keys)]

    def _silent(self, threshold: float) -> tuple[list[int] | None, float] | None:
        """The ranks silent for ``threshold`` seconds (None: the store is gone) and for how long."""
        now = time.monotonic()
        silence = [now - changed for changed in self._changed]
        if self._store_lost_since is not None:
            # processes seen beating, then silent for 4 heartbeats while the store still answered, were
            # lost before it: they are named (machine 0's processes wait for that, see _settle), not
            # machine 0
            gone = self._store_lost_since
            before = [
                r
                for r in range(self.world)
                if r != self.rank
                and self._counts[r] is not None
                and gone - self._changed[r] >= 4 * self.interval
            ]
            if before and max(silence[r] for r in before) >= threshold:
                return before, max(silence[r] for r in before)
            return (None, now - gone) if now - gone >= threshold else None
        if not any(silence[r] >= threshold for r in range(self.world) if r != self.rank):
            return None
        # the others lost with it fell silent at about the same moment, up to one heartbeat later
        lost = [r for r in range(self.world) if r != self.rank and silence[r] >= threshold - self.interval]
        return lost, max(silence[r] for r in lost)

    def _settle(self, lost: list[int] | None) -> None:
        """This process has named the lost ones: say so in the store. On machine 0, whose launcher keeps
        the store, also wait (8 heartbeats at most) until every process left has done the same: were the
        store to close first (machine 0's processes exit, then its launcher), a process still making up
        its mind would find the store gone and blame machine 0."""
        if lost is None or self._store is None:
            return
        try:
            self._store.add(self._settled_key, 1)
            if self.node_of(self.rank) != 0:
                return
            deadline = time.monotonic() + 8 * self.interval
            while self._store.add(self._settled_key, 0) < self.world - len(lost):
                if time.monotonic() > deadline:
                    return
                self._store.add(self._keys[self.rank], 1)  # still here: not to be named in turn
                time.sleep(self.interval / 2)
        except Exception:  # the store went away meanwhile: nothing left to wait for
            return

    def _stop_this_process(self) -> None:
        """The training loop is stuck in a collective with the lost processes: end this process here,
        with the line (said by the first process of each machine) and exit code 4."""
        message = self._verdict or "lost a process of the run"
        log.error("error: %s", message)
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            sys.stderr.write(f"error: {message}\n")
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        logging.shutdown()
        os._exit(EXIT_LOST)


def default_description(watch: PeerWatch) -> Callable[[list[int] | None, float], str]:
    """``describe`` before the trainer sets its own: who is lost, and for how long."""

    def describe(lost: list[int] | None, silent_s: float) -> str:
        return f"lost {who(watch, lost)}: silent for {silent_s:.0f} s"

    return describe


def who(watch: PeerWatch, lost: list[int] | None) -> str:
    """``process 2 (node 1)``, ``processes 2, 3 (node 1)``, or the store and the node that keeps it."""
    if lost is None:
        host, port = watch.address
        first = ", ".join(str(r) for r in range(watch.local_world))
        return f"node 0 (processes {first}: the rendezvous store at {host}:{port}, kept by its launcher, is gone)"
    nodes = sorted({watch.node_of(r) for r in lost})
    ranks = ", ".join(map(str, lost))
    where = ("node " if len(nodes) == 1 else "nodes ") + ", ".join(map(str, nodes))
    return f"{'process' if len(lost) == 1 else 'processes'} {ranks} ({where})"
