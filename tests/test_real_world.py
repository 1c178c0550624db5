"""Behaving as users of transformers, PEFT and cluster shells expect: runs that travel, PEFT adapters
in, evaluating anything, output that fits pipes, one dtype vocabulary, trackers, cheap commands."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_recipe
from typer.testing import CliRunner

from shardtune.cli import app

ROOT = Path(__file__).parents[1]
runner = CliRunner()


def run_cli(*args, cwd: Path = ROOT, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "shardtune", *map(str, args)],
        cwd=cwd,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )


def ok(args: list) -> object:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, (result.output, result.exception)
    return result


@pytest.fixture(scope="module")
def local_base(tmp_path_factory) -> Path:
    """A tiny model saved as a Hugging Face directory (a local base model)."""
    from shardtune.models.loading import build_tiny_model, byte_tokenizer

    path = tmp_path_factory.mktemp("base") / "tiny-base"
    build_tiny_model("tiny-llama").save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------------
# Runs that travel


def test_a_run_records_its_base_absolutely_and_works_from_anywhere_and_after_a_move(local_base, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    base = work / "base"
    shutil.copytree(local_base, base)
    raw = tiny_recipe(tmp_path, model={"name": "base"}, train={"max_steps": 3}, output={"dir": "run"})
    (work / "r.yaml").write_text(yaml.safe_dump(raw))
    done = run_cli("train", "r.yaml", "-q", cwd=work)
    assert done.returncode == 0, done.stderr
    meta = json.loads((work / "run" / "adapter.json").read_text())
    assert meta["base_model"]["name"] == str(base.resolve()) and meta["base_model"]["source"] == "local"
    elsewhere = run_cli("eval", work / "run", "--json", cwd=tmp_path)  # another working directory
    assert elsewhere.returncode == 0, elsewhere.stderr
    score = json.loads(elsewhere.stdout)["adapter"]["eval_loss"]

    moved = tmp_path / "moved-base"
    base.rename(moved)
    lost = runner.invoke(app, ["eval", str(work / "run")])
    assert lost.exit_code == 2 and str(base.resolve()) in lost.stderr
    found = ok(["eval", work / "run", "--base-model", moved, "--json"])
    assert json.loads(found.stdout)["adapter"]["eval_loss"] == pytest.approx(score, abs=1e-6)
    ok(["generate", "-a", work / "run", "--base-model", moved, "hi", "--max-new-tokens", "2"])
    ok(["merge", work / "run", "--base-model", moved, "--out", tmp_path / "merged", "--dtype", "fp32"])
    ok(["export", work / "run", "--base-model", moved, "--out", tmp_path / "peft"])
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(moved.resolve())


@pytest.mark.parametrize("alias", ["tiny-llama", "tiny-gpt2"])
def test_an_exported_peft_adapter_loads_with_auto_peft_model_from_its_recorded_base(alias, tmp_path):
    from peft import AutoPeftModelForCausalLM

    from shardtune.artifacts.checkpoint import load_adapted_model

    raw = tiny_recipe(tmp_path, model={"name": alias}, train={"max_steps": 3})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    ok(["train", tmp_path / "r.yaml", "-q"])
    ok(["export", tmp_path / "run", "--out", tmp_path / "peft"])
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]).is_absolute()  # never a shardtune alias
    peft_model = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "peft"))
    ours, _, _ = load_adapted_model(tmp_path / "run")
    ids = torch.tensor([[5, 9, 17, 30, 41]])
    torch.testing.assert_close(peft_model(ids).logits, ours(ids).logits, atol=1e-5, rtol=1e-5)


def test_the_embedded_model_exports_its_hub_id():
    from shardtune.artifacts.export import peft_base_model

    got = peft_base_model({"name": "smollm2-135m-instruct", "source": "builtin"})
    assert got["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert peft_base_model({"name": "org/m", "source": "hub", "revision": "abc"}) == {
        "base_model_name_or_path": "org/m",
        "revision": "abc",
    }


# ---------------------------------------------------------------------------------------------------
# PEFT adapters come in


def peft_adapter(tmp_path: Path, alias: str, **config) -> tuple[object, Path]:
    """A LoRA made with PEFT's get_peft_model on a tiny model (non-zero B), saved as PEFT saves it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from shardtune.models.loading import saved_builtin

    base = AutoModelForCausalLM.from_pretrained(str(saved_builtin(alias)))  # as PEFT users load a base
    lora = LoraConfig(init_lora_weights=False, **config)
    model = get_peft_model(base, lora)
    model.eval()
    out = tmp_path / "peft-in"
    model.save_pretrained(str(out))
    return model, out


