"""Hub models and data sets against a local hub on 127.0.0.1 (tests/fakehub.py; never the internet):
first download, cache reuse, revision pinning, HF_TOKEN, offline failures, and what a run records."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import tiny_recipe
from fakehub import FakeHub, directory_files

ROOT = Path(__file__).parents[1]
pytestmark = pytest.mark.slow  # each test starts shardtune against a local hub (seconds each)


def shardtune(*args, env: dict, cwd: Path = ROOT, timeout: int = 300) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    full.update({k: v for k, v in env.items() if v is not None})
    return subprocess.run(
        [sys.executable, "-m", "shardtune", *map(str, args)],
        cwd=cwd,
        env=full,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def hub_env(hub: FakeHub, home: Path, offline: bool = False, **extra) -> dict:
    env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(home), "HF_HUB_DISABLE_XET": "1", "OMP_NUM_THREADS": "1"}
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return {**env, **extra}


def checksum(model) -> str:
    digest = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        digest.update(name.encode() + p.detach().float().numpy().tobytes())
    return digest.hexdigest()[:16]


@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    """org/tiny: main = tiny-llama (seed 0), tag v1 = another seed; org/ds: a prompt/completion data set."""
    from shardtune.models.loading import build_tiny_model, byte_tokenizer

    tmp = tmp_path_factory.mktemp("repos")
    files, sums = {}, {}
    for ref, seed in (("v1", 1), ("main", 0)):
        model = build_tiny_model("tiny-llama", seed=seed)
        model.save_pretrained(tmp / ref)
        byte_tokenizer().save_pretrained(tmp / ref)
        files[ref], sums[ref] = directory_files(tmp / ref), checksum(model)
    rows = [{"prompt": f"say {i}", "completion": f" {i}"} for i in range(40)]
    data = {"data/train.jsonl": "\n".join(json.dumps(r) for r in rows).encode(), "README.md": b"# ds\n"}
    return files, sums, data


@pytest.fixture
def hub(repos):
    files, _, data = repos
    with FakeHub() as server:
        model = server.model("org/tiny")
        server.v1 = model.add_commit(files["v1"], ref="v1")
        server.main = model.add_commit(files["main"], ref="main")
        server.ds = server.dataset("org/ds").add_commit(data)
        yield server


def recipe(tmp_path: Path, **sections) -> Path:
    raw = tiny_recipe(tmp_path, train={"max_steps": 2, "batch_size": 4}, **sections)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_a_hub_model_downloads_once_then_comes_from_the_cache_and_runs_record_its_commit(
    hub, repos, tmp_path
):
    env = hub_env(hub, tmp_path / "hf")
    path = recipe(tmp_path, model={"name": "org/tiny"})
    done = shardtune("train", path, "-q", env=env)
    assert done.returncode == 0, done.stderr
    assert hub.fetched("model.safetensors") == 1  # downloaded
    base = json.loads((tmp_path / "run" / "adapter.json").read_text())["base_model"]
    assert base == {
        **base,
        "name": "org/tiny",
        "source": "hub",
        "revision": hub.main,
    }  # the commit, not "main"

    again = shardtune("generate", "-m", "org/tiny", "hi", "--max-new-tokens", "2", "--json", env=env)
    assert again.returncode == 0, again.stderr
    assert hub.fetched("model.safetensors") == 1  # the cache, not a second download
    before = len(hub.requests)
    offline = shardtune("eval", tmp_path / "run", "--json", env=hub_env(hub, tmp_path / "hf", offline=True))
    assert offline.returncode == 0, offline.stderr
    assert len(hub.requests) == before  # offline: not a single request


def test_a_revision_is_pinned(hub, repos, tmp_path):
    _, sums, _ = repos
    code = (
        "from shardtune.models.loading import load_model; import hashlib\n"
        "m, _ = load_model('org/tiny', revision='v1'); d = hashlib.sha256()\n"
        "for n, p in sorted(m.state_dict().items()): d.update(n.encode() + p.detach().float().numpy().tobytes())\n"
        "print(d.hexdigest()[:16])"
    )
    full = {
        **{k: v for k, v in os.environ.items() if not k.startswith("HF_")},
        **hub_env(hub, tmp_path / "hf"),
    }
    done = subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == sums["v1"] != sums["main"]
    path = recipe(tmp_path, model={"name": "org/tiny", "revision": "v1"})
    assert shardtune("train", path, "-q", env=hub_env(hub, tmp_path / "hf")).returncode == 0
    base = json.loads((tmp_path / "run" / "adapter.json").read_text())["base_model"]
    assert base["revision"] == hub.v1


def test_offline_and_not_cached_fails_at_once_naming_the_id_and_the_cache(hub, tmp_path):
    env = hub_env(hub, tmp_path / "empty", offline=True)
    done = shardtune("train", recipe(tmp_path, model={"name": "org/tiny"}), env=env)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert "model.name: 'org/tiny'" in done.stderr and str(tmp_path / "empty" / "hub") in done.stderr
    assert "downloads are off" in done.stderr
    done = shardtune("--offline", "generate", "-m", "org/tiny", "hi", env={**env, "HF_HUB_OFFLINE": None})
    assert done.returncode == 2 and "downloads are off" in done.stderr  # --offline alone does the same
    assert hub.requests == []  # nothing reached the network


def test_hub_errors_are_one_line(hub, tmp_path):
    env = hub_env(hub, tmp_path / "hf")
    done = shardtune("generate", "-m", "org/missing", "hi", env=env)
    assert done.returncode == 2 and "error: --model: the hub has no repository 'org/missing'" in done.stderr
    done = shardtune("train", recipe(tmp_path, model={"name": "org/tiny", "revision": "nope"}), env=env)
    assert done.returncode == 2
    assert "error: model.revision: 'nope' is not a branch, tag or commit of org/tiny" in done.stderr
    assert "Traceback" not in done.stderr


def test_hf_token_is_sent(hub, tmp_path):
    env = hub_env(hub, tmp_path / "hf", HF_TOKEN="hf_test_token")
    assert shardtune("generate", "-m", "org/tiny", "hi", "--max-new-tokens", "1", env=env).returncode == 0
    assert any(auth == "Bearer hf_test_token" for auth in hub.authorizations)


def test_a_hub_dataset_downloads_and_is_reused_offline(hub, tmp_path):
    data = {"task": None, "hub": "org/ds", "eval_samples": 4}
    path = recipe(tmp_path, data=data)
    done = shardtune("train", path, "-q", "--json", env=hub_env(hub, tmp_path / "hf"))
    assert done.returncode == 0, done.stderr
    assert hub.fetched("train.jsonl") == 1
    before = len(hub.requests)
    again = shardtune(
        "train", path, "-q", "--set", "output.overwrite=true", env=hub_env(hub, tmp_path / "hf", offline=True)
    )
    assert again.returncode == 0, again.stderr
    assert len(hub.requests) == before
    empty = shardtune(
        "train",
        path,
        "--set",
        f"output.dir={tmp_path / 'other'}",
        env=hub_env(hub, tmp_path / "x", offline=True),
    )
    assert (
        empty.returncode == 2
        and "data.hub: 'org/ds' is not a hub dataset in the Hugging Face cache" in empty.stderr
    )


def closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens (connections are refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def silent_server():
    """A server on 127.0.0.1 that accepts connections and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


