"""Quality per parameter: the facts and sort tasks, budget arithmetic, `compare --budgets` and the
frontier benchmark's quick mode (tiny models only; the benchmark itself is not a test)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import yaml
from conftest import TINY_OPTIONS, tiny_recipe
from typer.testing import CliRunner

from shardtune.cli import app
from shardtune.core.errors import BadInput
from shardtune.data.tasks import FACT_CITIES, TASKS, exact_match

ROOT = Path(__file__).parents[1]
runner = CliRunner()


def run_frontier(*args, timeout: int = 600) -> subprocess.CompletedProcess:
    """``benchmarks/frontier.py ARGS`` in a process of its own, on this checkout."""
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "frontier.py"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_facts_are_deterministic_unique_and_held_out_items_are_trained_facts():
    facts = TASKS["facts"]
    split = facts.split(300, 40, seed=7, n_validation=40)
    assert split == facts.split(300, 40, seed=7, n_validation=40)
    assert split.train != facts.split(300, 40, seed=8).train
    prompts = [p for p, _ in split.train]
    assert len(set(prompts)) == 300  # one attribute per invented person: no contradicting facts
    assert all(c in FACT_CITIES for _, c in split.train) and len(set(FACT_CITIES)) == 64
    trained = set(split.train)
    assert set(split.held) <= trained and set(split.validation) <= trained  # recall, not generalisation
    assert not set(split.held) & set(split.validation)
    assert len(split.held) == len(set(split.held)) == 40
    with pytest.raises(BadInput, match="more than the 10 facts"):
        facts.split(10, 11, seed=0)


def test_sort_holds_out_lists_never_trained_on_and_scores_exact_answers():
    task = TASKS["sort"]
    split = task.split(500, 64, seed=3, n_validation=64)
    assert split == task.split(500, 64, seed=3, n_validation=64)
    train, held, val = ({p for p, _ in part} for part in (split.train, split.held, split.validation))
    assert len(train) == 500 and len(held) == 64 and len(val) == 64
    assert not train & held and not train & val and not held & val
    for prompt, completion in split.held:
        numbers = [int(x) for x in prompt.rsplit(":", 1)[1].split()]
        assert completion == " ".join(map(str, sorted(numbers))) and 5 <= len(numbers) <= 7
    expected = split.held[0][1]
    assert exact_match(f" {expected}\nanything after", expected)
    assert not exact_match(expected[:-1], expected) and not exact_match(f"Sorted: {expected}", expected)


def test_translate_holds_out_new_sentences_translated_word_by_word_from_a_fixed_lexicon():
    from shardtune.data.tasks import LEXICON

    assert len(LEXICON) == len(set(LEXICON.values())) == 80  # a bijection: no two words share a translation
    assert not set(LEXICON) & set(LEXICON.values())  # no word is its own (or another's) translation
    task = TASKS["translate"]
    split = task.split(400, 50, seed=5, n_validation=50)
    assert split == task.split(400, 50, seed=5, n_validation=50)
    train, held, val = ({p for p, _ in part} for part in (split.train, split.held, split.validation))
    assert len(train) == 400 and len(held) == len(val) == 50
    assert not train & held and not train & val and not held & val
    for prompt, completion in split.held + split.train[:50]:
        words = prompt.removeprefix("translate ").removesuffix(" =").split()
        assert 3 <= len(words) <= 4 and completion == " " + " ".join(LEXICON[w] for w in words)
    trained_words = {w for p, _ in split.train for w in p.split()[1:-1]}
    assert trained_words == set(LEXICON)  # every word of a held-out sentence was seen in training


def test_an_unswept_budget_takes_the_rate_of_the_nearest_swept_budget():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from frontier import nearest

    swept = {Fraction(1, 16): 5e-3, Fraction(1): 1e-3}
    assert nearest(Fraction(1, 8), swept) == Fraction(1, 16)
    assert nearest(Fraction(1, 2), swept) == Fraction(1)
    assert nearest(Fraction(1, 4), swept) == Fraction(1, 16)  # equally far by ratio: the smaller
    assert nearest(Fraction(2), swept) == Fraction(1)


def test_load_examples_uses_the_task_split():
    from shardtune.data.examples import load_examples
    from shardtune.recipe.schema import DataSection

    train, held = load_examples(DataSection(task="facts", num_samples=50, eval_samples=20, seed=1))
    assert len(train) == 50 and len(held) == 20 and set(held) <= set(train)
    train, held = load_examples(DataSection(task="sort", num_samples=50, eval_samples=20))
    assert not {e.prompt for e in train} & {e.prompt for e in held}


def test_parse_budgets():
    from shardtune.training.compare import parse_budgets

    assert parse_budgets("1/32, 1/8,0.5,1") == [Fraction(1, 32), Fraction(1, 8), Fraction(1, 2), 1]
    for bad, why in (
        ("0", "above 0"),
        ("abc", "not a fraction"),
        ("1/0", "not a fraction"),
        ("1,1", "twice"),
    ):
        with pytest.raises(BadInput, match=f"--budgets: .*{why}"):
            parse_budgets(bad)


@pytest.mark.parametrize("method", list(TINY_OPTIONS))
def test_budget_arithmetic_is_nearest_and_counted(method):
    """Every method on tiny-llama: the fitted option gives the reported count, within the tolerance of
    the budget, and no neighbouring value comes nearer; an unreachable budget says why."""
    from shardtune.core.errors import ShardtuneError
    from shardtune.inspection.params import count_trainable, method_options
    from shardtune.models.loading import load_config
    from shardtune.training.compare import BUDGET_TOLERANCE, fit_budget, reference_count

    config = load_config("tiny-llama")
    options = {k: v for k, v in TINY_OPTIONS[method].items()} | {"targets": "all-linear", "rank": 8}
    reference = reference_count(config, {"rank": 8, "targets": "all-linear"})
    assert reference == count_trainable(config, method_options("lora", rank=8, targets="all-linear"))[0]
    for budget in (Fraction(1, 4), Fraction(1, 2), Fraction(1)):
        fit = fit_budget(config, method, {k: v for k, v in options.items()}, budget, reference)
        target = round(budget * reference)
        if fit.value is None:
            assert fit.note and fit.trainable is None
            continue
        assert abs(fit.trainable / target - 1) <= BUDGET_TOLERANCE
        opts = options | {fit.option: fit.value}
        assert count_trainable(config, method_options(method, **opts))[0] == fit.trainable
        for other in (fit.value - 1, fit.value + 1):
            if other < 1:
                continue
            try:
                count = count_trainable(config, method_options(method, **options | {fit.option: other}))[0]
            except ShardtuneError:
                continue
            assert abs(count - target) >= abs(fit.trainable - target)
    if method in ("lora", "mos"):  # both equal LoRA's count at the same (equivalent) rank
        fit = fit_budget(config, method, options, Fraction(1), reference)
        assert fit.trainable == reference and fit.value == 8


def test_budget_arithmetic_on_smollm2_sizes_mos_at_an_eighth():
    """MoS at 1/8 of LoRA rank 16 (all linear layers of SmolLM2-135M) is equivalent_rank 2, exactly."""
    from shardtune.models.loading import load_config
    from shardtune.training.compare import fit_budget, reference_count

    config = load_config("smollm2-135m-instruct")
    options = {"rank": 16, "targets": "all-linear"}
    reference = reference_count(config, options)
    assert reference == 4_884_480
    fit = fit_budget(config, "mos", options, Fraction(1, 8), reference)
    assert (fit.option, fit.value, fit.trainable) == ("equivalent_rank", 2, reference // 8)
    lora = fit_budget(config, "lora", options, Fraction(1, 32), reference)
    assert lora.value is None and "+100% off" in lora.note  # rank 1 is already 1/16


def compare_recipe(tmp_path):
    path = tmp_path / "recipe.yaml"
    raw = tiny_recipe(
        tmp_path,
        adapter={"method": "lora", "rank": 8, "targets": "all-linear"},
        data={"task": "facts", "num_samples": 16, "eval_samples": 4, "max_length": 128},
        train={"max_steps": 2},
        eval={"score": True, "max_new_tokens": 4},
    )
    path.write_text(yaml.safe_dump(raw))
    return path


def test_compare_budgets_table_json_and_plot(tmp_path):
    path = compare_recipe(tmp_path)
    args = ["compare", str(path), "--methods", "lora,fossil,mos", "--budgets", "1/4,1"]
    result = runner.invoke(app, [*args, "--json", "--plot", str(tmp_path / "frontier.png")])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout.strip().splitlines()[-1])
    assert {(r["method"], r["budget"]) for r in rows} == {
        ("lora", "1/4"),
        ("fossil", "1/4"),
        ("lora", "1"),
        ("fossil", "1"),
        ("mos", "1"),
    }
    assert "mos@1/4 — left out: its nearest count" in result.stderr  # pools of 2 layers need R ≥ 5
    by = {(r["method"], r["budget"]): r for r in rows}
    assert by["lora", "1/4"]["option"] == "rank=2" and by["mos", "1"]["option"] == "equivalent_rank=8"
    assert by["mos", "1"]["trainable_parameters"] == by["lora", "1"]["trainable_parameters"]
    assert all(r["task_score"] is not None and r["eval_loss"] is not None for r in rows)
    assert (tmp_path / "frontier.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((tmp_path / "run" / "compare" / "compare.json").read_text())
    assert saved["reference_parameters"] == by["lora", "1"]["trainable_parameters"]
    assert (tmp_path / "run" / "compare" / "fossil@1-4" / "adapter.json").is_file()
    # the table on stdout, talk on stderr; a second run replaces the first only when told to
    result = runner.invoke(
        app, [*args[:3], "lora", "--budgets", "1/2", "--set", "output.overwrite=true", "-q"]
    )
    assert result.exit_code == 0, result.output
    assert "budget" in result.stdout and "rank=4" in result.stdout and "0.500" in result.stdout


@pytest.mark.parametrize("bad", ["0", "abc", "1/8,x", "-1", "100"])
def test_compare_budgets_bad_input_is_one_line(tmp_path, bad):
    path = compare_recipe(tmp_path)
    result = runner.invoke(app, ["compare", str(path), "--budgets", bad])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --budgets:"), result.stderr
    assert "Traceback" not in result.output and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_frontier_benchmark_quick(tmp_path):
    out = tmp_path / "frontier.json"
    done = run_frontier(
        "--quick",
        "--methods",
        "lora,fossil,mos",
        "--budgets",
        "1/2,1",
        "--json",
        out,
        "--plot",
        tmp_path / "f.png",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["complete"] and report["model"] == "tiny-llama"
    assert {(r["method"], r["budget"]) for r in report["rows"]} == {
        ("lora", "1/2"),
        ("lora", "1"),
        ("fossil", "1/2"),
        ("fossil", "1"),
        ("mos", "1/2"),
        ("mos", "1"),
    }
    # lora and mos try 3 rates, fossil 4 (DEFAULT_LRS)
    assert len(report["sweep"]) == 10 and set(report["chosen_lr"]) == {"lora@1/2", "fossil@1/2", "mos@1/2"}
    for r in report["rows"]:
        assert r["lr"] == report["chosen_lr"][f"{r['method']}@1/2"]
        assert 0 <= r["task_score"] <= 1 and r["eval_loss"] > 0
    assert "| budget | method |" in done.stdout and (tmp_path / "f.png").is_file()


@pytest.mark.slow
def test_frontier_variants_compare_one_method_at_two_settings(tmp_path):
    """``METHOD+NAME`` with ``--variant NAME:KEY=VALUE``: the same method trained with a recipe key
    changed (VB-LoRA's logits at the bank's rate instead of 10×), labelled in its rows, sized like
    the method; ``--set`` reaches every run (adapter options the method has)."""
    out = tmp_path / "variants.json"
    args = ["--quick", "--methods", "vblora,vblora+one-rate", "--budgets", "1/2", "--sweep-at", "1/2"]
    args += ["--variant", "one-rate:train.param_groups.logits.lr_scale=1", "--lrs", "1e-2"]
    args += ["--set", "adapter.vector_length=16", "--set", "adapter.num_vectors=16", "--json", str(out)]
    done = run_frontier(*args, "--plot", str(tmp_path / "f.png"))
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"vblora", "vblora+one-rate"}
    two, one = rows["vblora"], rows["vblora+one-rate"]
    assert one["variant"] == ["train.param_groups.logits.lr_scale=1"] and "variant" not in two
    assert one["option"] == two["option"] and one["trainable_parameters"] == two["trainable_parameters"]
    assert one["final_train_loss"] != two["final_train_loss"]  # the variant's key reached training
    assert "vblora+one-rate: train.param_groups.logits.lr_scale=1" in done.stdout
    bad = run_frontier("--quick", "--methods", "vblora+x", timeout=120)
    assert bad.returncode != 0 and "names no --variant x:KEY=VALUE" in bad.stderr


def test_frontier_seeds_really_differ_and_the_spread_is_over_them(tmp_path):
    """``--seeds 3``: the chosen point trained again with train.seed 43 and 44 — another initial
    adapter and another data order each (the first step's loss differs) — and the spread is the
    mean, min and max over the three runs, which the plot draws as min–max bars."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch

    from shardtune.adapters.model import adapter_state_dict, inject_adapter
    from shardtune.models.loading import load_model
    from shardtune.recipe.schema import load_recipe
    from shardtune.training.loop import EpochSampler

    out, work = tmp_path / "seeds.json", tmp_path / "work"
    args = ["--quick", "--methods", "lora", "--budgets", "1", "--sweep-at", "1", "--lrs", "2e-3,5e-3"]
    done = run_frontier(
        *args, "--seeds", "3", "--json", str(out), "--workdir", str(work), "--plot", str(tmp_path / "f.png")
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    (chosen,) = report["rows"]
    assert len(report["sweep"]) == 2 and chosen["seed"] == 42
    runs = [chosen, *report["seeds"]]
    assert [r["seed"] for r in runs] == [42, 43, 44]
    assert all(r["lr"] == chosen["lr"] and r["option"] == chosen["option"] for r in runs)

    recipes = [load_recipe(work / r["run"] / "recipe.yaml") for r in runs]
    assert [r.train.seed for r in recipes] == [42, 43, 44]
    initial, orders = [], []
    for recipe in recipes:  # what the loop does with its seed: the adapter's init, the data order
        torch.manual_seed(recipe.train.seed)
        model, _ = load_model(recipe.model.name)
        inject_adapter(model, recipe.adapter)
        initial.append(torch.cat([t.flatten() for t in adapter_state_dict(model).values()]))
        orders.append(list(EpochSampler(recipe.data.num_samples, recipe.train.seed)))
    first_losses = [
        json.loads((work / r["run"] / "metrics.jsonl").read_text().splitlines()[0])["loss"] for r in runs
    ]
    for i in range(3):
        for j in range(i):
            assert not torch.equal(initial[i], initial[j]) and orders[i] != orders[j]
            assert first_losses[i] != first_losses[j]  # (the runs did use them)

    spread = report["spread"]["lora@1"]
    assert spread["seeds"] == [42, 43, 44]
    for metric in ("task_score", "eval_loss"):
        values = [r[metric] for r in runs]
        assert spread[metric] == {"mean": sum(values) / 3, "min": min(values), "max": max(values)}
    assert "over training seeds" in done.stdout and "| 1 | lora | 3 |" in done.stdout

    # the plot draws each point at its mean, with a bar from the min to the max
    from frontier import with_spread

    from shardtune.training.compare import spread_bars

    (row,) = with_spread(report)
    values, (below, above) = spread_bars([row], "eval_loss")
    loss = spread["eval_loss"]
    assert (
        values == [loss["mean"]]
        and below == [loss["mean"] - loss["min"]]
        and above == [loss["max"] - loss["mean"]]
    )
    assert below[0] > 0 or above[0] > 0
    assert spread_bars([chosen], "eval_loss") == ([chosen["eval_loss"]], [[0.0], [0.0]])  # one seed: no bar


def test_frontier_reuse_takes_the_runs_of_the_same_settings_and_options_only(tmp_path):
    """``--reuse``: an earlier JSON's runs are taken where method, budget, option, rate, seed and the
    adapter options that reach the method are the same (LoRA before and after ``--set
    adapter.vector_length`` for VB-LoRA), trained again where not; other recipe keys are refused."""

    def frontier(*args: str) -> subprocess.CompletedProcess:
        return run_frontier(
            "--quick",
            "--budgets",
            "1",
            "--sweep-at",
            "1",
            "--lrs",
            "2e-3",
            "--plot",
            str(tmp_path / "f.png"),
            *args,
        )

    first, second = tmp_path / "first.json", tmp_path / "second.json"
    bank = ["--set", "adapter.num_vectors=16"]
    done = frontier(
        "--methods", "lora,vblora", *bank, "--set", "adapter.vector_length=16", "--json", str(first)
    )
    assert done.returncode == 0, done.stderr[-2000:]
    done = frontier(
        "--methods",
        "lora,vblora",
        *bank,
        "--set",
        "adapter.vector_length=8",
        "--reuse",
        str(first),
        "--json",
        str(second),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {r["method"]: r for r in json.loads(second.read_text())["rows"]}
    earlier = {r["method"]: r for r in json.loads(first.read_text())["rows"]}
    assert (
        rows["lora"]["reused"] == "first.json" and rows["lora"]["eval_loss"] == earlier["lora"]["eval_loss"]
    )
    assert "reused" not in rows["vblora"]  # another vector_length: trained again
    assert rows["vblora"]["adapter_set"] == ["adapter.num_vectors=16", "adapter.vector_length=8"]
    assert "adapter_set" not in rows["lora"]
    refused = frontier("--methods", "lora", "--set", "train.weight_decay=0.1", "--reuse", str(first))
    assert refused.returncode != 0 and "was run with other --set (recipe keys)" in refused.stderr