@pytest.mark.parametrize(
    "alias,config",
    [
        ("tiny-llama", {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}),
        ("tiny-llama", {"r": 8, "lora_alpha": 4, "use_rslora": True, "target_modules": "all-linear"}),
        ("tiny-qwen2", {"r": 2, "lora_alpha": 2, "target_modules": r".*\.mlp\.(up|down)_proj"}),
        ("tiny-gpt2", {"r": 4, "lora_alpha": 16, "target_modules": ["c_attn"], "fan_in_fan_out": True}),
    ],
)
def test_a_peft_lora_gives_the_same_logits_in_shardtune(alias, config, tmp_path):
    from shardtune.artifacts.checkpoint import load_adapted_model

    peft_model, directory = peft_adapter(tmp_path, alias, **config)
    ours, _, meta = load_adapted_model(directory)
    assert meta["method"] == "lora"
    ids = torch.tensor([[5, 9, 17, 30, 41, 77]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, peft_model(ids).logits, atol=1e-5, rtol=1e-5)


def test_a_peft_lora_is_accepted_wherever_a_run_is(tmp_path):
    peft_model, directory = peft_adapter(tmp_path, "tiny-llama", r=4, lora_alpha=8, target_modules=["q_proj"])
    rows = [{"prompt": f"say {i}", "completion": f" {i}"} for i in range(6)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    result = ok(["eval", directory, "--data", tmp_path / "d.jsonl", "--json"])
    assert json.loads(result.stdout)["adapter"]["scored"] == 6
    ok(["generate", "-a", directory, "hello", "--max-new-tokens", "2"])
    ok(["merge", directory, "--out", tmp_path / "merged", "--dtype", "fp32"])
    ok(["export", directory, "--out", tmp_path / "re-exported"])
    ok(["routing", directory])
    refusal = runner.invoke(app, ["eval", str(directory)])
    assert refusal.exit_code == 2 and "give the examples with --data FILE" in refusal.stderr
    native = runner.invoke(
        app, ["export", str(directory), "--out", str(tmp_path / "n"), "--format", "shardtune"]
    )
    assert native.exit_code == 2 and "is a PEFT LoRA adapter, not a shardtune run" in native.stderr


def test_training_starts_from_a_peft_lora(tmp_path):
    from safetensors.torch import load_file

    _, directory = peft_adapter(
        tmp_path, "tiny-llama", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]
    )
    adapter = {
        "method": "lora",
        "rank": 4,
        "alpha": 8,
        "targets": ["q_proj", "v_proj"],
        "init_from": str(directory),
    }
    raw = tiny_recipe(tmp_path, adapter=adapter, train={"max_steps": 1, "lr": 1e-12})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    ok(["train", tmp_path / "r.yaml", "-q"])
    started = load_file(tmp_path / "run" / "adapter.safetensors")
    given = load_file(directory / "adapter_model.safetensors")
    for key, tensor in given.items():
        name = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".adapter.lora_A")
        name = name.replace(".lora_B.weight", ".adapter.lora_B")
        torch.testing.assert_close(started[name], tensor, atol=1e-6, rtol=0)  # lr 1e-12: still PEFT's weights
    other = runner.invoke(
        app,
        [
            "train",
            str(tmp_path / "r.yaml"),
            "--set",
            "adapter.rank=2",
            "--set",
            f"output.dir={tmp_path / 'x'}",
        ],
    )
    assert other.exit_code == 2 and "adapter.init_from:" in other.stderr and "has rank = 4" in other.stderr


def test_peft_features_shardtune_cannot_represent_are_refused(tmp_path):
    _, directory = peft_adapter(tmp_path, "tiny-llama", r=4, target_modules=["q_proj"])
    config = json.loads((directory / "adapter_config.json").read_text())
    config["use_dora"] = True
    (directory / "adapter_config.json").write_text(json.dumps(config))
    refusal = runner.invoke(app, ["generate", "-a", str(directory), "hi"])
    assert refusal.exit_code == 2 and "key 'use_dora' = True (DoRA) has no equivalent" in refusal.stderr


# ---------------------------------------------------------------------------------------------------
# Evaluate anything


