"""Mixtures (``data.sources``): several sources mixed by weight or by count, deterministic under
``data.seed``, each holding out its own examples (never trained on), reachable by ``--set``, and
one-line errors that name the source."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import yaml
from conftest import resumed_and_uninterrupted, tiny_recipe
from typer.testing import CliRunner

from shardtune.cli import app
from shardtune.data.examples import load_examples
from shardtune.recipe.schema import apply_override, recipe_from_dict

runner = CliRunner()


def records(tmp_path: Path, name: str, n: int, tag: str, sharegpt: bool = False) -> str:
    path = tmp_path / name
    if sharegpt:
        rows = [
            {
                "conversations": [
                    {"from": "human", "value": f"{tag} q{i}"},
                    {"from": "gpt", "value": f"{tag} a{i}"},
                ]
            }
            for i in range(n)
        ]
    else:
        rows = [{"prompt": f"{tag} q{i} =", "completion": f" {tag}{i}"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def tag_of(example) -> str:
    text = example.prompt or example.messages[0][1]
    return text.split()[0]


def data_section(tmp_path: Path, sources: list[dict], **data) -> dict:
    raw = tiny_recipe(tmp_path, data={"task": None, "sources": sources})
    del raw["data"]["task"], raw["data"]["eval_samples"]  # (the single source's keys)
    raw["data"].update(data)
    return raw


def test_weights_set_the_shares_of_the_largest_mixture_that_uses_no_example_twice(tmp_path):
    sources = [
        {"path": records(tmp_path, "a.jsonl", 300, "A"), "weight": 3, "eval_samples": 20},
        {"path": records(tmp_path, "b.jsonl", 100, "B"), "weight": 1, "eval_samples": 20},
    ]
    recipe = recipe_from_dict(data_section(tmp_path, sources))
    said = []
    train, held = load_examples(recipe.data, said.append)
    # A: 280 left to train, B: 80; p = 3/4, 1/4; N = min(280 / 0.75, 80 / 0.25) = 320 → 240 + 80
    assert Counter(tag_of(e) for e in train) == {"A": 240, "B": 80}
    assert Counter(tag_of(e) for e in held) == {"A": 20, "B": 20}
    assert len(set(train)) == len(train) and not set(train) & set(held)  # no repeat, never held out
    assert (
        said[0].startswith("data.sources.0: ")
        and "240 training examples (75.0% of the mixture; weight 3)" in said[0]
    )
    assert "80 training examples (25.0% of the mixture; weight 1), 20 held out" in said[1]
    again, held_again = load_examples(recipe.data)
    assert again == train and held_again == held  # deterministic: a resumed run sees the same mixture
    assert [tag_of(e) for e in train[:40]].count("B") not in (0, 40)  # shuffled together
    reseeded, _ = load_examples(recipe_from_dict(data_section(tmp_path, sources, seed=1)).data)
    assert reseeded != train and Counter(tag_of(e) for e in reseeded) == {"A": 240, "B": 80}


def test_num_samples_repeats_a_small_source_in_whole_passes_and_tasks_generate_it(tmp_path):
    sources = [
        {"path": records(tmp_path, "few.jsonl", 10, "F"), "num_samples": 20, "eval_samples": 2},
        {"task": "repeat", "num_samples": 30, "eval_samples": 5},
        {"path": records(tmp_path, "all.jsonl", 12, "G"), "eval_samples": 2},
    ]
    train, held = load_examples(recipe_from_dict(data_section(tmp_path, sources)).data)
    few = Counter(e for e in train if tag_of(e) == "F")
    assert sum(few.values()) == 20 and len(few) == 8 and set(few.values()) == {2, 3}  # 2 passes + 4
    assert sum(1 for e in train if tag_of(e) == "G") == 10  # neither: all of its training examples
    assert len(train) == 20 + 30 + 10 and len(held) == 2 + 5 + 2
    assert not {e for e in train if tag_of(e) in ("F", "G")} & set(
        held
    )  # (a task draws its own, from another seed)


def test_a_source_read_twice_never_trains_on_what_the_other_holds_out(tmp_path):
    path = records(tmp_path, "same.jsonl", 50, "S")
    # the same shuffle: source 1 holds out the first 20 records, source 0 only the first 10
    sources = [{"path": path, "eval_samples": 10}, {"path": path, "eval_samples": 20, "weight": 1}]
    said = []
    train, held = load_examples(recipe_from_dict(data_section(tmp_path, sources, seed=3)).data, said.append)
    assert not set(train) & set(held)
    assert said[-1] == "data.sources: 10 training examples equal to held-out ones of another source left out"
    assert len(train) == 40 - 10 + 30


def test_set_reaches_a_source_by_its_index_and_switching_source_drops_the_mixture(tmp_path):
    raw = data_section(tmp_path, [{"task": "repeat"}, {"task": "reverse", "weight": 1.0}])
    apply_override(raw, "data.sources.1.weight=0.3")
    apply_override(raw, "data.sources.0.num_samples=40")
    apply_override(raw, "data.sources.2.task=reverse")  # the next index adds a source
    recipe = recipe_from_dict(raw)
    assert recipe.data.sources[1].weight == 0.3 and recipe.data.sources[0].num_samples == 40
    assert recipe.data.sources[2].task == "reverse"
    with pytest.raises(Exception, match=r"data.sources: has 3 items \(0 to 2\); 5 would leave a gap"):
        apply_override(raw, "data.sources.5.weight=1")
    with pytest.raises(Exception, match=r"data.sources: is a list; name an item by its index"):
        apply_override(raw, "data.sources.first.weight=1")
    note = apply_override(raw, "data.task=repeat")
    assert "sources" not in raw["data"] and "data.sources" in note
    assert recipe_from_dict(raw).data.task == "repeat"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"weight": 0}, "error: data.sources.1.weight: "),
        ({"weight": -1.5}, "error: data.sources.1.weight: "),
        ({"path": "EMPTY"}, "error: data.sources.1.path: "),
        ({"path": "MISSING"}, "error: data.sources.1.path: "),
        ({"path": "BROKEN"}, "error: data.sources.1.path: "),
        ({"task": "repeat"}, "error: data.sources.1: set exactly one of task, path or hub"),
        ({"eval_samples": 500}, "error: data.sources.1.eval_samples: 500 is not less than"),
        ({"weight": 1, "num_samples": 3}, "error: data.sources.1.weight: set weight"),
        ({"weight": 1e-6}, "error: data.sources.1.weight: 1e-06 gives this source no example"),
        ({"format": "alpaca"}, "error: data.sources.1.path: "),
    ],
    ids=["zero", "negative", "empty", "missing", "broken", "two", "held", "both", "tiny", "format"],
)
def test_a_bad_source_is_one_line_naming_it_and_no_run_directory(tmp_path, change, message):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "broken.jsonl").write_text('{"prompt": "q", "completion": "a"}\n{"prompt": \n')
    second = {"path": records(tmp_path, "b.jsonl", 40, "B"), "weight": 1.0}
    for key, value in change.items():
        second[key] = {"EMPTY": str(tmp_path / "empty.jsonl"), "MISSING": str(tmp_path / "no.jsonl"),
                       "BROKEN": str(tmp_path / "broken.jsonl")}.get(value, value)  # fmt: skip
    first = {"path": records(tmp_path, "a.jsonl", 200, "A"), "weight": 1000.0}
    recipe = data_section(tmp_path, [first, second])
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    result = runner.invoke(app, ["train", str(tmp_path / "r.yaml")])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(message), errors
    assert "Traceback" not in result.output and not (tmp_path / "run").exists()


def test_keys_of_a_single_source_are_refused_beside_a_mixture(tmp_path):
    for key, value in (("format", "text"), ("path", "x.jsonl"), ("eval_samples", 3), ("num_samples", 10)):
        raw = data_section(tmp_path, [{"task": "repeat"}], **{key: value})
        with pytest.raises(Exception, match=rf"^data.{key}: "):
            recipe_from_dict(raw)


def test_a_mixture_of_a_sharegpt_file_and_a_task_trains_and_says_what_it_took(tmp_path):
    sources = [
        {"path": records(tmp_path, "chats.jsonl", 60, "C", sharegpt=True), "weight": 1.0, "eval_samples": 8},
        {"task": "repeat", "num_samples": 40, "eval_samples": 8},
    ]
    recipe = data_section(tmp_path, sources)
    recipe["train"].update({"max_steps": 3})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    result = runner.invoke(app, ["train", str(tmp_path / "r.yaml"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["steps"] == 3
    assert (
        "data.sources.0: " in result.stderr
        and "52 training examples (56.5% of the mixture; weight 1)" in result.stderr
    )
    assert "data.sources.1: repeat: 40 training examples" in result.stderr
    saved = yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())
    assert [s.get("weight") for s in saved["data"]["sources"]] == [1.0, None]


def test_a_resumed_mixture_continues_exactly(tmp_path):

    import torch

    sources = [
        {"path": records(tmp_path, "a.jsonl", 60, "A"), "weight": 2.0, "eval_samples": 4},
        {"task": "repeat", "num_samples": 24, "eval_samples": 4},
    ]

    def recipe(where):
        raw = data_section(where, sources)
        raw["train"].update({"max_steps": 8, "save_every": 4, "batch_size": 4})
        return recipe_from_dict(raw)

    again, final = resumed_and_uninterrupted(recipe, tmp_path, checkpoint=4)
    assert again.keys() == final.keys() and all(torch.equal(again[k], final[k]) for k in final)
