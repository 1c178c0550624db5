"""Evaluations during training (issue 36): eval.every whatever logging.every is, eval.score_every,
output.keep_best (best/) and train.early_stopping, each resumed exactly."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_recipe
from safetensors.torch import load_file

from shardtune.core.errors import BadInput, RecipeError
from shardtune.recipe.schema import recipe_from_dict
from shardtune.training.loop import train
from shardtune.training.selection import Selection


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def steps_with(run: Path, key: str) -> list[int]:
    return [line["step"] for line in metrics(run) if key in line]


def test_the_held_out_loss_comes_every_eval_every_steps_whatever_logging_every_is(tmp_path):
    raw = tiny_recipe(tmp_path, train={"max_steps": 10}, logging={"every": 2}, eval={"every": 5})
    result = train(recipe_from_dict(raw))
    run = tmp_path / "run"
    assert steps_with(run, "eval_loss") == [5, 10]
    assert steps_with(run, "loss") == [1, 2, 4, 6, 8, 10]  # the training curve as before
    (line_5,) = [line for line in metrics(run) if line["step"] == 5]
    assert set(line_5) == {"step", "eval_loss"} and line_5["eval_loss"] > 0
    assert result.eval_loss is not None
    raw = tiny_recipe(tmp_path / "b", train={"max_steps": 10}, logging={"every": 2}, eval={"every": 3})
    train(recipe_from_dict(raw))
    assert steps_with(tmp_path / "b" / "run", "eval_loss") == [3, 6, 9]


def test_the_task_score_comes_every_score_every_steps(tmp_path):
    raw = tiny_recipe(tmp_path, train={"max_steps": 8}, eval={"score_every": 3, "max_new_tokens": 8})
    train(recipe_from_dict(raw))
    scored = [
        (line["step"], line["task_score"]) for line in metrics(tmp_path / "run") if "task_score" in line
    ]
    assert [step for step, _ in scored] == [3, 6]
    assert all(0 <= score <= 1 for _, score in scored)


def test_data_with_completions_is_scored_too_by_the_metric_asked(tmp_path):
    rows = [{"prompt": f"Capital of country {i}?", "completion": f"City {i % 3}"} for i in range(40)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    raw = tiny_recipe(
        tmp_path,
        data={"task": None, "path": str(tmp_path / "d.jsonl"), "eval_samples": 8},
        train={"max_steps": 4},
        eval={"score_every": 2, "score": True, "metric": "contains", "max_new_tokens": 6},
    )
    result = train(recipe_from_dict(raw))
    assert steps_with(tmp_path / "run", "task_score") == [2, 4] and result.task_score is not None
    log = (tmp_path / "run" / "train.log").read_text()
    assert "answer contains the completion" in log and "on held-out examples" in log
    text = tiny_recipe(
        tmp_path / "t", data={"task": None, "path": str(tmp_path / "d.jsonl"), "format": "text"}
    )
    with pytest.raises(RecipeError, match="not format: text"):
        recipe_from_dict({**text, "eval": {"score": True}})
    (tmp_path / "plain.jsonl").write_text(
        "\n".join(json.dumps({"text": f"line {i}"}) for i in range(40)) + "\n"
    )
    plain = tiny_recipe(
        tmp_path / "p", data={"task": None, "path": str(tmp_path / "plain.jsonl")}, eval={"score_every": 2}
    )
    with pytest.raises(
        BadInput, match="eval.score_every: the examples are plain text"
    ):  # found by reading them
        train(recipe_from_dict(plain))


def test_keep_best_holds_the_adapter_of_the_best_evaluation(tmp_path):
    raw = tiny_recipe(
        tmp_path,
        train={"max_steps": 11, "save_every": 2, "keep_checkpoints": 10, "lr": 3e-2},
        eval={"every": 2},
        output={"keep_best": True},
    )
    result = train(recipe_from_dict(raw))
    run = tmp_path / "run"
    losses = {line["step"]: line["eval_loss"] for line in metrics(run) if "eval_loss" in line}
    assert sorted(losses) == [2, 4, 6, 8, 10]
    losses[11] = result.eval_loss  # the final evaluation counts too
    best_step = min(losses, key=lambda step: (losses[step], step))  # the first of equals
    best = json.loads((run / "best" / "best.json").read_text())
    assert best == {"step": best_step, "metric": "eval_loss", "value": losses[best_step]}
    assert result.best == {"dir": str(run / "best"), **best}
    # the adapter is that step's: the checkpoint written at the same step holds the same tensors
    source = run / f"checkpoint-{best_step}" if best_step < 11 else run
    kept, written = load_file(run / "best" / "adapter.safetensors"), load_file(source / "adapter.safetensors")
    assert kept.keys() == written.keys() and all(torch.equal(kept[k], written[k]) for k in kept)


def test_best_is_judged_by_the_task_score_when_asked(tmp_path):
    raw = tiny_recipe(
        tmp_path,
        train={"max_steps": 6},
        eval={"score_every": 2, "max_new_tokens": 8},
        output={"keep_best": True, "best_metric": "task_score"},
    )
    result = train(recipe_from_dict(raw))
    scores = {line["step"]: line["task_score"] for line in metrics(tmp_path / "run") if "task_score" in line}
    best_step = max(scores, key=lambda step: (scores[step], -step))
    assert (result.best["step"], result.best["value"]) == (best_step, scores[best_step])


def test_early_stopping_judges_every_evaluation_as_its_equations_say():
    """Patience 2, min_delta 0.05 over a whole curve of held-out losses: the reference moves only on
    an improvement above 0.05, the count resets there, and the run stops where it reaches 2."""
    curve = [5.0, 4.0, 3.99, 3.97, 3.90, 3.91, 3.88, 3.5]
    selection, seen = Selection(), []
    for value in curve:
        stop = selection.exhausted("eval_loss", value, patience=2, min_delta=0.05)
        seen.append((selection.reference, selection.stale, stop))
    assert seen == [
        (5.0, 0, False),
        (4.0, 0, False),
        (4.0, 1, False),
        (4.0, 2, True),  # 3.97 improves 4.0 by 0.03 only
        (3.90, 0, False),  # past the stop (a run ends there): 4.0 − 3.90 > 0.05
        (3.90, 1, False),
        (3.90, 2, True),
        (3.5, 0, False),
    ]
    best = Selection()
    assert [best.improves_best("task_score", s, v) for s, v in enumerate([0.1, 0.1, 0.3, 0.2])] == [
        True,
        False,  # equal is not better: the first keeps it
        True,
        False,
    ]
    assert best.best == {"task_score": {"step": 2, "value": 0.3}}
    assert Selection.from_json(json.loads(json.dumps(best.to_json()))) == best


def early_stopping_recipe(tmp_path: Path) -> dict:
    # min_delta far above any change: every evaluation after the first counts against the patience
    return tiny_recipe(
        tmp_path,
        train={
            "max_steps": 20,
            "save_every": 3,
            "keep_checkpoints": 10,
            "early_stopping": {"patience": 2, "min_delta": 100.0},
        },
        eval={"every": 2},
        output={"keep_best": True},
    )


def test_early_stopping_ends_the_run_says_why_and_resumes_exactly(tmp_path):
    result = train(recipe_from_dict(early_stopping_recipe(tmp_path)))
    run = tmp_path / "run"
    assert result.steps == 6 and steps_with(run, "eval_loss") == [2, 4, 6]  # reference at 2, stale at 4, 6
    assert result.stopped_early.startswith("eval_loss did not improve by more than 100 in 2 evaluations")
    assert "stopped at step 6 of 20" in result.stopped_early
    written = json.loads((run / "result.json").read_text())
    assert written["stopped_early"] == result.stopped_early and written["steps"] == 6
    assert "early stopping: eval_loss did not improve" in (run / "train.log").read_text()
    assert [p.name for p in sorted(run.glob("checkpoint-*"))] == ["checkpoint-3"]  # none at the stop
    state = json.loads((run / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["selection"]["stale"] == 0 and state["selection"]["best"]["eval_loss"]["step"] == 2
    final = load_file(run / "adapter.safetensors")

    # resumed from checkpoint-3 (reference and count as at step 3), it stops at step 6 as well
    again = tmp_path / "again"
    again.mkdir()
    shutil.copytree(run, again / "run")
    resumed = train(recipe_from_dict(early_stopping_recipe(again)), resume=again / "run" / "checkpoint-3")
    assert (resumed.steps, resumed.stopped_early, resumed.best) == (
        6,
        result.stopped_early,
        {**result.best, "dir": str(again / "run" / "best")},
    )
    other = load_file(again / "run" / "adapter.safetensors")
    assert all(torch.equal(other[k], final[k]) for k in final)

    # the patience running out at the last step is no early stop: the run ended anyway
    raw = early_stopping_recipe(tmp_path / "last")
    raw["train"]["max_steps"] = 6
    last = train(recipe_from_dict(raw))
    assert (last.steps, last.stopped_early) == (6, None)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_judge_as_one(tmp_path, strategy):
    """The score is computed by the main process (every process under FSDP) and shared, so every
    process stops at the same step; best/ is written once."""
    raw = early_stopping_recipe(tmp_path)
    raw["train"].update({"batch_size": 4, "strategy": strategy})  # 2 × 4: the global batch of one process
    raw["train"]["early_stopping"]["metric"] = "task_score"
    raw["eval"].update({"score_every": 2, "max_new_tokens": 4})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "shardtune",
            "train",
            str(tmp_path / "r.yaml"),
            "--nproc",
            "2",
            "--json",
            "-q",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["steps"] == 6 and result["stopped_early"].startswith("task_score did not improve")
    assert steps_with(tmp_path / "run", "task_score") == [2, 4, 6]
    assert json.loads((tmp_path / "run" / "best" / "best.json").read_text())["metric"] == "eval_loss"


@pytest.mark.parametrize(
    "sections, key",
    [
        ({"output": {"keep_best": True}}, "output.keep_best judges eval_loss, evaluated every eval.every"),
        (
            {"train": {"early_stopping": {"patience": 2, "metric": "task_score"}}, "eval": {"every": 2}},
            "train.early_stopping judges task_score, scored every eval.score_every",
        ),
        (
            {"output": {"keep_best": True}, "eval": {"every": 2}, "data": {"eval_samples": 0}},
            "data.eval_samples is 0",
        ),
        ({"train": {"early_stopping": {"patience": 0}}}, "patience"),
        ({"train": {"early_stopping": {"patience": 2, "min_delta": -1}}}, "min_delta"),
        (
            {"eval": {"score_every": 2}, "data": {"task": None, "path": "x.jsonl", "format": "text"}},
            "eval.score_every",
        ),
    ],
)
def test_selection_without_its_evaluations_is_one_line(tmp_path, sections, key):
    with pytest.raises(RecipeError) as found:
        recipe_from_dict(tiny_recipe(tmp_path, **sections))
    message = str(found.value)
    assert key in message and "\n" not in message


def test_a_best_folder_holding_a_users_file_is_kept_as_it_is(tmp_path):
    raw = tiny_recipe(
        tmp_path,
        train={"max_steps": 6, "save_every": 2, "keep_checkpoints": 5},
        eval={"every": 2},
        output={"keep_best": True},
    )
    train(recipe_from_dict(raw))
    best = tmp_path / "run" / "best"
    (best / "notes").mkdir()
    (best / "notes" / "mine.txt").write_text("keep me")
    before = {p.name: p.read_bytes() for p in best.iterdir() if p.is_file()}
    train(recipe_from_dict(raw), resume=tmp_path / "run" / "checkpoint-2")  # evaluates again at 4, 6
    assert (best / "notes" / "mine.txt").read_text() == "keep me"
    assert {p.name: p.read_bytes() for p in best.iterdir() if p.is_file()} == before
    assert "holds notes/, which shardtune did not write" in (tmp_path / "run" / "train.log").read_text()
