"""Files and directories shardtune writes: whole or not at all, readable as the user's umask says,
and never over anything shardtune did not write itself.

* :func:`atomic_write` — a file appears complete under its name, or not at all.
* :func:`atomic_directory` — a directory tree likewise. Replacing an earlier tree, the new one is
  written beside it, the old one renamed aside, the new one renamed in, then the old one deleted:
  a crash at any point leaves the old or the new tree whole (under a hidden sibling name at worst).
* :func:`check_output_dir` — every command that writes a directory asks it first. It refuses the
  current directory and its ancestors, ``/``, the home directory, an input (or anything inside or
  around it), an existing file, a symbolic link, and a non-empty directory that shardtune did not
  write. shardtune's own outputs carry a marker, ``.shardtune-output.json``, naming what wrote them and
  which entries are theirs; an output holding anything else is never replaced.
* :func:`exclusive_lock` — an OS file lock (the kernel drops it when its process dies, so a killed
  run never blocks its ``--resume``) that names the process holding it.
"""

from __future__ import annotations

import errno
import fnmatch
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from shardtune.errors import BadInput, first_line

MARKER = ".shardtune-output.json"
LOCK = ".shardtune.lock"


def umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """``write(tmp_path)`` then fsync and rename onto ``path`` (mode 0666 less the umask)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask())  # after writing: some writers (safetensors) create files 0600
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_safetensors(path: Path) -> dict:
    """The tensors of a safetensors file (never pickle); missing, empty, cut short or corrupt: one line."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise BadInput(f"{path}: file not found; the run is incomplete")
    if path.stat().st_size == 0:
        raise BadInput(f"{path}: empty file; the run is incomplete or the file was cut short")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        first = first_line(e)
        raise BadInput(f"{path}: corrupt or truncated safetensors file ({first})") from None


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def make_directory(path: Path) -> None:
    """``mkdir -p`` with the umask's mode (Python's default too; spelled out for what we create)."""
    path.mkdir(parents=True, exist_ok=True, mode=0o777)


# ---------------------------------------------------------------------------------------------------
# Markers: which directories (and which entries in them) shardtune wrote


def write_marker(directory: Path, kind: str, entries: Iterable[str], **extra: str) -> None:
    """Mark ``directory`` as shardtune's output of ``kind``; ``entries``: glob patterns of its own entries."""
    import shardtune

    data = {
        "written_by": "shardtune",
        "shardtune_version": shardtune.__version__,
        "kind": kind,
        "entries": sorted(set(entries)),
        **extra,
    }
    atomic_write_text(directory / MARKER, json.dumps(data, indent=2) + "\n")


def read_marker(directory: Path) -> dict | None:
    """The marker of a shardtune output, or None (absent, unreadable or not shardtune's)."""
    try:
        data = json.loads((directory / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("written_by") != "shardtune":
        return None
    if not isinstance(data.get("entries"), list) or not all(isinstance(e, str) for e in data["entries"]):
        return None
    return data


def exact_entries(directory: Path) -> list[str]:
    """Every entry now in ``directory``, as glob patterns that match exactly it."""
    return [glob.escape(name) for name in os.listdir(directory) if name != MARKER]


def owns(patterns: Iterable[str], name: str) -> bool:
    """Whether an entry ``name`` is shardtune's by the marker's patterns: the entry itself, the marker
    and lock, or a temporary sibling of an entry (``.NAME.*`` while it is being written)."""
    if name in (MARKER, LOCK) or name.startswith(f".{MARKER}."):
        return True
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, f".{p}.*") for p in patterns)


def foreign_entries(directory: Path, patterns: Iterable[str]) -> list[str]:
    patterns = list(patterns)
    return sorted(name for name in os.listdir(directory) if not owns(patterns, name))


# ---------------------------------------------------------------------------------------------------
# Where shardtune may write


def resolved(path: Path) -> Path:
    return Path(os.path.abspath(path)).resolve()


