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
  which paths in them are theirs (glob patterns, down to the files inside their directories); an
  output holding anything else, at any depth, is never replaced, and neither is an output of another
  kind (an export never replaces a run, a merge never the model cache).
* :func:`exclusive_lock` — an OS file lock (the kernel drops it when its process dies, so a killed
  run never blocks its ``--resume``) that names the process holding it.
"""

from __future__ import annotations

import errno
import fnmatch
import functools
import glob
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from shardtune.core.errors import BadInput, MachineError, environment_failure, first_line

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


def read_weights(path: Path) -> dict:
    """The tensors of a weights file (:func:`read_safetensors`) with every floating-point one finite:
    a NaN or infinity is one line naming the file and tensor (a model built from it answers NaN).
    Whether a tensor may be an integer one (an index) is for its reader to say."""
    import torch

    tensors = read_safetensors(path)
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise BadInput(
                f"{path}: tensor {name!r} holds NaN or infinity; the adapter diverged or the file is "
                "broken (use an earlier checkpoint)"
            )
    return tensors


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
    """Every file now under ``directory`` (its subdirectories' too), as glob patterns of paths that
    match exactly it."""
    found = []
    for root, _dirs, files in os.walk(directory):
        rel = Path(root).relative_to(directory)
        found += [
            glob.escape((rel / name).as_posix()) for name in files if root != str(directory) or name != MARKER
        ]
    return found


# The names shardtune gives an entry while writing it (fileio's atomic_write and atomic_directory,
# with tempfile's 8 random characters): ``.NAME.<random>.tmp``, ``.NAME.new-<random>``,
# ``.NAME.old-<random>``. Nothing else is a temporary name of shardtune's (``.NAME.old-mine`` is not).
_RANDOM = "[a-z0-9_]{8}"
TEMPORARY_FORMS = (rf"{_RANDOM}\.tmp", f"new-{_RANDOM}", f"old-{_RANDOM}")
# In a pattern, ``[0-9]*`` is a number: one or more digits, nothing after them (``checkpoint-[0-9]*``
# owns checkpoint-12, not a user's checkpoint-12-best or checkpoint-12.bak).
NUMBER = "[0-9]*"


@functools.lru_cache(maxsize=1024)
def _component_regex(pattern: str) -> tuple[re.Pattern, re.Pattern]:
    """(the entry, its temporary siblings) of one pattern component, as regular expressions."""

    def body(glob_part: str) -> str:  # fnmatch's translation, without its (?s: ... )\Z frame
        return fnmatch.translate(glob_part)[len("(?s:") : -len(")\\Z")]

    entry = "[0-9]+".join(body(part) for part in pattern.split(NUMBER))
    temporary = rf"\.(?:{entry})\.(?:{'|'.join(TEMPORARY_FORMS)})"
    return re.compile(rf"(?s:{entry})\Z"), re.compile(rf"(?s:{temporary})\Z")


def _name_matches(name: str, pattern: str) -> bool:
    """One path component against one pattern component: the entry itself or a temporary sibling of it."""
    entry, temporary = _component_regex(pattern)
    return bool(entry.match(name) or (name.startswith(".") and temporary.match(name)))


def foreign_entries(
    directory: Path, patterns: Iterable[str], kinds: Mapping[str, Iterable[str]] | None = None
) -> list[str]:
    """The paths under ``directory`` that no pattern owns, relative and '/'-separated (a directory
    nothing owns named once, with a trailing '/', for all it holds).

    Patterns are glob patterns of paths, matched one component at a time (``checkpoint-[0-9]*/rng.safetensors``),
    each component also owning the temporary names shardtune gives that entry while writing it. A
    pattern that ends at a file owns it; one that goes on below a directory lets the directory hold what
    the rest of it owns; one that ends at a directory owns it only as a shardtune output of its own,
    with its own marker, which judges what it holds (by ``kinds[its kind]`` where given: the entries
    this version writes, for a marker an older one wrote). Nothing else is shardtune's: a file put into
    one of its directories, a directory named like its own, a name like its temporary ones."""
    split = [p.split("/") for p in patterns]
    found = []
    for name in sorted(os.listdir(directory)):
        if name in (MARKER, LOCK) or name.startswith(f".{MARKER}."):
            continue
        path = directory / name
        matching = [p for p in split if _name_matches(name, p[0])]
        ends_here = any(len(p) == 1 for p in matching)
        if not (path.is_dir() and not path.is_symlink()):
            if not ends_here:
                found.append(name)
            continue
        marker = read_marker(path) if ends_here else None
        below = ["/".join(p[1:]) for p in matching if len(p) > 1]
        if marker is not None:
            inner = foreign_entries(path, entries_of(marker, kinds), kinds)
        elif below:
            inner = foreign_entries(path, below, kinds)
        else:
            found.append(f"{name}/")
            continue
        found += [f"{name}/{rel}" for rel in inner]
    return found


def output_kinds(*kinds: str) -> dict[str, tuple]:
    """``kinds`` for :func:`check_output_dir`: outputs written in one go (their markers list what they hold)."""
    return {kind: () for kind in kinds}


def entries_of(marker: dict, kinds: Mapping[str, Iterable[str]] | None = None) -> list[str]:
    """What an output's marker says is shardtune's: ``kinds``' entries for its kind where given (the
    patterns this version writes, for an output kept being written into: a run, a comparison), else
    the marker's own."""
    kind = marker.get("kind")
    return list(kinds[kind]) if kinds and kinds.get(kind) else marker["entries"]


