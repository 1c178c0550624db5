"""Help as plain text in users' words: ``--help`` is a text to read whole, in a terminal or a pipe.

Options show the word a value stands for (``--rank RANK``, ``--out DIR``), never a Python type; a
yes/no option is a bare flag; arguments are named as the usage line names them; every command's one
line in ``shardtune --help`` is its whole first sentence (wrapped, never cut with ``…``); paragraphs are
wrapped to the terminal's width (80 columns in a pipe) without breaking a hyphenated word, and
nothing is drawn in boxes.
"""

from __future__ import annotations

import re

import typer._click._textwrap
import typer.core


class _WholeWords(typer._click._textwrap.TextWrapper):
    """The help's wrapper (typer's copy of click's), never breaking a line inside a hyphenated word:
    `peft-lora`, `--max-lora-rank` and `low-rank` stay whole (and can be copied whole)."""

    def __init__(self, *args, **kwargs):
        kwargs["break_on_hyphens"] = False
        super().__init__(*args, **kwargs)


# (typer's wrap_text imports its TextWrapper from there at each call)
typer._click._textwrap.TextWrapper = _WholeWords

# What a value placeholder may look like: words in capitals (RANK, KEY=VALUE, A,B) or a list of the
# literal choices (peft|shardtune).
METAVAR = re.compile(r"^([A-Z][A-Z0-9_]*([=,:/.-][A-Z0-9_.]*)*|[a-z0-9_:./-]+(\|[a-z0-9_:./-]+)+)$")


# One word for the same value everywhere (an option or argument that sets ``metavar`` itself wins).
WORDS = {
    "--adapter": "RUN",
    "--base-model": "MODEL",
    "--base-weights": "original|dequantized|auto",
    "--budgets": "B,B,...",
    "--data": "PATH",
    "--dtype": "fp32|bf16|fp16",
    "--format": "FORMAT",
    "--metric": "exact|contains",
    "--launch-args": "FLAGS",
    "--layers": "N",
    "--max-new-tokens": "N",
    "--methods": "M,M,...",
    "--model": "MODEL",
    "--nproc": "N",
    "--out": "DIR",
    "--pattern": "N:M",
    "--plot": "PNG",
    "--quantize": "nf4|fp4|int8",
    "--rank": "RANK",
    "--recipe": "RECIPE",
    "--resume-from": "DIR",
    "--samples": "N",
    "--sparsity": "FRACTION",
    "--targets": "NAMES",
    "--temperature": "T",
    "run_dir": "RUN",
    "target": "RUN",
    "model": "MODEL",
    "prompt": "PROMPT",
}


def value_word(param) -> str:
    """The placeholder of an option's or argument's value, in words: its own metavar, else the
    vocabulary's word for its name, else the name in capitals."""
    if param.metavar:
        return param.metavar
    for name in [*getattr(param, "opts", []), param.name]:
        if name in WORDS:
            return WORDS[name]
    return (param.name or "VALUE").upper()


def is_flag(param) -> bool:
    return bool(getattr(param, "is_flag", False) or getattr(param, "count", False))


def option_names(param) -> str:
    """``-r, --rank RANK``; a flag with a negative form: ``--double-quant / --no-double-quant``."""
    names = ", ".join(sorted(param.opts, key=lambda o: (o.startswith("--"), o)))
    if param.secondary_opts:
        names += " / " + ", ".join(param.secondary_opts)
    return names if is_flag(param) else f"{names} {value_word(param)}"


def option_help(param, ctx) -> str:
    """The help text with typer's notes (default, range, required) and no type name."""
    record = param.get_help_record(ctx)
    return record[1] if record else ""


def first_paragraph(text: str) -> str:
    """The first paragraph of a docstring, whole, as one line."""
    paragraph = text.strip().split("\n\n")[0]
    return " ".join(line.strip() for line in paragraph.splitlines())


def usage_pieces(command, ctx) -> list[str]:
    params = command.get_params(ctx)
    pieces = ["[OPTIONS]"] if any(isinstance(p, typer.core.TyperOption) for p in params) else []
    for param in params:
        if isinstance(param, typer.core.TyperArgument):
            word = value_word(param) + ("..." if param.nargs != 1 else "")
            pieces.append(word if param.required else f"[{word}]")
    return pieces


def write_help(command, ctx, formatter, commands: list[tuple[str, str]] | None = None) -> None:
    """Usage, description, arguments, options (and, for the group, the commands), as plain text."""
    pieces = usage_pieces(command, ctx) + (["COMMAND [ARGS]..."] if commands is not None else [])
    formatter.write_usage(ctx.command_path, " ".join(pieces))
    text = (command.help or "").strip()
    if text:
        formatter.write_paragraph()
        with formatter.indentation():
            formatter.write_text(text)
    params = command.get_params(ctx)
    arguments = [
        (value_word(p), option_help(p, ctx))
        for p in params
        if isinstance(p, typer.core.TyperArgument) and not p.hidden
    ]
    options = [
        (option_names(p), option_help(p, ctx))
        for p in params
        if isinstance(p, typer.core.TyperOption) and not p.hidden
    ]
    for title, rows in (("Arguments", arguments), ("Options", options), ("Commands", commands or [])):
        if rows:
            with formatter.section(title):
                formatter.write_dl(rows)


class PlainCommand(typer.core.TyperCommand):
    """A command whose ``--help`` is plain text (:func:`write_help`)."""

    def format_help(self, ctx, formatter) -> None:
        write_help(self, ctx, formatter)


class PlainGroup(typer.core.TyperGroup):
    """The command group: plain ``--help`` listing every command with its whole first sentence."""

    def format_help(self, ctx, formatter) -> None:
        rows = [(name, first_paragraph(self.commands[name].help or "")) for name in self.list_commands(ctx)]
        write_help(self, ctx, formatter, commands=rows)
