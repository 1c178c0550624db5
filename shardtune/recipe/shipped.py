"""The recipes shipped with shardtune, usable outside a checkout of the repository.

``shardtune recipes`` lists them, ``shardtune init NAME [PATH]`` writes a copy to edit, and every
command that reads a recipe file also takes a shipped recipe's name (``shardtune train quickstart``):
a path that exists is always read as the file it is; a bare name that is not a file is looked up here.

The files are the repository's top-level ``recipes/`` folder, the one source: inside the package it is
``shardtune/recipe/shipped`` (a symbolic link in the repository, its files copied into a wheel). Each
recipe's first comment line is its one-line summary.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from shardtune.core.errors import BadInput
from shardtune.core.fileio import atomic_write_text

SHIPPED_DIR = Path(__file__).parent / "shipped"
SUFFIX = ".yaml"
# The first line of every copy `shardtune init` writes: what marks the file as shardtune's to replace.
INIT_MARK = "# shardtune init "


@dataclass(frozen=True)
class ShippedRecipe:
    name: str
    path: Path
    summary: str  # the recipe's first comment line
    model: str
    method: str

    def as_dict(self) -> dict[str, str]:
        return {"model": self.model, "method": self.method, "summary": self.summary, "path": str(self.path)}


def shipped_names() -> list[str]:
    """The shipped recipes' names, sorted."""
    return sorted(path.stem for path in SHIPPED_DIR.glob(f"*{SUFFIX}"))


def shipped_file(name: str) -> Path | None:
    """The file of the shipped recipe ``name`` (``quickstart`` or ``quickstart.yaml``), if there is one."""
    path = SHIPPED_DIR / (name.removesuffix(SUFFIX) + SUFFIX)
    return path if is_bare_name(name) and path.is_file() else None


def shipped_recipes() -> dict[str, ShippedRecipe]:
    """Name → recipe with its summary, model and method (each file read): for the listing."""
    found = {}
    for name in shipped_names():
        path = SHIPPED_DIR / (name + SUFFIX)
        text = path.read_text(encoding="utf-8")
        first = text.splitlines()[0] if text else ""
        raw = yaml.safe_load(text) or {}
        found[name] = ShippedRecipe(
            name=name,
            path=path,
            summary=first.removeprefix("#").strip(),
            model=str((raw.get("model") or {}).get("name", "")),
            method=str((raw.get("adapter") or {}).get("method", "")),
        )
    return found


def is_bare_name(arg: str) -> bool:
    return bool(arg) and os.sep not in arg and "/" not in arg and not arg.startswith(".")


def recipe_path(arg: str | Path) -> Path:
    """The file a recipe argument names: the path itself when something is there (or when it is not a
    bare name), else the shipped recipe of that name (``quickstart``, ``quickstart.yaml``)."""
    path = Path(arg)
    if path.exists() or path.is_symlink():
        return path
    return shipped_file(str(arg)) or path


def init_recipe(name: str, destination: str | Path | None = None, overwrite: bool = False) -> Path:
    """Write a copy of the shipped recipe ``name`` to edit: to ``destination`` (a file, or a directory
    to hold ``NAME.yaml``), by default ``NAME.yaml`` in the current directory.

    An existing file is replaced only with ``overwrite`` and only when it is a copy ``init`` wrote (its
    first line is shardtune's); nothing else is ever replaced. The copy is written atomically."""
    source = shipped_file(name)
    if source is None:
        raise BadInput(
            f"{name}: not a shipped recipe; shipped: {', '.join(shipped_names())} (see `shardtune recipes`)"
        )
    stem = source.stem
    target = Path(destination).expanduser() if destination is not None else Path(stem + SUFFIX)
    if target.is_dir() and not target.is_symlink():
        target = target / (stem + SUFFIX)
    if target.is_symlink():
        raise BadInput(f"{target}: is a symbolic link; name the file itself")
    if target.exists():
        if target.is_dir():
            raise BadInput(f"{target}: is a directory")
        if not overwrite:
            raise BadInput(
                f"{target}: exists; choose another path, or --overwrite to replace a copy init wrote"
            )
        if not written_by_init(target):
            raise BadInput(f"{target}: exists and shardtune did not write it; it is never replaced")
    if not target.parent.is_dir():
        raise BadInput(f"{target}: the directory {target.parent} does not exist")
    from shardtune import __version__

    header = (
        f"{INIT_MARK}{stem}: a copy of the shipped recipe (shardtune {__version__}); edit freely.\n"
        f"#   shardtune train {target.name}\n"
    )
    atomic_write_text(target, header + source.read_text(encoding="utf-8"))
    return target


def written_by_init(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.readline().startswith(INIT_MARK)
    except OSError:
        return False