# ---------------------------------------------------------------------------------------------------
# Where shardtune may write


def resolved(path: Path | str) -> Path:
    """The absolute path the kernel reaches through ``path``, every symbolic link followed. A ``..``
    after a link goes up from the link's *target*, as the kernel does (``os.path.abspath`` would drop
    the link and its ``..`` as text: another directory)."""
    return Path(path).expanduser().resolve()


def real_path(path: Path | str) -> Path:
    """The absolute path shardtune writes for ``path``: its folder as the kernel resolves it, its own
    name kept (a link named last stays the link, so that checks can refuse it; a final ``.`` or
    ``..`` is resolved). Every path a command checks is the one it then writes: resolve once, check
    that, use that."""
    path = Path(path).expanduser()
    if path.name in ("", ".", ".."):
        return path.resolve()
    return path.parent.resolve() / path.name


def written_path(path: Path | str) -> Path:
    """The path to write (and to show) for ``path``: as the user wrote it when its text leads where the
    kernel goes (the usual case: ``runs/tiny`` stays ``runs/tiny`` in messages and result.json),
    else :func:`real_path` — a ``..`` after a symbolic link, which text and kernel read differently."""
    given = Path(path).expanduser()
    real, lexical = real_path(given), Path(os.path.abspath(given))
    if lexical.name == real.name and lexical.parent.resolve() == real.parent:
        return given
    return real


def first_link_inside(directory: Path) -> Path | None:
    """The first symbolic link found at any depth below ``directory`` (links are not followed), or
    None: a command that writes into an existing directory of its own never writes through one."""
    for root, dirs, files in os.walk(directory):
        for name in sorted(dirs + files):
            if os.path.islink(os.path.join(root, name)):
                return Path(root, name)
    return None


