"""Tokenize once (``data.tokenized_cache``, ``data.num_proc``): a second run reads its token rows from
the cache; anything the rows depend on changes the key; a damaged entry is tokenized again and
replaced; several processes tokenize to the same rows."""

from __future__ import annotations

import os

import pytest
import yaml
from conftest import tiny_recipe
from typer.testing import CliRunner

from shardtune.cli import app
from shardtune.core.fileio import MARKER
from shardtune.data import tokenized
from shardtune.data.examples import Example
from shardtune.data.tokenized import encode_cached
from shardtune.models.loading import byte_tokenizer

runner = CliRunner()
EXAMPLES = [Example(f"q{i} " + "z" * (i % 7), f" a{i}" * (1 + i % 3)) for i in range(40)] + [
    Example(messages=(("user", "hi"), ("assistant", "hello"), ("user", "bye"), ("assistant", "ciao")))
]


def encoded(cache, tokenizer=None, **options):
    settings = {"max_length": 40, "chat": True, "assistant_turns": "all", **options}
    return encode_cached(EXAMPLES, tokenizer or byte_tokenizer(), cache=cache, **settings)


def test_the_second_call_reads_the_rows_without_tokenizing(tmp_path, monkeypatch):
    rows, truncated, cached = encoded(tmp_path)
    assert not cached and truncated > 0 and 0 < len(rows) <= len(EXAMPLES)
    assert len(list(tmp_path.iterdir())) == 1  # one entry, no staging directory left

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(tokenized, "encode_all", no_tokenizing)
    again, truncated_again, cached = encoded(tmp_path)
    assert cached and again == rows and truncated_again == truncated


@pytest.mark.parametrize(
    "change",
    ["max_length", "chat", "assistant_turns", "template", "tokenizer", "examples"],
)
def test_everything_the_rows_depend_on_is_in_the_key(tmp_path, change):
    encoded(tmp_path)
    tokenizer, options = byte_tokenizer(), {}
    if change == "max_length":
        options["max_length"] = 41
    elif change == "chat":
        options["chat"] = False
    elif change == "assistant_turns":
        options["assistant_turns"] = "last"
    elif change == "template":
        tokenizer.chat_template = tokenizer.chat_template.replace("<|", "<<|")
    elif change == "tokenizer":
        tokenizer.add_special_tokens({"additional_special_tokens": ["<extra>"]})
    if change == "examples":
        EXAMPLES.append(Example("one more", " example"))
        try:
            _, _, cached = encoded(tmp_path)
        finally:
            EXAMPLES.pop()
    else:
        _, _, cached = encoded(tmp_path, tokenizer, **options)
    assert not cached and len(list(tmp_path.iterdir())) == 2


def test_a_damaged_entry_is_tokenized_again_and_replaced(tmp_path):
    rows, _, _ = encoded(tmp_path)
    (entry,) = tmp_path.iterdir()
    data = (entry / tokenized.ROWS_FILE).read_bytes()
    (entry / tokenized.ROWS_FILE).write_bytes(data[: len(data) // 2])
    said = []
    again, _, cached = encoded(tmp_path, warn=said.append)
    assert not cached and again == rows
    assert len(said) == 1 and said[0].startswith(f"tokenized data cache {entry} does not read back")
    assert encoded(tmp_path)[2]  # replaced: read back whole now


def test_a_damaged_look_alike_without_the_caches_marker_is_never_replaced(tmp_path):
    """A directory at an entry's place that shardtune cannot show it wrote (no marker of its own) is
    read, found wanting, and left exactly as it is: the rows are tokenized for this run alone."""
    rows, _, _ = encoded(tmp_path)
    (entry,) = tmp_path.iterdir()
    (entry / MARKER).unlink()
    (entry / tokenized.ROWS_FILE).write_bytes(b"the user's bytes")
    (entry / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in entry.iterdir()}
    said = []
    again, _, cached = encoded(tmp_path, warn=said.append)
    assert not cached and again == rows
    assert {p.name: p.read_bytes() for p in entry.iterdir()} == before
    assert said[-1] == f"tokenized data cache {entry} is not shardtune's (no marker of its own): left alone"


def test_a_cache_that_cannot_be_written_only_warns(tmp_path):
    if os.geteuid() == 0:
        blocked = tmp_path / "file"
        blocked.write_text("not a directory")  # (root ignores permissions: a file where the directory goes)
    else:
        blocked = tmp_path / "ro"
        blocked.mkdir(mode=0o500)
    said = []
    rows, _, cached = encoded(blocked / "cache" if blocked.is_file() else blocked, warn=said.append)
    assert not cached and len(rows) > 0
    assert len(said) == 1 and said[0].startswith("could not cache the tokenized data in ")


def test_several_processes_tokenize_the_same_rows():
    one, n_one, _ = encoded(None)
    four, n_four, _ = encoded(None, num_proc=4)
    assert four == one and n_four == n_one


def test_a_second_run_reads_its_rows_from_the_cache_and_the_option_turns_it_off(tmp_path, monkeypatch):
    monkeypatch.setenv("SHARDTUNE_CACHE", str(tmp_path / "cache"))
    recipe = tiny_recipe(tmp_path, train={"max_steps": 1})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    first = runner.invoke(app, ["train", str(tmp_path / "r.yaml"), "--set", "output.overwrite=true"])
    assert first.exit_code == 0, first.output
    assert "from the cache" not in first.stderr
    assert len(list((tmp_path / "cache" / "tokenized").iterdir())) == 2  # training and held-out rows
    second = runner.invoke(app, ["train", str(tmp_path / "r.yaml"), "--set", "output.overwrite=true"])
    assert second.exit_code == 0, second.output
    assert "token rows of the training and held-out examples from the cache" in second.stderr
    off = tmp_path / "off"
    off.mkdir()
    monkeypatch.setenv("SHARDTUNE_CACHE", str(off / "cache"))
    third = runner.invoke(
        app,
        [
            "train",
            str(tmp_path / "r.yaml"),
            "--set",
            "output.overwrite=true",
            "--set",
            "data.tokenized_cache=false",
        ],
    )
    assert third.exit_code == 0, third.output
    assert not (off / "cache" / "tokenized").exists()


def test_a_recipe_whose_training_rows_are_empty_fails_before_tokenizing_the_held_out_ones(
    tmp_path, monkeypatch
):
    """A large held-out set (here 20,000 generated items) is not tokenized for a run that cannot
    start: the training rows are checked first."""
    from shardtune.training import loop

    seen = []
    real = loop.encode_cached

    def counting(examples, *args, **kwargs):
        seen.append(len(examples))
        return real(examples, *args, **kwargs)

    monkeypatch.setattr(loop, "encode_cached", counting)
    recipe = tiny_recipe(tmp_path, data={"task": "sort", "eval_samples": 20_000, "max_length": 24})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    result = runner.invoke(app, ["train", str(tmp_path / "r.yaml"), "--set", "data.tokenized_cache=false"])
    assert (
        result.exit_code == 2
        and "error: data.max_length: 24 tokens leave no training example" in result.stderr
    )
    assert seen == [128]  # the training examples only
