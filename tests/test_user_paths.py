"""A new user's first paths: switching methods with --set, MoS on the tiny model without tuning its
budget, their own three-line data file, and held-out records never trained on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parents[1]


def run_cli(*args, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "shardtune", *map(str, args)],
        cwd=cwd,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_switching_method_with_set_drops_the_old_methods_keys_and_says_so(tmp_path):
    done = run_cli(
        "train", ROOT / "recipes/tiny.yaml", "--dry-run", "--json", "--set", "adapter.bat=true",
        "--set", "adapter.method=sharelora", "--set", f"output.dir={tmp_path / 'run'}",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    adapter = json.loads(done.stdout)["adapter"]
    assert adapter["method"] == "sharelora"
    notes = [line for line in done.stderr.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "adapter.method=sharelora" in notes[0] and "fossil" in notes[0]
    assert "adapter.bat" in notes[0] and "bat" not in adapter
    # the same switch with no foreign keys says nothing
    quiet = run_cli(
        "train", ROOT / "recipes/tiny.yaml", "--dry-run", "--set", "adapter.method=lora",
        "--set", f"output.dir={tmp_path / 'run'}",
    )  # fmt: skip
    assert quiet.returncode == 0 and "note:" not in quiet.stderr


def test_a_key_of_the_old_method_set_after_the_switch_is_still_an_error(tmp_path):
    done = run_cli(
        "train", ROOT / "recipes/tiny.yaml", "--dry-run", "--set", "adapter.method=lora",
        "--set", "adapter.bat=true",
    )  # fmt: skip
    assert done.returncode == 2 and "adapter.bat" in done.stderr and "Traceback" not in done.stderr


def test_mos_trains_on_the_tiny_recipe_without_choosing_a_budget_and_records_it(tmp_path):
    out = tmp_path / "run"
    done = run_cli(
        "train", ROOT / "recipes/tiny.yaml", "-q", "--set", "adapter.method=mos",
        "--set", "train.max_steps=2", "--set", f"output.dir={out}",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    recorded = yaml.safe_load((out / "recipe.yaml").read_text())["adapter"]
    layers = 2  # tiny-llama: the smallest group of one projection type
    p, r = recorded["private_rank"], recorded["rank"]
    assert recorded["equivalent_rank"] == max(2, p + -(-(r - p) // layers))
    info = json.loads((out / "adapter.json").read_text())
    assert info["options"]["equivalent_rank"] == recorded["equivalent_rank"]


def test_the_own_data_example_is_valid_and_holds_nothing_out():
    from shardtune.data.examples import load_examples
    from shardtune.recipe.schema import load_recipe

    recipe = load_recipe(ROOT / "examples/own-data/recipe.yaml")
    assert recipe.data.eval_samples == 0
    train, held_out = load_examples(recipe.data.model_copy(update={"path": str(ROOT / recipe.data.path)}))
    assert len(train) == 3 and held_out == []


def _trained_rows(recipe_dict: dict, monkeypatch) -> list[str]:
    """Train in-process and return every token row the model saw in training mode."""
    from transformers import LlamaForCausalLM

    from shardtune.models.loading import byte_tokenizer
    from shardtune.recipe.schema import recipe_from_dict
    from shardtune.training.loop import train

    tokenizer = byte_tokenizer()
    seen: list[str] = []
    real = LlamaForCausalLM.forward

    def spy(self, input_ids=None, *a, **kw):
        if self.training:
            seen.extend(tokenizer.batch_decode(input_ids.tolist(), skip_special_tokens=True))
        return real(self, input_ids, *a, **kw)

    monkeypatch.setattr(LlamaForCausalLM, "forward", spy)
    train(recipe_from_dict(recipe_dict))
    return seen


@pytest.mark.parametrize("second_file", [False, True], ids=["held-out-share", "eval_split-file"])
def test_no_held_out_record_is_ever_trained_on(tmp_path, monkeypatch, second_file):
    from conftest import tiny_recipe

    rows = [{"prompt": f"q{i:03d}?", "completion": f"answer-{i:03d}"} for i in range(40)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = {"path": str(tmp_path / "d.jsonl"), "eval_samples": 8}
    if second_file:
        held_rows = [{"prompt": f"h{i:03d}?", "completion": f"held-{i:03d}"} for i in range(8)]
        (tmp_path / "h.jsonl").write_text("".join(json.dumps(r) + "\n" for r in held_rows))
        data["eval_split"] = str(tmp_path / "h.jsonl")
    raw = tiny_recipe(tmp_path, data=data, train={"max_steps": 12, "batch_size": 8}, eval={"every": 4})
    raw["data"].pop("task")
    raw["data"].pop("num_samples")  # (the task's key: refused with a file)
    seen = "\n".join(_trained_rows(raw, monkeypatch))
    from shardtune.data.examples import load_examples
    from shardtune.recipe.schema import recipe_from_dict

    train_examples, held = load_examples(recipe_from_dict(raw).data)
    assert len(held) == 8 and held
    for example in held:
        assert example.completion not in seen, f"held-out {example} was trained on"
    trained = [e for e in train_examples if e.completion in seen]
    assert len(trained) == len(train_examples)  # 12 steps × 8 rows > 32: every training record was seen


def test_examples_without_a_token_to_learn_from_are_left_out_with_a_warning(tmp_path):
    """A record whose prompt fills data.max_length has nothing left to train or score: it is left out,
    and stderr says how many of each kind were; a held-out set left with nothing to score is an error
    (exit 2), not an eval_loss measured on nothing."""
    from conftest import tiny_recipe

    def prompt(i):
        return "x" * 80 if i % 5 == 0 else f"q{i:02d}?"

    rows = [{"prompt": prompt(i), "completion": f"a{i:02d}"} for i in range(40)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = {"task": None, "path": str(tmp_path / "d.jsonl"), "eval_samples": 10}
    raw = tiny_recipe(tmp_path, data=data, train={"max_steps": 1})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    done = run_cli("train", tmp_path / "r.yaml", "--json")
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    training = next(line for line in lines if "training examples have no token to learn from" in line)
    held = next(line for line in lines if "held-out examples have no token to score" in line)
    counts = [int(line.removeprefix("warning: ").split()[0]) for line in (training, held)]
    assert sum(counts) == 8, (training, held)
    assert "of 30 training" in training and "of 10 held-out" in held, (training, held)
    assert json.loads(done.stdout)["final_loss"] is not None

    held_rows = [{"prompt": "x" * 80, "completion": "a"}] * 3
    (tmp_path / "h.jsonl").write_text("".join(json.dumps(r) + "\n" for r in held_rows))
    raw["data"] = {**raw["data"], "eval_split": str(tmp_path / "h.jsonl")}
    raw["data"].pop("eval_samples")
    raw["output"]["dir"] = str(tmp_path / "run2")
    (tmp_path / "r2.yaml").write_text(yaml.safe_dump(raw))
    done = run_cli("train", tmp_path / "r2.yaml")
    assert done.returncode == 2, done.stderr
    assert "none of the 3 held-out examples has a token to score" in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: data: none of the 3"), done.stderr
    assert "Traceback" not in done.stderr
