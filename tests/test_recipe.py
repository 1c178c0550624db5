"""Recipes: validation, overrides, one-line errors that name the key."""

from __future__ import annotations

import pytest
import yaml
from conftest import tiny_recipe

from shardtune.core.errors import BadInput, RecipeError
from shardtune.recipe.schema import load_recipe, override_notes, recipe_from_dict


def write(tmp_path, raw, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw) if not isinstance(raw, str) else raw)
    return path


def test_valid_recipe_and_defaults(tmp_path):
    recipe = load_recipe(write(tmp_path, tiny_recipe(tmp_path)))
    assert recipe.adapter.method == "lora" and recipe.adapter.rank == 4
    assert recipe.adapter.alpha == 16.0  # default of the lora options
    assert recipe.train.schedule == "cosine"


def test_overrides(tmp_path):
    path = write(tmp_path, tiny_recipe(tmp_path))
    recipe = load_recipe(
        path,
        ["train.lr=2e-4", "adapter.rank=16", "adapter.targets=[q_proj, k_proj]", "train.precision=bf16"],
    )
    assert recipe.train.lr == 2e-4
    assert recipe.adapter.rank == 16
    assert recipe.adapter.targets == ["q_proj", "k_proj"]
    assert recipe.train.precision == "bf16"
    # switching the method switches the options model
    recipe = load_recipe(path, ["adapter.method=fossil", "adapter.mode=mini", "adapter.mini_r=4"])
    assert recipe.adapter.method == "fossil" and recipe.adapter.mini_r == 4


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["adapter.rank=-3"], "adapter.rank: must be a positive integer, got -3"),
        (["adapter.rank=abc"], "adapter.rank: must be an integer, got 'abc'"),
        (["adapter.rnak=4"], "adapter.rnak: unknown key (did you mean 'rank'?)"),
        (["train.lr=0"], "train.lr: must be greater than 0, got 0"),
        (["train.lr=fast"], "train.lr: must be a number, got 'fast'"),
        (
            ["train.schedule=cosin"],
            "train.schedule: must be one of 'cosine', 'linear' or 'constant', got 'cosin'",
        ),
        (
            ["adapter.method=dora"],
            "adapter.method: unknown method 'dora'; available: lora, fossil, mos, sharelora, lors",
        ),
        (["adapter.dropout=1.5"], "adapter.dropout: must be less than 1, got 1.5"),
        (["adapter.mode=mini"], "adapter.mode: unknown key"),  # lora has no mode
        (["trian.lr=1"], "trian: unknown key (did you mean 'train'?)"),
        (["model.name=null"], "model.name: must be a string, got None"),
        (["data.task=null"], "data: set exactly one of data.task, data.path, data.hub or data.sources"),
        (["train=3"], "train: must be a section (a mapping of keys), got 3"),
        (["train.cpu=maybe"], "train.cpu: must be true or false, got 'maybe'"),
    ],
)
def test_bad_values_name_the_key(tmp_path, overrides, message):
    path = write(tmp_path, tiny_recipe(tmp_path))
    with pytest.raises(RecipeError) as err:
        load_recipe(path, overrides)
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)
    assert err.value.exit_code == 2


def test_missing_sections_and_method(tmp_path):
    raw = tiny_recipe(tmp_path)
    del raw["model"]
    with pytest.raises(RecipeError, match=r"^model: required key is missing"):
        recipe_from_dict(raw)
    raw = tiny_recipe(tmp_path)
    del raw["adapter"]["method"]
    with pytest.raises(
        RecipeError,
        match=r"^adapter.method: required key is missing; one of: lora, fossil, mos, sharelora, lors",
    ):
        recipe_from_dict(raw)


@pytest.mark.parametrize(
    "content, message",
    [
        ("model: [unclosed", "invalid YAML at line 1"),
        ("- a\n- b\n", "a recipe must be a mapping of sections, got list"),
    ],
)
def test_bad_files(tmp_path, content, message):
    with pytest.raises(BadInput, match=message):
        load_recipe(write(tmp_path, content))


def test_missing_and_binary_files(tmp_path):
    with pytest.raises(BadInput, match=r"nope.yaml: recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
    path = tmp_path / "bin.yaml"
    path.write_bytes(b"\xff\xfe\x00model")
    with pytest.raises(BadInput, match="not a UTF-8 text file"):
        load_recipe(path)


@pytest.mark.parametrize("item", ["train.lr", "=3", "train..lr=3"])
def test_bad_override_syntax(tmp_path, item):
    with pytest.raises(BadInput, match=r"--set .*expected KEY=VALUE"):
        load_recipe(write(tmp_path, tiny_recipe(tmp_path)), [item])


def test_shipped_recipes_validate():
    from pathlib import Path

    recipes = sorted(Path(__file__).parents[1].glob("recipes/*.yaml"))
    assert recipes
    for path in recipes:
        load_recipe(path)


def test_recipe_reference_doc_is_current():
    from pathlib import Path

    from shardtune.recipe.schema import recipe_reference_markdown

    doc = Path(__file__).parents[1] / "docs" / "recipe-reference.md"
    assert doc.read_text() == recipe_reference_markdown() + "\n", "run `make docs`"


def test_set_data_source_switches_source(tmp_path):
    """``--set data.path=...`` on a task recipe trains on the file: the task and the keys only it
    uses are dropped, and a note says so (as ``adapter.method=`` does for the old method's keys)."""
    path = write(tmp_path, tiny_recipe(tmp_path))
    recipe = load_recipe(path, ["data.path=x.jsonl"])
    assert (recipe.data.task, recipe.data.path) == (None, "x.jsonl")
    assert "num_samples" not in recipe.data.model_fields_set
    assert override_notes(recipe) == [
        "data.path: dropped data.task, data.num_samples (the recipe's other data source)"
    ]
    recipe = load_recipe(path, ["data.hub=org/ds", "data.revision=v1", "data.task=reverse"])
    assert (recipe.data.task, recipe.data.hub, recipe.data.revision) == ("reverse", None, None)
    assert load_recipe(path, ["data.task=sort"]).data.num_samples == 128  # the same source: kept


def test_numbers_are_read_as_yaml_1_2_reads_them(tmp_path):
    """A leading zero is not octal (``010`` is ten), ``1:30`` is not sexagesimal ninety; ``0o``/``0x``
    are octal/hex; ``2e-4`` is a number."""
    from shardtune.recipe.schema import parse_yaml

    assert [parse_yaml(t) for t in ("010", "0o10", "0x1f", "-5", "1_000", "2e-4")] == [
        10,
        8,
        31,
        -5,
        1000,
        2e-4,
    ]
    assert parse_yaml("1:30") == "1:30"
    raw = tiny_recipe(tmp_path)
    text = yaml.safe_dump(raw).replace("rank: 4", "rank: 010")
    assert load_recipe(write(tmp_path, text)).adapter.rank == 10


def test_set_a_whole_section_says_which_keys_it_dropped(tmp_path):
    path = write(tmp_path, tiny_recipe(tmp_path))
    recipe = load_recipe(path, ["train={lr: 3}"])
    assert recipe.train.lr == 3 and recipe.train.max_steps is None  # the section replaced, as asked
    assert override_notes(recipe) == [
        "--set train={...} replaced the whole section: dropped train.batch_size, train.max_steps, train.seed "
        "(set one key with train.KEY=...)"
    ]
    assert override_notes(load_recipe(path, ["train={lr: 3, max_steps: 2, batch_size: 8, seed: 0}"])) == []