def test_an_unreachable_hub_falls_back_to_the_cache_within_seconds(hub, tmp_path):
    """Hub down (refused, or accepting and never answering) with the model cached: the cache is used
    as HF_HUB_OFFLINE=1 would, with one note, in seconds; with nothing cached: one line, exit 2."""
    home = tmp_path / "hf"
    first = shardtune("params", "--model", "org/tiny", "--json", env=hub_env(hub, home))
    assert first.returncode == 0, first.stderr
    counted = json.loads(first.stdout)["methods"][0]["trainable"]
    # What the hub costs, apart from starting Python and torch (seconds on a quiet machine, more on a
    # loaded one): the same command offline, just before, is the baseline. Within 10 s on a quiet
    # machine (the probe gives up after 3 s), so at most 6 s above the baseline.
    with silent_server() as silent:
        for url in (f"http://127.0.0.1:{closed_port()}", silent):
            env = {**hub_env(hub, home), "HF_ENDPOINT": url}
            started = time.monotonic()
            shardtune("params", "--model", "org/tiny", "--json", env={**env, "HF_HUB_OFFLINE": "1"})
            baseline = time.monotonic() - started
            started = time.monotonic()
            done = shardtune("params", "--model", "org/tiny", "--json", env=env)
            took = time.monotonic() - started
            assert done.returncode == 0, done.stderr
            assert json.loads(done.stdout)["methods"][0]["trainable"] == counted
            assert len(done.stderr.splitlines()) == 1 and "comes from the cache" in done.stderr
            assert took - baseline < 6, (took, baseline)
            started = time.monotonic()
            missing = shardtune(
                "params", "--model", "org/tiny", env={**env, "HF_HOME": str(tmp_path / "empty")}
            )
            assert time.monotonic() - started - baseline < 6
            assert missing.returncode == 2 and len(missing.stderr.splitlines()) == 1
            assert "cannot reach the hub" in missing.stderr and "org/tiny" in missing.stderr


