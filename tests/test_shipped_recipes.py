"""The shipped recipes: listed, copied with `init` (never over a file shardtune did not write), and
read by name wherever a recipe file is read."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from shardtune.cli import app
from shardtune.recipe.schema import load_recipe
from shardtune.recipe.shipped import INIT_MARK, SHIPPED_DIR, recipe_path, shipped_recipes

ROOT = Path(__file__).parents[1]
runner = CliRunner()


@pytest.fixture
def in_tmp(tmp_path):
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        yield tmp_path
    finally:
        os.chdir(cwd)


def test_the_package_holds_the_repository_recipes_folder():
    """One source: the package's shipped folder is recipes/ itself (no second copy to drift)."""
    assert SHIPPED_DIR.resolve() == (ROOT / "recipes").resolve()
    assert set(shipped_recipes()) == {p.stem for p in (ROOT / "recipes").glob("*.yaml")}


def test_every_shipped_recipe_is_valid_and_says_what_it_is_for():
    for name, recipe in shipped_recipes().items():
        first = recipe.path.read_text(encoding="utf-8").splitlines()[0]
        assert first.startswith("# ") and recipe.summary == first[2:].strip(), name
        assert 20 <= len(recipe.summary) <= 100 and recipe.summary.endswith("."), name
        loaded = load_recipe(name)  # by name
        assert loaded.model.name == recipe.model and loaded.adapter.method == recipe.method


def test_recipes_lists_name_model_method_and_summary():
    result = runner.invoke(app, ["recipes"])
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["name", "model", "method", "summary"]
    row = next(line for line in lines if line.startswith("quickstart "))
    assert row.split()[:3] == ["quickstart", "smollm2-135m-instruct", "fossil"]
    assert row.endswith(shipped_recipes()["quickstart"].summary)
    assert len(lines) == 1 + len(shipped_recipes())
    listed = json.loads(runner.invoke(app, ["recipes", "--json"]).stdout)
    assert listed["tiny"] == {
        "model": "tiny-llama",
        "method": "fossil",
        "summary": shipped_recipes()["tiny"].summary,
        "path": str(SHIPPED_DIR / "tiny.yaml"),
    }


def test_init_writes_a_copy_to_edit(in_tmp):
    result = runner.invoke(app, ["init", "tiny"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "tiny.yaml"  # the default path: NAME.yaml here
    assert "train it with: shardtune train tiny.yaml" in result.stderr
    text = (in_tmp / "tiny.yaml").read_text()
    assert text.startswith(INIT_MARK + "tiny:") and text.endswith(
        (ROOT / "recipes" / "tiny.yaml").read_text()
    )
    assert yaml.safe_load(text) == yaml.safe_load((ROOT / "recipes" / "tiny.yaml").read_text())

    (in_tmp / "configs").mkdir()
    result = runner.invoke(app, ["init", "quickstart.yaml", "configs", "--json", "-q"])
    assert result.exit_code == 0 and result.stderr == ""
    assert json.loads(result.stdout) == {"recipe": "quickstart", "path": "configs/quickstart.yaml"}
    assert load_recipe("configs/quickstart.yaml").data.task == "date_format"


def test_init_replaces_only_its_own_copy_and_only_when_asked(in_tmp):
    assert runner.invoke(app, ["init", "tiny", "r.yaml"]).exit_code == 0
    (in_tmp / "r.yaml").write_text((in_tmp / "r.yaml").read_text() + "# my edit\n")
    refused = runner.invoke(app, ["init", "tiny", "r.yaml"])
    assert refused.exit_code == 2 and "--overwrite" in refused.stderr
    assert (in_tmp / "r.yaml").read_text().endswith("# my edit\n")
    assert runner.invoke(app, ["init", "lors-tiny", "r.yaml", "--overwrite"]).exit_code == 0
    assert load_recipe("r.yaml").adapter.method == "lors"

    mine = in_tmp / "mine.yaml"
    mine.write_text("model: {name: tiny-llama}\n")
    for args in (["init", "tiny", "mine.yaml"], ["init", "tiny", "mine.yaml", "--overwrite"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and result.stderr.count("\n") == 1
        assert "mine.yaml" in result.stderr
    assert mine.read_text() == "model: {name: tiny-llama}\n"

    (in_tmp / "link.yaml").symlink_to(mine)
    result = runner.invoke(app, ["init", "tiny", "link.yaml", "--overwrite"])
    assert result.exit_code == 2 and "symbolic link" in result.stderr
    assert mine.read_text() == "model: {name: tiny-llama}\n"

    result = runner.invoke(app, ["init", "tiny", "no/such/dir/r.yaml"])
    assert result.exit_code == 2 and "does not exist" in result.stderr
    result = runner.invoke(app, ["init", "nonesuch"])
    assert result.exit_code == 2 and "not a shipped recipe" in result.stderr and "quickstart" in result.stderr
    assert sorted(p.name for p in in_tmp.iterdir()) == ["link.yaml", "mine.yaml", "r.yaml"]


def test_a_file_wins_over_a_shipped_name(in_tmp):
    (in_tmp / "tiny").write_text(
        (ROOT / "recipes" / "tiny.yaml").read_text().replace("tiny-llama", "tiny-gpt2")
    )
    assert recipe_path("tiny") == Path("tiny")
    assert load_recipe("tiny").model.name == "tiny-gpt2"
    assert recipe_path("quickstart") == SHIPPED_DIR / "quickstart.yaml"
    assert recipe_path("quickstart.yaml") == SHIPPED_DIR / "quickstart.yaml"
    assert recipe_path("./quickstart") == Path("./quickstart")  # a path is a path
    assert recipe_path("sub/quickstart.yaml") == Path("sub/quickstart.yaml")


def test_train_and_compare_take_a_shipped_name(in_tmp):
    result = runner.invoke(app, ["train", "tiny", "--dry-run", "--json", "--set", "train.max_steps=3"])
    assert result.exit_code == 0, result.output
    resolved = json.loads(result.stdout)
    assert resolved["model"]["name"] == "tiny-llama" and resolved["train"]["max_steps"] == 3
    missing = runner.invoke(app, ["train", "tinyy", "--dry-run"])
    assert missing.exit_code == 2
    assert (
        missing.stderr.strip()
        == "error: tinyy: recipe file not found (nor a shipped recipe's name: see `shardtune recipes`)"
    )
    listed = runner.invoke(app, ["routing", "tiny", "--json"])
    assert listed.exit_code == 0, listed.output