def check_output_dir(
    target: Path | str,
    key: str,
    *,
    replace: bool,
    what: str = "a shardtune output",
    replace_hint: str = "pass --overwrite to replace it",
    inputs: Iterable[Path | str | None] = (),
    legacy: Callable[[Path], list[str] | None] | None = None,
) -> bool:
    """Refuse, with one line naming ``key``, a target shardtune must not write into or replace.

    Returns True when the target holds an earlier shardtune output that may be replaced (``replace``),
    False when it is absent or empty. ``inputs``: what the command reads (a run, a model directory, a
    data file): the target may not be, hold, or lie inside any of them. ``legacy``: patterns of the
    entries of an unmarked directory that an older shardtune wrote (None: not one).
    """
    text = str(target)
    if not text.strip():
        raise BadInput(f"{key}: is empty; name a directory to write")
    path = Path(text).expanduser()
    if path.is_symlink():
        raise BadInput(f"{key}: {text} is a symbolic link; name the directory itself")
    where = resolved(path)
    cwd, home = resolved(Path.cwd()), resolved(Path.home())
    if where == Path(where.anchor):
        raise BadInput(f"{key}: {text} is the filesystem root; name a new directory to write")
    if where == cwd or where in cwd.parents:
        what = "the current directory" if where == cwd else "a parent of the current directory"
        raise BadInput(f"{key}: {text} is {what}; name a new directory to write")
    if where == home or where in home.parents:
        what = "your home directory" if where == home else "a parent of your home directory"
        raise BadInput(f"{key}: {text} is {what}; name a new directory to write")
    for source in inputs:
        if source is None:
            continue
        src = resolved(Path(source).expanduser())
        if where == src or src in where.parents:
            how = "is" if where == src else "is inside"
            raise BadInput(f"{key}: {text} {how} the input {source}; write somewhere else")
        if where in src.parents:
            raise BadInput(f"{key}: {text} holds the input {source}; write somewhere else")
    if not where.exists():
        above = next(p for p in where.parents if p.exists())
        if not above.is_dir():
            raise BadInput(f"{key}: {text} is inside {above}, which is a file; name a directory to write")
        return False
    if not where.is_dir():
        raise BadInput(f"{key}: {text} is an existing file; name a directory to write")
    if not any(where.iterdir()):
        return False
    marker = read_marker(where)
    patterns = marker["entries"] if marker is not None else (legacy(where) if legacy else None)
    if patterns is None:
        raise BadInput(f"{key}: {text} holds files shardtune did not write; choose a new or empty directory")
    foreign = foreign_entries(where, patterns)
    if foreign:
        raise BadInput(
            f"{key}: {text} holds {foreign[0]!r}, which shardtune did not write; move it out or choose "
            "another directory"
        )
    if not replace:
        raise BadInput(f"{key}: {text} already holds {what}; {replace_hint}")
    return True


