"""A pre-imported ``shardtune`` for tests that run documented shell commands.

Every ``shardtune`` process spends ~4.5 s of CPU importing torch and transformers before it does any
work; a docs page runs dozens of them. Here the ``shardtune`` on the shell's PATH is a small client
(no third-party import) that hands its arguments, working directory, environment and standard
streams (the file descriptors themselves) to a server that has imported everything once. The server
forks a child that becomes the command: a process of its own with the client's streams, directory
and environment, which runs the installed entry point (``shardtune.cli.main``) and exits as the
command would. The client relays the signals it gets (TERM, INT, HUP, QUIT, USR1, USR2) to that child,
ends with the child's exit code (or dies by the same signal), and if the client is killed, the child is
killed too.

What it cannot change: a server serves the one environment it was started with (modules read some
variables when imported: ``HF_HUB_OFFLINE``, ``HF_ENDPOINT``, …). A command whose environment differs,
apart from what the shell itself sets (``_``, ``SHLVL``, ``PWD``, ``OLDPWD``), runs the real entry point as
a fresh process instead; so does every command when no server answers. The tests where a process's
own start, its parent or its process group is the point run real processes, not this.
``SHARDTUNE_TEST_ZYGOTE=0`` in the test's environment turns it off.
"""

from __future__ import annotations

import array
import hashlib
import json
import os
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VOLATILE = {"_", "SHLVL", "PWD", "OLDPWD"}  # set by the shell for each command
SOCKET_VAR = "SHARDTUNE_TEST_ZYGOTE"
RELAYED = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2")

CLIENT = """#!{python} -S
# shardtune, run by the pre-imported server of tests/zygote.py (or as itself when none answers)
import array, json, os, signal, socket, struct, sys
REAL = {real!r}
def run_real():
    os.execv(REAL, [REAL, *sys.argv[1:]])
try:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.connect(os.environ[{var!r}])
except (OSError, KeyError):
    run_real()
fds = []
for fd in (0, 1, 2):
    try:
        os.fstat(fd)
        fds.append(fd)
    except OSError:
        fds.append(os.open(os.devnull, os.O_RDWR))
request = json.dumps({{"argv": sys.argv[1:], "cwd": os.getcwd(), "env": dict(os.environ)}}).encode()
try:
    server.sendmsg([struct.pack("!I", len(request)) + request],
                   [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    started = server.recv(1) == b"S"
except OSError:
    started = False
if not started:
    server.close()
    run_real()
def relay(number, frame):
    try:
        server.sendall(struct.pack("!i", number))
    except OSError:
        pass
for name in {relayed!r}:
    signal.signal(getattr(signal, name), relay)
answer = b""
while len(answer) < 4:
    chunk = server.recv(4 - len(answer))
    if not chunk:
        os._exit(1)
    answer += chunk
status = struct.unpack("!i", answer)[0]
if os.WIFSIGNALED(status):
    signal.signal(os.WTERMSIG(status), signal.SIG_DFL)
    os.kill(os.getpid(), os.WTERMSIG(status))
os._exit(os.waitstatus_to_exitcode(status))
"""


def comparable(env: dict) -> dict:
    return {k: v for k, v in env.items() if k not in VOLATILE}


def preimport() -> None:
    """What a training command imports, imported once."""
    import pkgutil

    import torch  # noqa: F401
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel  # noqa: F401

    # the model classes of the tiny test models (transformers imports each on first use)
    transformers.LlamaForCausalLM, transformers.Qwen2ForCausalLM  # noqa: B018
    transformers.MistralForCausalLM, transformers.GPT2LMHeadModel  # noqa: B018
    import accelerate  # noqa: F401
    import safetensors.torch  # noqa: F401

    import shardtune

    for module in pkgutil.walk_packages(shardtune.__path__, "shardtune."):
        if module.name.endswith("__main__"):  # (it runs the command line)
            continue
        try:
            __import__(module.name)
        except ImportError:
            pass


def receive_request(conn: socket.socket) -> tuple[dict, list[int]]:
    data, ancillary, _, _ = conn.recvmsg(1 << 16, socket.CMSG_SPACE(3 * array.array("i").itemsize))
    fds = array.array("i")
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    if len(data) < 4:
        raise OSError("short request")
    size = struct.unpack("!I", data[:4])[0]
    body = data[4:]
    while len(body) < size:
        chunk = conn.recv(size - len(body))
        if not chunk:
            raise OSError("short request")
        body += chunk
    return json.loads(body), list(fds)