def test_eval_a_plain_model_on_your_own_data_with_exact_and_contains(tmp_path):
    rows = [{"prompt": f"p{i}", "completion": "a"} for i in range(4)]
    chats = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]}] * 3
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in chats))
    exact = json.loads(ok(["eval", "--model", "tiny-llama", "--data", tmp_path / "d.jsonl", "--json"]).stdout)
    assert exact["model"] == "tiny-llama" and exact["metric"] == "exact"
    assert exact["model_scores"]["scored"] == 4 and 0 <= exact["model_scores"]["task_score"] <= 1
    contains = json.loads(
        ok(
            ["eval", "-m", "tiny-llama", "--data", tmp_path / "d.jsonl", "--metric", "contains", "--json"]
        ).stdout
    )
    assert contains["model_scores"]["task_score"] >= exact["model_scores"]["task_score"]
    chat = json.loads(ok(["eval", "-m", "tiny-llama", "--data", tmp_path / "c.jsonl", "--json"]).stdout)
    assert chat["model_scores"]["scored"] == 3
    table = ok(["eval", "-m", "tiny-llama", "--data", tmp_path / "d.jsonl"]).stdout
    assert "tiny-llama; data: " in table and "exact" in table
    bad = runner.invoke(
        app, ["eval", "-m", "tiny-llama", "--data", str(tmp_path / "d.jsonl"), "--metric", "fuzzy"]
    )
    assert bad.exit_code == 2 and "--metric: expected one of exact, contains" in bad.stderr
    # more --samples than the file holds: all of them, and a note on stderr that says so
    more = runner.invoke(
        app, ["eval", "-m", "tiny-llama", "--data", str(tmp_path / "d.jsonl"), "--samples", "9"]
    )
    assert more.exit_code == 0 and "tiny-llama; data: " in more.stdout and "note" not in more.stdout
    assert (
        f"note: --samples 9: {tmp_path / 'd.jsonl'} holds 4 examples; evaluating on all of them"
        in more.stderr
    )
    fewer = runner.invoke(
        app, ["eval", "-m", "tiny-llama", "--data", str(tmp_path / "d.jsonl"), "--samples", "2", "--json"]
    )
    assert json.loads(fewer.stdout)["model_scores"]["scored"] == 2 and "note" not in fewer.stderr


def test_contains_scoring_counts_what_exact_misses():
    from shardtune.data.tasks import contains, exact_match

    assert contains("The answer is 42.", "42") and not exact_match("The answer is 42.", "42")
    assert exact_match("42\nmore", "42") and not contains("4 2", "42")


# ---------------------------------------------------------------------------------------------------
# Output that fits pipes


def test_train_talks_on_stderr_and_stdout_carries_only_the_result(tmp_path):
    raw = tiny_recipe(tmp_path, train={"max_steps": 2})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    talk = run_cli("train", tmp_path / "r.yaml")
    assert talk.returncode == 0, talk.stderr
    assert talk.stdout == "" and "step 2" in talk.stderr and "adapter written" in talk.stderr
    result = run_cli("train", tmp_path / "r.yaml", "--json", "--set", "output.overwrite=true")
    assert result.returncode == 0 and len(result.stdout.splitlines()) == 1
    assert json.loads(result.stdout)["steps"] == 2


def test_nothing_wraps_or_truncates_in_a_pipe(tmp_path):
    models = run_cli("models")
    assert [line.split()[0] for line in models.stdout.splitlines()] == [
        "smollm2-135m-instruct",
        "tiny-llama",
        "tiny-qwen2",
        "tiny-mistral",
        "tiny-gpt2",
    ]
    methods = run_cli("methods")
    assert all(len(line.split(None, 1)) == 2 for line in methods.stdout.splitlines())
    raw = tiny_recipe(tmp_path, adapter={"method": "mos", "rank": 4, "equivalent_rank": 4, "private_rank": 1})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    routing = run_cli("routing", tmp_path / "r.yaml")
    assert routing.returncode == 0, routing.stderr
    assert "…" not in routing.stdout
    assert "model.layers.0.self_attn.q_proj" in routing.stdout and "B mean overlap" in routing.stdout
    compare = run_cli("params", "-m", "tiny-llama", "--compare", "--rank", "4")
    assert "…" not in compare.stdout and "sharelora" in compare.stdout


def test_the_routing_summary_table_has_one_header_per_value_as_in_json(tmp_path):
    from shardtune.inspection.routing import SUMMARY_COLUMNS, summary_rows

    raw = tiny_recipe(tmp_path, adapter={"method": "mos", "rank": 4, "equivalent_rank": 4, "private_rank": 1})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    report = json.loads(ok(["routing", tmp_path / "r.yaml", "--json"]).stdout)
    rows = summary_rows(report)
    table = ok(["routing", tmp_path / "r.yaml"]).stdout.splitlines()
    header = next(line for line in table if "A mean overlap" in line)  # plain text: columns 2+ spaces apart
    assert re.split(r"\s{2,}", header.strip()) == list(SUMMARY_COLUMNS)
    assert not set("─│┃━┏┓┗┛╭╮╰╯") & set("\n".join(table))  # no box drawing outside a terminal
    q = next(line for line in table if line.startswith("q_proj"))
    cells = re.split(r"\s{2,}", q.strip())
    row = next(r for r in rows if r["type"] == "q_proj")
    values = ["type", "layers", "A_pool", "A_shards", "A_private", "A_mean_overlap"]
    values += ["B_pool", "B_shards", "B_private", "B_mean_overlap"]
    expected = [f"{row[k]:.2f}" if "overlap" in k else str(row[k]) for k in values]
    assert cells == expected