def check_output_dir(
    target: Path | str,
    key: str,
    *,
    replace: bool,
    what: str = "a shardtune output",
    replace_hint: str = "pass --overwrite to replace it",
    inputs: Iterable[Path | str | None] = (),
    legacy: Callable[[Path], list[str] | None] | None = None,
    kinds: Mapping[str, Iterable[str]] | None = None,
    within: Mapping[str, Iterable[str]] | None = None,
) -> bool:
    """Refuse, with one line naming ``key``, a target shardtune must not write into or replace.

    Returns True when the target holds an earlier shardtune output that may be replaced (``replace``),
    False when it is absent or empty. ``inputs``: what the command reads (a run, a model directory, a
    data file): the target may not be, hold, or lie inside any of them. ``kinds``: the kinds of output
    the command may replace, each with the entries this version writes (empty: an output written in one
    go, judged by its marker's own entries); None: any kind. ``within``: the same for the outputs it may
    hold (a comparison's runs). ``legacy``: patterns of the entries of an unmarked directory that an
    older shardtune wrote (None: not one).
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
    if marker is not None and kinds is not None and marker.get("kind") not in kinds:
        raise BadInput(
            f"{key}: {text} holds another kind of shardtune output ({marker.get('kind')}), not {what}; "
            "choose another directory"
        )
    patterns = entries_of(marker, kinds) if marker is not None else (legacy(where) if legacy else None)
    if patterns is None:
        raise BadInput(f"{key}: {text} holds files shardtune did not write; choose a new or empty directory")
    foreign = foreign_entries(where, patterns, {**(within or {}), **(kinds or {})})
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
    final = real_path(final)
    make_directory(final.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.new-", dir=final.parent))
    try:
        yield tmp
        if kind is not None:
            write_marker(tmp, kind, exact_entries(tmp) if entries is None else entries)
        readable(tmp)
        keep_directory_settings(final, tmp)
        replace_directory(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_leftovers(final: Path) -> list[Path]:
    """Remove what an earlier, killed write of ``final`` left beside it: the hidden directories of
    :func:`atomic_directory` and :func:`replace_directory`, ``.NAME.new-XXXXXXXX`` and
    ``.NAME.old-XXXXXXXX`` (eight characters of ``tempfile``'s alphabet), full-size copies that
    nothing else would ever remove. Only those, by their exact form, and never through a link; the
    caller holds ``final``'s lock, so no live writer owns them. Returns what was removed."""
    final = real_path(final)
    form = re.compile(rf"\.{re.escape(final.name)}\.(?:new|old)-[a-z0-9_]{{8}}")
    removed = []
    try:
        siblings = list(final.parent.iterdir())
    except OSError:
        return removed
    for path in siblings:
        if not form.fullmatch(path.name) or path.is_symlink() or not path.is_dir():
            continue
        # ours beyond the name: this user's (mkdtemp made it), and an output set aside is marked
        if path.stat().st_uid != os.getuid() or (".old-" in path.name and read_marker(path) is None):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def readable(tree: Path) -> None:
    """Modes of a tree shardtune just wrote as the umask says (some writers create files 0600)."""
    mask = umask()
    os.chmod(tree, 0o777 & ~mask)
    for root, dirs, files in os.walk(tree):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~mask)
        for f in files:
            os.chmod(os.path.join(root, f), 0o666 & ~mask)


def keep_directory_settings(final: Path, new: Path) -> None:
    """``new``, about to take the place of an existing directory ``final`` (an empty one the user made,
    or an earlier output), gets its mode and group, so that a shared (setgid) or read-only directory
    stays one; best effort where the group cannot be given."""
    if final.is_symlink() or not final.is_dir():
        return
    st = final.stat()
    os.chmod(new, stat.S_IMODE(st.st_mode))
    for root, dirs, files in os.walk(new):
        for name in [root, *(os.path.join(root, n) for n in dirs + files)]:
            try:
                os.chown(name, -1, st.st_gid)
            except OSError:
                return


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
    what: str = "a shardtune output",
    replaces: Iterable[str] = (),
) -> None:
    """Check ``out`` (:func:`check_output_dir`), hold its lock, and fill it atomically with ``write(tmp)``.
    It may replace an output of its own ``kind`` or of the kinds in ``replaces``."""
    kinds = output_kinds(kind, *replaces)
    check_output_dir(out, key, replace=replace, inputs=inputs, what=what, kinds=kinds)
    out = written_path(out)  # checked as the kernel resolves it, written there
    try:
        make_directory(out.parent)
        with exclusive_lock(lock_beside(out), key, str(out), remove=True):
            # again, now that it is ours
            check_output_dir(out, key, replace=replace, inputs=inputs, what=what, kinds=kinds)
            remove_leftovers(out)  # of an earlier write that was killed
            with atomic_directory(out, kind) as tmp:
                write(tmp)
    except OSError as e:
        machine = environment_failure(e)
        if machine is not None:
            raise MachineError(f"{key}: could not write {out}: {machine}") from None
        raise BadInput(f"{key}: could not write {out}: {e.strerror or e}") from None


PNG_SIGNATURE = {"Software": "shardtune"}  # PNG text chunk that marks a figure as shardtune's


def check_plot_path(path: Path | str, key: str, inputs: Iterable[Path | str | None] = ()) -> None:
    """A figure may be written to a new file or over a PNG shardtune wrote, never inside an input."""
    path = Path(path).expanduser()
    if path.suffix.lower() != ".png" and not path.is_dir():
        raise BadInput(f"{key}: {path} must end in .png (the figure is written as a PNG)")
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
    target = real_path(target)
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
