"""A tiny Hugging Face Hub on 127.0.0.1 for tests: model and dataset repos with revisions, served over
the endpoints huggingface_hub, transformers and datasets use (``HF_ENDPOINT`` points them here).

Nothing here reaches the internet. Every request is recorded, so a test can assert what was (or was
not) fetched — e.g. that an offline run made no request at all.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


@dataclass
class Repo:
    kind: str  # "model" or "dataset"
    repo_id: str
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha → {path: bytes}
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag → sha

    def add_commit(self, files: dict[str, bytes], ref: str = "main") -> str:
        """Add a commit holding ``files``; ``ref`` (a branch or tag) points at it. Returns its sha."""
        digest = hashlib.sha1()
        for path in sorted(files):
            digest.update(path.encode() + hashlib.sha1(files[path]).digest())
        sha = digest.hexdigest()
        self.commits[sha] = dict(files)
        self.refs[ref] = sha
        return sha

    def resolve(self, revision: str) -> str | None:
        revision = unquote(revision)
        if revision in self.commits:
            return revision
        return self.refs.get(revision)


def directory_files(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()
    }


class FakeHub:
    """``with FakeHub() as hub: hub.model("org/tiny").add_commit(files); env HF_ENDPOINT=hub.url``."""

    def __init__(self):
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path)
        self.authorizations: list[str] = []  # the Authorization header of every request that had one
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def model(self, repo_id: str) -> Repo:
        return self.repos.setdefault(("model", repo_id), Repo("model", repo_id))

    def dataset(self, repo_id: str) -> Repo:
        return self.repos.setdefault(("dataset", repo_id), Repo("dataset", repo_id))

    def fetched(self, suffix: str) -> int:
        """How many GET requests fetched a file whose path ends with ``suffix``."""
        return sum(1 for m, p in self.requests if m == "GET" and "/resolve/" in p and p.endswith(suffix))

    # --- HTTP ---------------------------------------------------------------------------------------

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                hub._serve(self, head=True)

            def do_GET(self):
                hub._serve(self, head=False)

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                self.body = self.rfile.read(length) if length else b""
                hub._serve(self, head=False)

        return Handler

    def _serve(self, h, head: bool) -> None:
        path = urlparse(h.path).path
        self.requests.append((h.command, h.path))
        if h.headers.get("Authorization"):
            self.authorizations.append(h.headers["Authorization"])
        try:
            status, headers, body = self._route(h, path)
        except Exception as e:  # a bug here should show in the test, not hang it
            status, headers, body = 500, {}, str(e).encode()
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head:
            h.wfile.write(body)

    def _route(self, h, path: str):
        repo_id = r"([^/]+(?:/[^/]+)?)"
        m = re.fullmatch(rf"/api/(models|datasets)/{repo_id}(?:/revision/([^/]+))?", path)
        if m and h.command in ("GET", "HEAD"):
            repo = self.repos.get((m.group(1)[:-1], m.group(2)))
            return self._info(repo, m.group(3) or "main")
        m = re.fullmatch(rf"/api/(models|datasets)/{repo_id}/tree/([^/]+)(?:/(.*))?", path)
        if m:
            repo = self.repos.get((m.group(1)[:-1], m.group(2)))
            recursive = "recursive=true" in urlparse(h.path).query.lower()
            return self._tree(repo, m.group(3), m.group(4) or "", recursive)
        m = re.fullmatch(rf"/api/(models|datasets)/{repo_id}/paths-info/([^/]+)", path)
        if m:
            repo = self.repos.get((m.group(1)[:-1], m.group(2)))
            return self._paths_info(repo, m.group(3), getattr(h, "body", b""))
        m = re.fullmatch(rf"/(datasets/)?{repo_id}/resolve/([^/]+)/(.+)", path)
        if m:
            repo = self.repos.get(("dataset" if m.group(1) else "model", m.group(2)))
            return self._file(repo, m.group(3), unquote(m.group(4)))
        return 404, {"X-Error-Code": "RepoNotFound"}, b'{"error": "not found"}'

    def _json(self, data, status: int = 200):
        return status, {"Content-Type": "application/json"}, json.dumps(data).encode()

    def _missing_repo(self):
        return 404, {"X-Error-Code": "RepoNotFound"}, b'{"error": "Repository not found"}'

    def _missing_revision(self):
        return 404, {"X-Error-Code": "RevisionNotFound"}, b'{"error": "Invalid rev id"}'

    def _info(self, repo: Repo | None, revision: str):
        if repo is None:
            return self._missing_repo()
        sha = repo.resolve(revision)
        if sha is None:
            return self._missing_revision()
        files = repo.commits[sha]
        return self._json(
            {
                "id": repo.repo_id,
                "_id": repo.repo_id,
                "sha": sha,
                "private": False,
                "gated": False,
                "disabled": False,
                "tags": [],
                "siblings": [{"rfilename": p, "size": len(b)} for p, b in sorted(files.items())],
                "lastModified": "2026-01-01T00:00:00.000Z",
                "cardData": {},
            }
        )

    def _entry(self, path: str, data: bytes) -> dict:
        return {"type": "file", "path": path, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}

    def _tree(self, repo: Repo | None, revision: str, prefix: str, recursive: bool = False):
        """The entries under ``prefix``: its files and folders, or (``?recursive=true``, as
        snapshot_download asks) every file below it with the folders on the way."""
        if repo is None:
            return self._missing_repo()
        sha = repo.resolve(revision)
        if sha is None:
            return self._missing_revision()
        prefix = unquote(prefix).strip("/")
        entries, dirs = [], set()
        for path, data in sorted(repo.commits[sha].items()):
            if prefix and not path.startswith(prefix + "/"):
                continue
            rest = path[len(prefix) + 1 :] if prefix else path
            if "/" in rest and recursive:
                parts = rest.split("/")[:-1]
                for k in range(1, len(parts) + 1):
                    folder = (prefix + "/" if prefix else "") + "/".join(parts[:k])
                    if folder not in dirs:
                        dirs.add(folder)
                        entries.append({"type": "directory", "path": folder, "oid": sha, "size": 0})
                entries.append(self._entry(path, data))
            elif "/" in rest:
                top = (prefix + "/" if prefix else "") + rest.split("/", 1)[0]
                if top not in dirs:
                    dirs.add(top)
                    entries.append({"type": "directory", "path": top, "oid": sha, "size": 0})
            else:
                entries.append(self._entry(path, data))
        if prefix and not entries:
            return 404, {"X-Error-Code": "EntryNotFound"}, b'{"error": "no such folder"}'
        return self._json(entries)

    def _paths_info(self, repo: Repo | None, revision: str, body: bytes):
        if repo is None:
            return self._missing_repo()
        sha = repo.resolve(revision)
        if sha is None:
            return self._missing_revision()
        text = body.decode()
        try:
            asked = json.loads(text).get("paths", [])
        except ValueError:
            from urllib.parse import parse_qs

            asked = parse_qs(text).get("paths", [])
        files = repo.commits[sha]
        found = [self._entry(p, files[p]) for p in asked if p in files]
        found += [
            {"type": "directory", "path": p, "oid": sha, "size": 0}
            for p in asked
            if p not in files and any(f.startswith(p.rstrip("/") + "/") for f in files)
        ]
        return self._json(found)

    def _file(self, repo: Repo | None, revision: str, path: str):
        if repo is None:
            return self._missing_repo()
        sha = repo.resolve(revision)
        if sha is None:
            return self._missing_revision()
        data = repo.commits[sha].get(path)
        if data is None:
            return (
                404,
                {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": sha},
                b'{"error": "Entry not found"}',
            )
        etag = hashlib.sha1(data).hexdigest()
        return (
            200,
            {"X-Repo-Commit": sha, "ETag": f'"{etag}"', "Content-Type": "application/octet-stream"},
            data,
        )