@contextlib.contextmanager
def stalling_server():
    """A hub on 127.0.0.1 that answers the probe (``HEAD /``) and huggingface_hub's registry of agent
    harnesses (with its own 3 s limit) at once, and accepts every other request without ever answering
    it: what the probe cannot see, the requests' own time limit must."""
    import threading

    held: list[socket.socket] = []
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)

    def serve(conn: socket.socket) -> None:
        try:
            if conn.recv(65536).startswith((b"HEAD / ", b"GET /api/agent-harnesses ")):
                conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                conn.close()
            else:
                held.append(conn)  # never answered
        except OSError:
            pass

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        server.close()
        for conn in held:
            conn.close()


def test_a_hub_that_accepts_and_never_answers_ends_every_command_in_seconds(hub, tmp_path):
    """The probe is answered, the API calls never are: each request gives up after
    HF_HUB_DOWNLOAD_TIMEOUT seconds (set to 3 here), without retries; a cached model is then read
    from the cache with one note, and an uncached one fails in one line (train, params, generate)."""
    home = tmp_path / "hf"
    first = shardtune("params", "--model", "org/tiny", "--json", env=hub_env(hub, home))
    assert first.returncode == 0, first.stderr
    run = recipe(tmp_path, model={"name": "org/tiny"})
    with stalling_server() as url:
        env = {**hub_env(hub, home), "HF_ENDPOINT": url, "HF_HUB_DOWNLOAD_TIMEOUT": "3"}
        started = time.monotonic()
        shardtune("params", "--model", "org/tiny", "--json", env={**env, "HF_HUB_OFFLINE": "1"})
        baseline = time.monotonic() - started
        started = time.monotonic()
        cached = shardtune("params", "--model", "org/tiny", "--json", env=env, timeout=120)
        assert time.monotonic() - started - baseline < 15
        assert cached.returncode == 0 and json.loads(cached.stdout) == json.loads(first.stdout)
        assert len(cached.stderr.splitlines()) == 1, cached.stderr
        assert "did not answer (no answer within 3 s to GET" in cached.stderr, cached.stderr
        assert "/api/models/org/tiny" in cached.stderr and "came from the cache" in cached.stderr
        empty = {**env, "HF_HOME": str(tmp_path / "empty")}
        for args in (
            ["params", "--model", "org/tiny"],
            ["generate", "-m", "org/tiny", "hello"],
            ["train", str(run), "-q"],
        ):
            started = time.monotonic()
            done = shardtune(*args, env=empty, timeout=120)
            assert time.monotonic() - started - baseline < 15, args
            assert done.returncode == 2 and len(done.stderr.splitlines()) == 1, (args, done.stderr)
            assert "cannot reach the hub" in done.stderr and "org/tiny" in done.stderr


