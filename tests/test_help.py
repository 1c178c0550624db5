"""`--help` of every command, as a user reads it in a pipe at 80 columns: plain text in words, whole."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer.core
import typer.main

from shardtune.cli import app
from shardtune.cli.help import METAVAR, is_flag, value_word

GROUP = typer.main.get_command(app)
COMMANDS = list(GROUP.commands)
WIDTH = 80
BOXES = set("─│╭╮╰╯┃━┏┓┗┛")
PYTHON_TYPES = re.compile(
    r"<(str|int|float|bool|path|text|int range|float range)>|list\[|\{[A-Z_]+\}|INTEGER|TEXT\b"
)


def help_in_a_pipe(*args: str) -> str:
    env = {**os.environ, "COLUMNS": str(WIDTH), "TERM": "dumb"}
    env.pop("FORCE_COLOR", None)
    done = subprocess.run(
        [sys.executable, "-m", "shardtune", *args, "--help"], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0 and done.stderr == "", done.stderr
    return done.stdout


def words(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def helps() -> dict[str, str]:
    return {name: help_in_a_pipe(*([name] if name else [])) for name in ["", *COMMANDS]}


@pytest.mark.parametrize("name", ["", *COMMANDS])
def test_help_is_plain_text_within_80_columns(helps, name):
    text = helps[name]
    assert text.startswith(f"Usage: shardtune {name}".rstrip() + " ")
    assert not BOXES & set(text), "box drawing in a pipe"
    assert "…" not in text
    assert not PYTHON_TYPES.search(text), PYTHON_TYPES.search(text).group(0)
    assert max(len(line) for line in text.splitlines()) <= WIDTH
    assert "\x1b[" not in text  # no colours in a pipe


@pytest.mark.parametrize("name", COMMANDS)
def test_every_option_has_help_and_a_value_word(name):
    command = GROUP.commands[name]
    ctx = command.make_context(name, [], resilient_parsing=True)
    for param in command.get_params(ctx):
        if isinstance(param, typer.core.TyperOption):
            assert param.help, f"{name} {param.opts[0]} has no help"
        if not is_flag(param):
            assert METAVAR.match(value_word(param)), f"{name} {param.name}: {value_word(param)!r}"


def test_flags_are_bare_and_values_show_their_word(helps):
    assert re.search(r"^  --dry-run +Validate", helps["train"], re.M)
    assert re.search(r"^  --nproc N +Processes", helps["train"], re.M)
    assert re.search(r"^  -r, --rank RANK +adapter.rank", helps["params"], re.M)
    assert re.search(r"^  -o, --out DIR +", helps["merge"], re.M)
    assert re.search(r"^Usage: shardtune train \[OPTIONS\] RECIPE$", helps["train"], re.M)
    assert re.search(r"^Usage: shardtune init \[OPTIONS\] NAME \[PATH\]$", helps["init"], re.M)
    assert "--double-quant / --no-double-quant" in helps["params"]


def test_the_command_list_gives_each_first_sentence_whole(helps):
    listing = words(helps[""].split("Commands:", 1)[1])
    for name in COMMANDS:
        first_paragraph = GROUP.commands[name].help.strip().split("\n\n")[0]  # the whole of it, however long
        assert f"{name} {words(first_paragraph)}" in listing


def description(text: str) -> list[list[str]]:
    """The paragraphs between the usage line and the first section, as lists of lines."""
    body = text.split("\n\n", 1)[1]
    body = re.split(r"\n\n(?=[A-Z][a-z]+:\n)", body)[0]
    return [p.splitlines() for p in body.split("\n\n")]


@pytest.mark.parametrize("name", COMMANDS)
def test_descriptions_are_paragraphs_wrapped_whole(helps, name):
    """Every paragraph of the docstring is there, its words in order, filled greedily: no line is cut
    short where the next word would have fit (the ragged `4 a process` / `of a run` of before)."""
    text = helps[name]
    for paragraph in (GROUP.commands[name].help or "").strip().split("\n\n"):
        assert words(paragraph) in words(text)
    for lines in description(text):
        for line, following in zip(lines, lines[1:], strict=False):
            assert len(line) + 1 + len(following.split()[0]) > WIDTH - 2, (line, following)


def test_a_dropped_help_text_is_caught():
    """The option check fails on an option without help (the check itself, on a copy)."""
    command = GROUP.commands["params"]
    param = next(p for p in command.params if p.name == "trust_remote_code")
    saved, param.help = param.help, None
    try:
        with pytest.raises(AssertionError):
            test_every_option_has_help_and_a_value_word("params")
    finally:
        param.help = saved


def test_docs_list_every_command():
    cli_doc = (Path(__file__).parents[1] / "docs" / "cli.md").read_text(encoding="utf-8")
    missing = [name for name in COMMANDS if f"shardtune {name}" not in cli_doc]
    assert missing == []