def serve(path: str, served: dict) -> bool:
    """Accept commands for the environment ``served`` (the server's own before its imports) until
    killed. Returns True in a forked child, which then runs the command."""
    added = {k: v for k, v in os.environ.items() if k not in served}  # what the imports set, as they would
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path + ".new")
    listener.listen(64)
    os.rename(path + ".new", path)  # (the socket appears once the server listens)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    child_of: dict[socket.socket, int] = {}
    conn_of: dict[int, socket.socket] = {}
    while True:
        for key, _ in selector.select(timeout=0.05):
            conn = key.fileobj
            if conn is listener:
                selector.register(listener.accept()[0], selectors.EVENT_READ)
            elif conn not in child_of:  # a command to start
                try:
                    request, fds = receive_request(conn)
                except (OSError, ValueError):
                    selector.unregister(conn)
                    conn.close()
                    continue
                if comparable(request["env"]) != served or len(fds) != 3:
                    other = comparable(request["env"])
                    differ = sorted(k for k in {*other, *served} if other.get(k) != served.get(k))
                    print(f"refused {request['argv'][:2]}: environment differs in {differ}", file=sys.stderr)
                    for fd in fds:
                        os.close(fd)
                    conn.sendall(b"R")  # another environment: the client runs the real command
                    selector.unregister(conn)
                    conn.close()
                    continue
                sys.stdout.flush()
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:
                    selector.close()
                    listener.close()
                    for other in (*child_of, conn):
                        other.close()
                    for target, fd in enumerate(fds):
                        os.dup2(fd, target)
                        os.close(fd)
                    os.chdir(request["cwd"])
                    os.environ.clear()
                    os.environ.update({**request["env"], **added})
                    sys.argv = [REAL_SHARDTUNE, *request["argv"]]
                    return True
                for fd in fds:
                    os.close(fd)
                print(f"served {request['argv'][:2]} as process {pid}", file=sys.stderr, flush=True)
                child_of[conn], conn_of[pid] = pid, conn
                conn.sendall(b"S")
            else:  # a signal to relay, or the client gone
                pid = child_of[conn]
                try:
                    data = conn.recv(4)
                except OSError:
                    data = b""
                try:
                    if len(data) == 4:
                        os.kill(pid, struct.unpack("!i", data)[0])
                    elif not data:
                        os.kill(pid, signal.SIGKILL)
                        selector.unregister(conn)
                except ProcessLookupError:
                    pass
        while conn_of:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            conn = conn_of.pop(pid)
            child_of.pop(conn, None)
            try:
                conn.sendall(struct.pack("!i", status))
            except OSError:
                pass
            try:
                selector.unregister(conn)
            except (KeyError, ValueError):
                pass  # (already: its client left)
            conn.close()


REAL_SHARDTUNE = str(Path(sys.executable).parent / "shardtune")


class Zygotes:
    """Servers for the environments the tests ask for (one each), and the client on their PATH."""

    def __init__(self):
        self.folder = Path(tempfile.mkdtemp(prefix="stz-"))
        self.bin = self.folder / "bin"
        self.bin.mkdir()
        client = self.bin / "shardtune"
        client.write_text(
            CLIENT.format(python=sys.executable, real=REAL_SHARDTUNE, var=SOCKET_VAR, relayed=RELAYED)
        )
        client.chmod(0o755)
        self.servers: dict[str, tuple[subprocess.Popen, Path]] = {}

    def env(self, env: dict, wait: float = 60.0) -> dict:
        """``env`` with the client first on PATH and a server started for it (ready, or run_real)."""
        if env.get(SOCKET_VAR) == "0" or os.environ.get(SOCKET_VAR) == "0":
            return env
        key = hashlib.sha256(json.dumps(sorted(comparable(env).items())).encode()).hexdigest()[:12]
        path = self.folder / f"{key}.sock"
        served = {**env, "PATH": f"{self.bin}:{env['PATH']}", SOCKET_VAR: str(path)}
        if key not in self.servers:
            with open(self.folder / f"{key}.log", "wb") as log:
                server = subprocess.Popen(
                    [sys.executable, __file__, str(path)],
                    env=served,
                    stdout=log,
                    stderr=log,
                    stdin=subprocess.DEVNULL,
                )
            self.servers[key] = (server, path)
        server, path = self.servers[key]
        deadline = time.monotonic() + wait
        while not path.exists() and server.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        return served

    def log(self, env: dict) -> str:
        """What the server for ``env`` (as :meth:`env` returned it) said: a line per command."""
        return Path(env[SOCKET_VAR]).with_suffix(".log").read_text()

    def close(self) -> None:
        for server, _ in self.servers.values():
            server.kill()
            server.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


if __name__ == "__main__":
    started_with = comparable(dict(os.environ))
    preimport()
    if serve(sys.argv[1], started_with):
        from shardtune.cli import main

        sys.exit(main())