@pytest.mark.parametrize(
    "args,message",
    [
        (["trian"], "error: No such command 'trian'"),
        (["train", "--bogus"], "error: No such option: --bogus"),
        (["train"], "error: Missing argument 'RECIPE'"),
        (["params", "--rank", "many"], "error: Invalid value for '--rank'"),
        (
            ["train", "r.yaml", "--resume", "runs/x"],
            "--resume takes no value; to continue from a given checkpoint",
        ),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(args, message):
    done = run_cli(*args)
    assert done.returncode == 2 and done.stderr.startswith("error: ") and message in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and done.stdout == ""


def test_cheap_commands_import_neither_torch_nor_transformers():
    code = (
        "import sys\nfrom shardtune.cli import app\n"
        "for args in (['methods'], ['models'], ['tasks'], ['--help'], ['train', '--help']):\n"
        "    try:\n        app(args=args, prog_name='shardtune')\n    except SystemExit:\n        pass\n"
        "print('LOADED', 'torch' in sys.modules, 'transformers' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip().splitlines()[-1] == "LOADED False False", done.stderr


def test_params_without_a_model_counts_the_default_and_says_so(tmp_path):
    done = run_cli("params", "--method", "fossil", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["model"] == "smollm2-135m-instruct" and report["methods"][0]["trainable"] > 0
    assert "embedded default model smollm2-135m-instruct" in done.stderr
    raw = tiny_recipe(tmp_path, adapter={"method": "fossil", "rank": 4, "targets": "all-linear"})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    from_recipe = json.loads(ok(["params", "--recipe", tmp_path / "r.yaml", "--json"]).stdout)
    assert from_recipe["model"] == "tiny-llama" and from_recipe["methods"][0]["method"] == "fossil"


def test_train_and_params_print_the_same_share_of_trainable_parameters(tmp_path):
    raw = tiny_recipe(tmp_path, model={"name": "tiny-gpt2"}, train={"max_steps": 1})  # GPT-2 ties its head
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    talk = run_cli("train", tmp_path / "r.yaml")
    line = next(line for line in talk.stderr.splitlines() if "trainable parameters" in line)
    share = float(line.split("(")[1].split("%")[0])
    counts = json.loads(
        ok(["params", "-m", "tiny-gpt2", "--rank", "4", "--targets", "all-linear", "--json"]).stdout
    )
    assert counts["methods"][0]["percent_of_base"] == pytest.approx(share, abs=1e-3)


# ---------------------------------------------------------------------------------------------------
# One dtype vocabulary


def test_dtypes_have_short_names_and_the_long_ones_are_synonyms(tmp_path):
    from shardtune.recipe.schema import recipe_from_dict

    for long, short in (("float32", "fp32"), ("bfloat16", "bf16"), ("float16", "fp16")):
        raw = tiny_recipe(tmp_path, model={"dtype": long}, adapter={"method": "lora", "dtype": long})
        recipe = recipe_from_dict(raw)
        assert recipe.model.dtype == short and recipe.adapter.dtype == short
    assert recipe_from_dict(tiny_recipe(tmp_path, train={"precision": "bfloat16"})).train.precision == "bf16"
    raw = tiny_recipe(tmp_path, train={"max_steps": 1})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    ok(["train", tmp_path / "r.yaml", "-q"])
    ok(["merge", tmp_path / "run", "--out", tmp_path / "m", "--dtype", "bfloat16"])
    assert json.loads((tmp_path / "m" / "config.json").read_text())["dtype"] == "bfloat16"
    bad = runner.invoke(app, ["merge", str(tmp_path / "run"), "--out", str(tmp_path / "n"), "--dtype", "fp8"])
    assert bad.exit_code == 2 and "--dtype: expected one of fp32, bf16, fp16" in bad.stderr


# ---------------------------------------------------------------------------------------------------
# Experiment tracking


def test_tensorboard_receives_the_recipe_and_every_metric(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    raw = tiny_recipe(
        tmp_path,
        train={"max_steps": 4},
        eval={"every": 2},
        logging={"every": 1, "report_to": ["tensorboard"]},
    )
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    ok(["train", tmp_path / "r.yaml", "-q"])
    events = EventAccumulator(str(tmp_path / "run" / "logs" / "shardtune"))
    events.Reload()
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert set(events.Tags()["scalars"]) >= {"loss", "lr", "grad_norm", "tokens_per_s", "eval_loss"}
    assert [round(e.value, 5) for e in events.Scalars("loss")] == [round(m["loss"], 5) for m in metrics]
    hparams = list((tmp_path / "run" / "logs" / "shardtune").rglob("hparams.yml"))
    assert hparams and yaml.safe_load(hparams[0].read_text())["train.max_steps"] == 4


def fake_wandb(monkeypatch) -> dict:
    """A stand-in ``wandb`` module that records what Accelerate's tracker hands it."""
    import importlib.machinery
    import types

    calls: dict = {"log": []}

    class Run:
        def log(self, values, step=None, **kwargs):
            calls["log"].append((step, values))

        def finish(self):
            calls["finished"] = True

    def init(**kwargs):
        calls["init"] = kwargs
        return Run()

    module = types.ModuleType("wandb")
    module.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    module.init = init
    module.config = types.SimpleNamespace(update=lambda values, **_: calls.__setitem__("config", values))
    monkeypatch.setitem(sys.modules, "wandb", module)
    return calls


def test_wandb_gets_the_project_the_run_name_the_tags_and_its_own_kwargs(tmp_path, monkeypatch):
    from shardtune.recipe.schema import recipe_from_dict
    from shardtune.training.loop import train

    calls = fake_wandb(monkeypatch)
    logging = {
        "every": 1,
        "report_to": ["wandb"],
        "project": "dates",
        "run_name": "fossil-r8",
        "tags": ["a", "b"],
    }
    raw = tiny_recipe(tmp_path, train={"max_steps": 2}, logging=logging)
    train(recipe_from_dict(raw))
    assert calls["init"] == {"project": "dates", "name": "fossil-r8", "tags": ["a", "b"]}
    assert [step for step, _ in calls["log"]] == [1, 2] and calls["finished"]
    assert calls["config"]["logging.project"] == "dates" and calls["config"]["train.max_steps"] == 2

    calls = fake_wandb(monkeypatch)
    logging = {"report_to": ["wandb"], "tracker_kwargs": {"wandb": {"entity": "team", "tags": ["c"]}}}
    train(recipe_from_dict(tiny_recipe(tmp_path / "b", train={"max_steps": 1}, logging=logging)))
    # the defaults: project shardtune, the run directory's name; the tracker's own kwargs win
    assert calls["init"] == {"project": "shardtune", "name": "run", "tags": ["c"], "entity": "team"}


def test_tensorboard_files_the_run_under_its_project(tmp_path):
    from shardtune.recipe.schema import recipe_from_dict
    from shardtune.training.loop import train

    logging = {"every": 1, "report_to": ["tensorboard"], "project": "sweep-7"}
    train(recipe_from_dict(tiny_recipe(tmp_path, train={"max_steps": 2}, logging=logging)))
    assert list((tmp_path / "run" / "logs" / "sweep-7").glob("events.out.tfevents.*"))
    # the run is still shardtune's own: --overwrite replaces it
    train(recipe_from_dict(tiny_recipe(tmp_path, train={"max_steps": 1}, output={"overwrite": True})))


def test_tracker_kwargs_for_a_tracker_not_in_use_is_one_line(tmp_path):
    raw = tiny_recipe(
        tmp_path, logging={"report_to": ["tensorboard"], "tracker_kwargs": {"wandb": {"entity": "x"}}}
    )
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    result = runner.invoke(app, ["train", str(tmp_path / "r.yaml"), "--dry-run"])
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        "error: logging: tracker_kwargs names wandb, which report_to does not list (tensorboard)"
    )


def test_a_missing_tracker_package_is_one_line_naming_what_to_install(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    raw = tiny_recipe(tmp_path, logging={"report_to": "wandb"})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    for dry_run in ([], ["--dry-run"]):  # a dry run checks it too
        result = runner.invoke(app, ["train", str(tmp_path / "r.yaml"), *dry_run])
        assert result.exit_code == 2
        assert result.stderr.strip() == (
            "error: logging.report_to: wandb needs the wandb package: pip install wandb "
            "(or pip install 'shardtune[wandb]')"
        )
        assert result.stdout == "" and not (tmp_path / "run").exists()
