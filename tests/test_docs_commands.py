"""Every shell block of README.md and docs/ is run, so that a change that breaks a documented command
fails here.

A ```bash block runs as one `bash -euo pipefail` script: every command must exit 0 (a command
expected to fail is written `cmd || test $? -eq 2`), print no traceback, and the block's output must
hold each `expect:` line. The blocks of one page run in order in one scratch directory that holds
copies of recipes/ and examples/ (so `runs/quickstart` trained by one block is evaluated by the next).

What a block needs in order to run here is declared next to it, in an HTML comment right above the
fence, one directive per line:

    <!-- doc-test
    replace: TEXT => OTHER       the block runs with OTHER for TEXT (a tiny model for a big one, …)
    skip: TEXT — reason          lines holding TEXT are not run (the reason is required)
    before: COMMAND              run first (in the same directory), e.g. to make an input file
    env: NAME=VALUE              in the block's environment
    expect: TEXT                 the block's stdout + stderr holds TEXT
    cwd: repo                    run in the repository (read-only commands) instead of the scratch copy
    tested-by: tests/F.py::NAME  run by that test instead (it must exist and read the same page)
    -->

`$SHARDTUNE_ROOT` is the repository. Lines with placeholders that are not commands (`RUN_DIR`,
`[--json]`) belong in ```text blocks, not here.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(
    r"(?:<!--\s*doc-test\s*\n(?P<directives>.*?)-->\s*\n)?```(?:bash|sh|shell)\n(?P<body>.*?)```", re.S
)
PLACEHOLDER = re.compile(r"\b(RUN_DIR|RECIPE_FILE|MODEL|DIR)\b|\[--")


@dataclass
class Block:
    page: Path
    line: int
    body: str
    replace: list[tuple[str, str]] = field(default_factory=list)
    skip: list[tuple[str, str]] = field(default_factory=list)
    before: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    expect: list[str] = field(default_factory=list)
    cwd: str = "scratch"
    tested_by: str | None = None

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    def script(self) -> str:
        """The block as it runs here: skipped lines left out, then the replacements."""
        kept = [line for line in self.body.splitlines() if not any(text in line for text, _ in self.skip)]
        text = "\n".join(kept) + "\n"
        for old, new in self.replace:
            text = text.replace(old, new)
        return text


def parse_directives(block: Block, text: str) -> Block:
    for raw in text.strip().splitlines():
        key, sep, value = raw.strip().partition(":")
        value = value.strip()
        assert sep and value, f"{block.name}: directive {raw!r} is not KEY: VALUE"
        if key == "replace":
            old, arrow, new = value.partition(" => ")
            assert arrow, f"{block.name}: replace needs 'TEXT => OTHER'"
            block.replace.append((old, new))
        elif key == "skip":
            what, dash, reason = value.partition(" — ")
            assert dash and reason.strip(), f"{block.name}: skip needs 'TEXT — reason'"
            block.skip.append((what, reason))
        elif key == "before":
            block.before.append(value)
        elif key == "env":
            name, _, env_value = value.partition("=")
            block.env[name] = env_value
        elif key == "expect":
            block.expect.append(value)
        elif key == "cwd":
            block.cwd = value
        elif key == "tested-by":
            block.tested_by = value
        else:
            raise AssertionError(f"{block.name}: unknown directive {key!r}")
    return block


def page_blocks(page: Path) -> list[Block]:
    text = page.read_text()
    found = []
    for m in FENCE.finditer(text):
        line = text[: m.start("body")].count("\n")
        block = Block(page, line, m.group("body"))
        found.append(parse_directives(block, m.group("directives") or ""))
    return found


BLOCKS = [block for page in PAGES for block in page_blocks(page)]


def shell_env(block: Block) -> dict:
    bin_dir = str(Path(sys.executable).parent)  # the venv's shardtune, python, accelerate, torchrun
    return {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",  # nothing documented here may need the network
        "SHARDTUNE_ROOT": str(ROOT),
        **block.env,
    }


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """One scratch directory per page, with copies of recipes/ and examples/."""
    made: dict[Path, Path] = {}

    def for_page(page: Path) -> Path:
        if page not in made:
            where = tmp_path_factory.mktemp(page.stem)
            shutil.copytree(ROOT / "recipes", where / "recipes")
            shutil.copytree(ROOT / "examples", where / "examples")
            made[page] = where
        return made[page]

    return for_page


def test_every_block_is_found_and_its_directives_apply():
    assert len(BLOCKS) >= 20 and {b.page.name for b in BLOCKS} >= {"README.md", "getting-started.md"}
    for block in BLOCKS:
        for old, _ in block.replace:
            assert old in block.body, f"{block.name}: replace {old!r}: not in the block (stale directive)"
        for what, _ in block.skip:
            assert what in block.body, f"{block.name}: skip {what!r}: not in the block (stale directive)"
        script = block.script()
        if block.tested_by is None:
            assert not PLACEHOLDER.search(script), (
                f"{block.name}: a placeholder in a shell block; use a runnable example, a replace "
                f"directive, or a ```text block:\n{script}"
            )


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.tested_by], ids=lambda b: b.name)
def test_blocks_run_by_other_tests_are_run_there(block):
    path, _, name = block.tested_by.partition("::")
    source = (ROOT / path).read_text()
    assert re.search(rf"^(async )?def {re.escape(name)}\(", source, re.M), f"{block.tested_by} not found"
    assert block.page.name in source, f"{path} does not read {block.page.name}"


@pytest.mark.slow
@pytest.mark.parametrize(
    "block",
    # The blocks of one page run in order in one scratch directory: on one worker (make test's xdist).
    [
        pytest.param(b, marks=pytest.mark.xdist_group(f"docs:{b.page.name}"))
        for b in BLOCKS
        if not b.tested_by
    ],
    ids=lambda b: b.name,
)
def test_the_documented_commands_run(block, scratch, preimported):
    cwd = ROOT if block.cwd == "repo" else scratch(block.page)
    env = preimported.env(shell_env(block))  # (each command a process of its own, imports done once)
    for command in block.before:
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", command], cwd=cwd, env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, f"{block.name}: before: {command}\n{done.stderr}"
    script = block.script()
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    said = done.stdout + done.stderr
    assert done.returncode == 0, (
        f"{block.name} exited {done.returncode}:\n{script}\n--- stderr:\n{done.stderr}"
    )
    assert "Traceback" not in said, f"{block.name}:\n{done.stderr}"
    for text in block.expect:
        assert text in said, f"{block.name}: expected {text!r} in the output:\n{said}"


# ---------------------------------------------------------------------------------------------------
# Options named anywhere in the docs exist; docs/cli.md lists every option of every command.

INLINE = re.compile(r"(?<!`)`(shardtune [^`\n]+)`(?!`)")
TOKEN = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*)")


def cli_commands() -> dict[str, list[tuple[list[str], bool]]]:
    """command → [(spellings of one option, hidden)] of the real CLI (global options under '')."""
    import typer

    from shardtune.cli import app

    group = typer.main.get_command(app)

    def options(command) -> list[tuple[list[str], bool]]:
        found = [
            ([*p.opts, *p.secondary_opts], p.hidden) for p in command.params if p.param_type_name == "option"
        ]
        return [*found, (["--help"], True)]

    return {"": options(group), **{name: options(c) for name, c in group.commands.items()}}


def fenced_blocks(text: str) -> list[tuple[int, str, str]]:
    """(first line number, language, body) of each fenced block, fences paired in order."""
    found, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        if lines[i].startswith("```"):
            language, start = lines[i][3:].strip(), i + 1
            end = next(j for j in range(start, len(lines)) if lines[j].startswith("```"))
            found.append((start + 1, language, "\n".join(lines[start:end])))
            i = end
        i += 1
    return found


def documented_commands() -> list[tuple[str, str]]:
    """(where, command text) of every `shardtune …` in inline code, shell blocks and text blocks."""
    found = []
    for page in PAGES:
        text = page.read_text()
        where = page.relative_to(ROOT)
        for m in INLINE.finditer(text):
            found.append((f"{where}:{text[: m.start()].count(chr(10)) + 1}", m.group(1)))
        for first, language, body in fenced_blocks(text):
            if language not in ("bash", "sh", "text", ""):
                continue
            for i, line in enumerate(body.splitlines()):
                for part in re.split(r"[|;&]|\$\(", line.split(" #")[0]):
                    part = part.strip()
                    if part.startswith(("shardtune ", "exec shardtune ")):
                        found.append((f"{where}:{first + i}", part.removeprefix("exec ")))
    return found


def test_every_documented_command_and_option_exists():
    commands = cli_commands()
    documented = documented_commands()
    assert len(documented) > 60
    wrong = []
    for where, text in documented:
        plain = re.sub(r"\"[^\"]*\"|'[^']*'", " ", text).replace("\\|", " ")  # quoted values are not options
        words = plain.replace("[", " ").replace("]", " ").split()
        name = next((w for w in words[1:] if not w.startswith("-")), "")
        if name not in commands:
            if name.isupper() or name in ("", "..."):  # `shardtune --offline COMMAND`
                continue
            wrong.append(f"{where}: no command {name!r} in `{text}`")
            continue
        known = {o for spellings, _ in [*commands[""], *commands[name]] for o in spellings}
        for option in TOKEN.findall(plain):
            option = option.split("=")[0]
            if option not in known:
                wrong.append(f"{where}: `shardtune {name}` has no option {option} (in `{text}`)")
    assert not wrong, "\n".join(wrong)


def test_cli_md_lists_every_option_of_every_command():
    table = (ROOT / "docs" / "cli.md").read_text()
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `shardtune (\w+).*$", table, re.M)}
    missing = []
    for name, options in cli_commands().items():
        if not name:
            continue
        assert name in rows, f"docs/cli.md has no row for `shardtune {name}`"
        for spellings, hidden in options:
            listed = any(re.search(rf"{re.escape(o)}(?![\w-])", rows[name]) for o in spellings)
            if not hidden and not listed:
                missing.append(f"shardtune {name} {spellings[0]}")
    assert not missing, "docs/cli.md misses: " + ", ".join(missing)
