"""shardtune installed as a user installs it: a wheel in a fresh virtual environment outside the
repository, used from an empty directory with nothing but the shipped recipes."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
LEFT_BEHIND = (
    ".git",
    ".venv",
    "*.egg-info",
    "build",
    "dist",
    "runs",
    ".pytest-tmp",
    "__pycache__",
    ".*_cache",
)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The wheel built from this checkout, installed into a new venv (its bin directory). The venv
    reuses this environment's packages (torch, transformers, …) through a .pth path entry, so nothing
    is downloaded; shardtune itself comes from the wheel alone."""
    base = tmp_path_factory.mktemp("install")
    wheels = base / "wheels"
    # Built from a clean copy, as from a fresh clone: no earlier build's egg-info may add files.
    source = base / "source"
    shutil.copytree(ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(*LEFT_BEHIND))
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheels),
            str(source),
        ],
        capture_output=True,
        text=True,
        cwd=base,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = wheels.glob("shardtune-*.whl")
    env_dir = base / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    site = next((env_dir / "lib").glob("python*/site-packages"))
    (site / "reuse-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(env_dir / "bin" / "python"),
            "install",
            "--no-deps",
            "--ignore-installed",  # the reused environment's editable shardtune is not this install
            "-q",
            str(wheel),
        ],
        env=user_env(env_dir / "bin"),
        capture_output=True,
        text=True,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    return env_dir / "bin"


def user_env(bin_dir: Path) -> dict[str, str]:
    """A user's shell with the new venv first on PATH (no PYTHONPATH into a checkout)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    return env


def run(bin_dir: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(bin_dir / "shardtune"), *args], cwd=cwd, env=user_env(bin_dir), capture_output=True, text=True
    )


# How the documented lines run here: short trainings, and the quickstart (SmolLM2, minutes) only resolved.
SHORTER = {
    ("train", "my-recipe.yaml"): [
        "--set",
        "train.max_steps=2",
        "--set",
        "data.eval_samples=4",
        "-q",
        "--json",
    ],
    ("train", "quickstart"): ["--dry-run", "--json"],
}


def documented_commands(page: Path, test_name: str) -> list[list[str]]:
    """The `shardtune ...` lines of the block on ``page`` that names ``test_name`` as its test (the
    `pip install` lines are what the fixture does)."""
    from test_docs_commands import page_blocks

    (block,) = [b for b in page_blocks(page) if b.tested_by and b.tested_by.endswith("::" + test_name)]
    lines = [shlex.split(line.split("#", 1)[0]) for line in block.body.splitlines()]
    assert any(words[:2] == ["pip", "install"] for words in lines)
    return [words[1:] for words in lines if words[:1] == ["shardtune"]]


def run_documented(
    bin_dir: Path, cwd: Path, commands: list[list[str]]
) -> dict[str, subprocess.CompletedProcess]:
    done = {}
    for args in commands:
        result = run(bin_dir, cwd, *args, *SHORTER.get(tuple(args[:2]), []))
        assert result.returncode == 0, f"shardtune {' '.join(args)}:\n{result.stderr}"
        assert "Traceback" not in result.stderr
        done[" ".join(args[:2])] = result
    return done


def test_the_wheel_carries_the_recipes_and_trains_from_an_empty_directory(installed, tmp_path):
    """docs/getting-started.md's install block, run from an empty directory with the wheel's shardtune."""
    work = tmp_path / "empty"
    work.mkdir()
    where = subprocess.run(
        [str(installed / "python"), "-c", "import shardtune; print(shardtune.__file__)"],
        cwd=work,
        env=user_env(installed),
        capture_output=True,
        text=True,
    )
    assert (
        where.returncode == 0 and str(installed.parent) in where.stdout
    )  # the wheel's copy, not the checkout

    commands = documented_commands(ROOT / "docs" / "getting-started.md", sys._getframe().f_code.co_name)
    assert [c[:1] for c in commands] == [["recipes"], ["init"], ["train"], ["export"], ["train"]]
    done = run_documented(installed, work, commands)

    listed = run(installed, work, "recipes", "--json")
    recipes = json.loads(listed.stdout)
    shipped = {p.stem for p in (ROOT / "recipes").glob("*.yaml")}
    assert set(recipes) == shipped and recipes["tiny"]["model"] == "tiny-llama"
    assert all(str(installed.parent) in r["path"] for r in recipes.values())  # read from the wheel
    assert "tiny-llama" in done["recipes"].stdout

    assert done["init tiny"].stdout.strip() == "my-recipe.yaml"
    copy = (work / "my-recipe.yaml").read_text()
    assert copy.endswith((ROOT / "recipes" / "tiny.yaml").read_text())
    assert json.loads(done["train my-recipe.yaml"].stdout)["steps"] == 2
    assert (work / "runs" / "tiny" / "adapter.safetensors").is_file()
    assert (work / "peft-adapter" / "adapter_config.json").is_file()
    assert json.loads(done["train quickstart"].stdout)["model"]["name"] == "smollm2-135m-instruct"
    assert sorted(p.name for p in work.iterdir()) == ["my-recipe.yaml", "peft-adapter", "runs"]


def test_the_readme_install_lines_are_the_tested_ones(installed, tmp_path):
    """README.md's package block, run the same way."""
    commands = documented_commands(ROOT / "README.md", sys._getframe().f_code.co_name)
    done = run_documented(installed, tmp_path, commands)
    assert (tmp_path / "my.yaml").read_text().startswith("# shardtune init quickstart")
    assert json.loads(done["train quickstart"].stdout)["data"]["task"] == "date_format"