@contextmanager
def atomic_directory(
    final: Path, kind: str | None = None, entries: Iterable[str] | None = None
) -> Iterator[Path]:
    """Yield a temporary sibling directory to fill; on success it replaces ``final`` (see the module
    docstring), on any error it is removed. With ``kind`` it is marked as shardtune's output of that
    kind, owning ``entries`` (glob patterns; default: exactly what was written)."""
    final = Path(os.path.abspath(final))
    make_directory(final.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.new-", dir=final.parent))
    try:
        yield tmp
        if kind is not None:
            write_marker(tmp, kind, exact_entries(tmp) if entries is None else entries)
        readable(tmp)
        replace_directory(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def readable(tree: Path) -> None:
    """Modes of a tree shardtune just wrote as the umask says (some writers create files 0600)."""
    mask = umask()
    os.chmod(tree, 0o777 & ~mask)
    for root, dirs, files in os.walk(tree):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~mask)
        for f in files:
            os.chmod(os.path.join(root, f), 0o666 & ~mask)


def replace_directory(new: Path, final: Path) -> None:
    """Put ``new`` in the place of ``final``. An existing non-empty ``final`` is swapped with ``new`` in
    one step where the system can (Linux ``renameat2(RENAME_EXCHANGE)``), else renamed aside first;
    either way it is deleted once ``new`` is in place."""
    try:
        os.rename(new, final)  # final absent, or an empty directory
        return
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
    if exchange(new, final):
        shutil.rmtree(new, ignore_errors=True)  # now the old tree
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
    os.rename(final, aside)  # onto the empty placeholder
    os.rename(new, final)
    shutil.rmtree(aside, ignore_errors=True)


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2`` with ``RENAME_EXCHANGE``); False where the
    system or file system cannot."""
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def write_output_dir(
    out: Path | str,
    write: Callable[[Path], None],
    kind: str,
    replace: bool,
    inputs: Iterable[Path | str | None] = (),
    key: str = "--out",
) -> None:
    """Check ``out`` (:func:`check_output_dir`), hold its lock, and fill it atomically with ``write(tmp)``."""
    check_output_dir(out, key, replace=replace, inputs=inputs)
    out = Path(out).expanduser()
    try:
        make_directory(Path(os.path.abspath(out)).parent)
        with exclusive_lock(lock_beside(out), key, str(out), remove=True):
            check_output_dir(out, key, replace=replace, inputs=inputs)  # again, now that it is ours
            with atomic_directory(out, kind) as tmp:
                write(tmp)
    except OSError as e:
        raise BadInput(f"{key}: could not write {out}: {e.strerror or e}") from None


PNG_SIGNATURE = {"Software": "shardtune"}  # PNG text chunk that marks a figure as shardtune's


def check_plot_path(path: Path | str, key: str, inputs: Iterable[Path | str | None] = ()) -> None:
    """A figure may be written to a new file or over a PNG shardtune wrote, never inside an input."""
    path = Path(path).expanduser()
    for source in inputs:
        if source is not None and resolved(Path(source)) in resolved(path).parents:
            raise BadInput(f"{key}: {path} is inside the input {source}; write the figure somewhere else")
    if path.is_symlink():
        raise BadInput(f"{key}: {path} is a symbolic link; name the file itself")
    if path.is_dir():
        raise BadInput(f"{key}: {path} is a directory; name a .png file")
    if path.exists():
        with open(path, "rb") as f:
            head = f.read(1 << 16)
        if b"tEXtSoftware\x00shardtune" not in head:
            raise BadInput(
                f"{key}: {path} exists and shardtune did not write it; remove it or choose another name"
            )
    if not path.parent.is_dir():
        raise BadInput(f"{key}: the directory of {path} does not exist")


def save_figure(fig, path: Path | str, key: str = "--plot") -> None:
    """``fig`` as a PNG at ``path`` (checked by :func:`check_plot_path`), written atomically and marked."""
    check_plot_path(path, key)
    path = Path(path).expanduser()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, metadata=PNG_SIGNATURE))


# ---------------------------------------------------------------------------------------------------
# Locks


def lock_beside(target: Path) -> Path:
    """The lock of a directory written as a whole (it may not exist yet): a hidden sibling file."""
    target = Path(os.path.abspath(target))
    return target.parent / f".{target.name}.shardtune.lock"


@contextmanager
def exclusive_lock(path: Path, key: str, what: str, remove: bool = False) -> Iterator[None]:
    """Hold an exclusive, non-blocking lock on ``path`` (created empty if needed; never written, so a
    run directory reads the same after a refused command) for the ``with`` block.

    Taken already: one line naming ``key`` and the process that holds it. ``remove``: delete the
    lock file afterwards (for locks beside a directory). A no-op where ``fcntl`` is missing (Windows).
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover
        yield
        return
    while True:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o666 & ~umask())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = lock_holder(os.fstat(fd).st_ino)
            os.close(fd)
            raise BadInput(
                f"{key}: {what} is in use by another shardtune run ({holder}); wait for it or choose "
                "another directory"
            ) from None
        try:  # the previous holder may have removed the file between our open and our lock
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        if remove:
            Path(path).unlink(missing_ok=True)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def lock_holder(inode: int) -> str:
    """``pid N: COMMAND`` of the process holding a flock on ``inode`` (Linux /proc), else a phrase."""
    try:
        with open("/proc/locks", encoding="ascii") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 5 and fields[1] == "FLOCK" and fields[5].rsplit(":", 1)[-1] == str(inode):
                    pid = fields[4]
                    try:
                        raw = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                        command = " ".join(a.decode("utf-8", "replace") for a in raw if a)[:200]
                    except OSError:
                        command = ""
                    return f"pid {pid}: {command}" if command else f"pid {pid}"
    except OSError:
        pass
    return "another process"


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Wait for an exclusive lock on ``path`` (created if needed) — one process at a time, e.g. the
    processes of a multi-process run converting the same cached model. A no-op where ``fcntl`` is
    missing (Windows)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover
        yield
        return
    make_directory(path.parent)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