@pytest.mark.parametrize("command", ["train", "params", "generate"])
def test_sigterm_during_a_hub_request_ends_the_command_within_seconds(tmp_path, command):
    """A request that waits for the hub (here: for ever, with a long HF_HUB_DOWNLOAD_TIMEOUT) does
    not hold SIGTERM back: one line, exit 143, within seconds."""
    args = {
        "train": ["train", recipe(tmp_path, model={"name": "org/tiny"})],
        "params": ["params", "--model", "org/tiny"],
        "generate": ["generate", "-m", "org/tiny", "hello"],
    }[command]
    with stalling_server() as url:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
        env.update(HF_ENDPOINT=url, HF_HOME=str(tmp_path / "hf"), HF_HUB_DOWNLOAD_TIMEOUT="600")
        proc = subprocess.Popen(
            [sys.executable, "-m", "shardtune", *map(str, args)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(8)  # started, probed, and waiting for an answer that never comes
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        out, err = proc.communicate(timeout=60)
    assert time.monotonic() - signalled < 5
    lines = err.strip().splitlines()
    assert proc.returncode == 143 and len(lines) == 1 and lines[0].startswith("error: stopped by SIGTERM"), (
        err
    )


@contextlib.contextmanager
def misshapen_hub(answer):
    """A server on 127.0.0.1 that answers every request 200 with the JSON ``answer`` (a list or a
    string where huggingface_hub reads an object): a proxy or a mirror that is not a hub."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    body = json.dumps(answer).encode()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _answer(self, head: bool = False):
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def do_GET(self):
            self._answer()

        def do_HEAD(self):
            self._answer(head=True)

        def do_POST(self):
            self._answer()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("answer", [[], "oops", {"unexpected": True}])
def test_a_hub_that_answers_in_an_unexpected_shape_is_named_not_an_internal_error(tmp_path, answer):
    run = recipe(tmp_path, model={"name": "org/tiny"})
    with misshapen_hub(answer) as url:
        env = {
            "HF_ENDPOINT": url,
            "HF_HOME": str(tmp_path / "hf"),
            "HF_HUB_DISABLE_XET": "1",
            "OMP_NUM_THREADS": "1",
        }
        for args in (["train", str(run), "-q"], ["params", "--model", "org/tiny"]):
            done = shardtune(*args, env=env, timeout=120)
            lines = done.stderr.splitlines()
            assert done.returncode in (2, 5) and len(lines) == 1, (args, done.stderr)
            assert "internal error" not in done.stderr and "Traceback" not in done.stderr
            if done.returncode == 5:
                assert lines[0].startswith(
                    f"error: the hub at {url} answered in a shape huggingface_hub cannot read"
                )
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "bad", ["org/na..me", "org--x/model", "org/model.git", "org/model-", "a/b/c", "org/" + "m" * 97]
)
def test_an_impossible_hub_id_is_one_line_before_any_request(hub, tmp_path, bad):
    home = tmp_path / "hf"
    before = len(hub.requests)
    cases = {
        "model.name": {"model": {"name": bad}},
        "data.hub": {"data": {"task": None, "hub": bad, "eval_samples": 4}},
        "--model": None,
    }
    for key, sections in cases.items():
        args = ["train", str(recipe(tmp_path, **sections)), "-q"] if sections else ["params", "--model", bad]
        done = shardtune(*args, env=hub_env(hub, home), timeout=120)
        assert done.returncode == 2, (args, done.stderr)
        (line,) = done.stderr.splitlines()
        assert line.startswith(f"error: {key}: {bad!r} is not a "), line
    assert len(hub.requests) == before  # decided before any network call


def test_valid_repo_ids_are_huggingface_hubs():
    """shardtune's check (made without importing huggingface_hub) agrees with huggingface_hub's."""
    import random

    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from shardtune.models.hub import valid_repo_id

    rng = random.Random(0)
    for _ in range(20_000):
        name = "".join(rng.choice("ab1_-./é") for _ in range(rng.randint(1, 10)))
        try:
            validate_repo_id(name)
            theirs = True
        except HFValidationError:
            theirs = False
        assert valid_repo_id(name) == theirs, name
    assert valid_repo_id("org/" + "m" * 96) and not valid_repo_id("org/" + "m" * 97)


def test_a_read_only_hugging_face_cache_is_the_machines_one_line(hub, tmp_path):
    """HF_HOME on a read-only file system (a tmpfs remounted read-only; needs root): the download
    cannot be written, exit 5, naming the option, the cache and what to set."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    home = tmp_path / "hf"
    home.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(home)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        for args, key in (
            (["params", "--model", "org/tiny"], "--model"),
            (["generate", "-m", "org/tiny", "hi"], "--model"),
        ):
            done = shardtune(*args, env=hub_env(hub, home), timeout=120)
            assert done.returncode == 5, done.stderr
            (line,) = done.stderr.splitlines()
            assert (
                line.startswith(f"error: {key}: cannot download org/tiny into {home}") and "[EROFS]" in line
            )
    finally:
        subprocess.run(["umount", "-l", str(home)])
