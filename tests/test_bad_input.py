"""Bad input of every kind: one line on stderr naming the key or file, a non-zero exit, never a traceback."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import tiny_recipe
from typer.testing import CliRunner

from shardtune.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One small trained run to point adapter-consuming commands at (and to corrupt copies of)."""
    tmp = tmp_path_factory.mktemp("trained")
    path = tmp / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(tmp, train={"max_steps": 2})))
    assert runner.invoke(app, ["train", str(path), "-q"]).exit_code == 0
    return tmp / "run"


def recipe_file(tmp_path, **sections):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(tmp_path, **sections)))
    return str(path)


def data_file(tmp_path, name, content: bytes):
    (tmp_path / name).write_bytes(content)
    return ["--set", f"data.path={tmp_path / name}"]  # (drops the recipe's task)


def copy_run(trained, tmp_path, mutate):
    import shutil

    target = tmp_path / "copy"
    shutil.copytree(trained, target)
    mutate(target)
    return str(target)


CASES = {
    # recipes
    "recipe missing": (lambda t, r: ["train", str(t / "nope.yaml")], "recipe file not found"),
    "recipe invalid yaml": (
        lambda t, r: ["train", _write(t, "x.yaml", b"model: [oops")],
        "invalid YAML at line 1",
    ),
    "recipe not a mapping": (
        lambda t, r: ["train", _write(t, "x.yaml", b"- 1\n- 2\n")],
        "must be a mapping of sections",
    ),
    "recipe empty": (lambda t, r: ["train", _write(t, "x.yaml", b"")], "model: required key is missing"),
    "recipe binary": (lambda t, r: ["train", _write(t, "x.yaml", b"\xff\xfe\x00")], "not a UTF-8 text file"),
    "unknown section": (
        lambda t, r: ["train", recipe_file(t), "--set", "trainer.lr=1"],
        "trainer: unknown key",
    ),
    "unknown adapter key": (
        lambda t, r: ["train", recipe_file(t), "--set", "adapter.rnak=2"],
        "adapter.rnak: unknown key (did you mean 'rank'?)",
    ),
    "negative rank": (
        lambda t, r: ["train", recipe_file(t), "--set", "adapter.rank=-3"],
        "adapter.rank: must be a positive integer, got -3",
    ),
    "rank not a number": (
        lambda t, r: ["train", recipe_file(t), "--set", "adapter.rank=abc"],
        "adapter.rank: must be an integer",
    ),
    "unknown method": (
        lambda t, r: ["train", recipe_file(t), "--set", "adapter.method=dora"],
        "adapter.method: unknown method 'dora'",
    ),
    "zero lr": (
        lambda t, r: ["train", recipe_file(t), "--set", "train.lr=0"],
        "train.lr: must be greater than 0",
    ),
    "bad schedule": (
        lambda t, r: ["train", recipe_file(t), "--set", "train.schedule=cosin"],
        "train.schedule: must be one of",
    ),
    "bad precision": (
        lambda t, r: ["train", recipe_file(t), "--set", "train.precision=fp8"],
        "train.precision: must be one of",
    ),
    "two data sources": (
        lambda t, r: ["train", recipe_file(t, data={"path": "x.jsonl"})],
        "set exactly one of data.task",
    ),
    "no data source": (
        lambda t, r: ["train", recipe_file(t), "--set", "data.task=null"],
        "set exactly one of data.task",
    ),
    "unknown task": (
        lambda t, r: ["train", recipe_file(t), "--set", "data.task=nope"],
        "data.task: unknown task 'nope'",
    ),
    "score without task": (
        lambda t, r: [
            "train",
            recipe_file(t),
            "--set",
            "eval.score=true",
            "--set",
            "data.format=text",
            *data_file(t, "d.jsonl", b'{"text": "a"}\n'),
        ],
        "eval.score, eval.score_base and eval.score_every need examples with answers",
    ),
    "bad --set syntax": (
        lambda t, r: ["train", recipe_file(t), "--set", "train.lr"],
        "--set train.lr: expected KEY=VALUE",
    ),
    # models and adapter/model pairs
    "model not found": (
        lambda t, r: ["train", recipe_file(t), "--set", "model.name=org/nothing"],
        "model.name: 'org/nothing' is not a builtin alias",
    ),
    "model dir without config": (
        lambda t, r: ["train", recipe_file(t), "--set", f"model.name={t}"],
        "has no config.json",
    ),
    "target matches nothing": (
        lambda t, r: ["train", recipe_file(t), "--set", "adapter.targets=[qq_proj]"],
        "adapter.targets: 'qq_proj' matches no linear layer",
    ),
    "bad target regex": (
        lambda t, r: ["train", recipe_file(t), "--set", "adapter.targets=((x"],
        "adapter.targets: invalid regular expression",
    ),
    "fossil mini_r": (
        lambda t, r: [
            "train",
            recipe_file(t, adapter={"method": "fossil", "mode": "mini", "mini_r": 48, "rank": 4}),
        ],
        "adapter.mini_r: must divide",
    ),
    "fossil bat blocks": (
        lambda t, r: ["train", recipe_file(t, adapter={"method": "fossil", "mode": "bat", "rank": 32})],
        "adapter.rank: mode bat cuts every weight into r×r blocks, so r must divide its sizes",
    ),
    "vblora vector length": (
        lambda t, r: ["train", recipe_file(t, adapter={"method": "vblora", "vector_length": 48})],
        "adapter.vector_length: must divide the input and output size of every target",
    ),
    "tiedlora notation": (
        lambda t, r: ["train", recipe_file(t, adapter={"method": "tiedlora", "trainable": "vbua"})],
        "adapter.trainable: nothing would be trained",
    ),
    "prolora unshared rank": (
        lambda t, r: ["train", recipe_file(t, adapter={"method": "prolora", "rank": 2, "unshared_rank": 3})],
        "adapter.unshared_rank: must be at most adapter.rank (2), got 3",
    ),
    "sharelora qkv b under gqa": (
        lambda t, r: [
            "train",
            recipe_file(t, adapter={"method": "sharelora", "share": "b", "scope": "attention"}),
        ],
        "adapter.scope: layers sharing B_qkv have different sizes [32, 64]; use share: a",
    ),
    "prune sparsegpt without data": (
        lambda t, r: ["prune", "tiny-llama", "--out", str(t / "s"), "--method", "sparsegpt"],
        "--method sparsegpt needs calibration samples",
    ),
    "mos pool too small": (
        lambda t, r: ["train", recipe_file(t, adapter={"method": "mos", "rank": 16, "equivalent_rank": 2})],
        "adapter.rank: too large for the pool",
    ),
    "fsdp options without fsdp": (
        lambda t, r: ["train", recipe_file(t), "--set", "train.fsdp.reshard_after_forward=false"],
        "train: fsdp options are set but strategy is ddp; set train.strategy: fsdp",
    ),
    "deepspeed with fsdp options": (
        lambda t, r: [
            "train",
            recipe_file(t, train={"strategy": "deepspeed", "fsdp": {"reshard_after_forward": False}}),
        ],
        "train: fsdp options are set but strategy is deepspeed; set train.strategy: fsdp",
    ),
    "deepspeed options without deepspeed": (
        lambda t, r: ["train", recipe_file(t), "--set", "train.deepspeed.stage=3"],
        "train: deepspeed options are set but strategy is ddp; set train.strategy: deepspeed",
    ),
    "zero stage 4": (
        lambda t, r: ["train", recipe_file(t, train={"strategy": "deepspeed", "deepspeed": {"stage": 4}})],
        "train.deepspeed.stage: must be one of 1, 2 or 3, got 4",
    ),
    "zero offload params below stage 3": (
        lambda t, r: [
            "train",
            recipe_file(
                t, train={"strategy": "deepspeed", "deepspeed": {"stage": 2, "offload_params": True}}
            ),
        ],
        "train.deepspeed: offload_params: true offloads partitioned weights, which only stage 3 has",
    ),
    "zero persistence threshold below stage 3": (
        lambda t, r: [
            "train",
            recipe_file(t, train={"strategy": "deepspeed", "deepspeed": {"persistence_threshold": 0}}),
        ],
        "train.deepspeed: persistence_threshold decides which weights stage 3 partitions (stage is 2)",
    ),
    "zero negative persistence threshold": (
        lambda t, r: [
            "train",
            recipe_file(
                t, train={"strategy": "deepspeed", "deepspeed": {"stage": 3, "persistence_threshold": -1}}
            ),
        ],
        "train.deepspeed.persistence_threshold:",
    ),
    "zero with adafactor": (
        lambda t, r: ["train", recipe_file(t, train={"strategy": "deepspeed", "optimizer": "adafactor"})],
        "train: optimizer: adafactor does not work with strategy: deepspeed",
    ),
    "zero with a quantized base": (
        lambda t, r: [
            "train",
            recipe_file(t, model={"name": "tiny-llama", "quantize": "nf4"}, train={"strategy": "deepspeed"}),
        ],
        "train.strategy: deepspeed cannot partition a quantized base (model.quantize: nf4",
    ),
    "zero with train.cpu": (
        lambda t, r: ["train", recipe_file(t, train={"strategy": "deepspeed", "cpu": True})],
        "train: cpu: true does not work with strategy: deepspeed",
    ),
    "fsdp wrap class unknown": (
        lambda t, r: [
            "train",
            recipe_file(t, train={"strategy": "fsdp", "fsdp": {"wrap": ["LlamaBlock"]}}),
        ],
        "train.fsdp.wrap: 'LlamaBlock' is not a module class of this model; its blocks are: LlamaDecoderLayer",
    ),
    "lors on gpt2": (
        lambda t, r: [
            "train",
            recipe_file(
                t, model={"name": "tiny-gpt2"}, adapter={"method": "lors", "rank": 4, "init": "kaiming"}
            ),
        ],
        "lors supports nn.Linear layers only",
    ),
    "output dir holds a run": (
        lambda t, r: ["train", recipe_file(t, output={"dir": str(r)})],
        "already holds a run",
    ),
    "resume without checkpoint": (
        lambda t, r: ["train", recipe_file(t), "--resume"],
        "has no checkpoint to resume from",
    ),
    # data files
    "empty data file": (lambda t, r: ["train", recipe_file(t), *data_file(t, "e.jsonl", b"")], "is empty"),
    "wrong columns": (
        lambda t, r: ["train", recipe_file(t), *data_file(t, "c.jsonl", b'{"q": 1}\n')],
        "cannot tell the format",
    ),
    "non-utf8 data": (
        lambda t, r: ["train", recipe_file(t), *data_file(t, "l.jsonl", b'{"text": "caf\xe9"}\n')],
        "is not UTF-8",
    ),
    "truncated parquet": (
        lambda t, r: ["train", recipe_file(t), *data_file(t, "t.parquet", b"PAR1\x00\x01")],
        "cannot read",
    ),
    "json not a list": (
        lambda t, r: ["train", recipe_file(t), *data_file(t, "o.json", b'{"a": 1}')],
        "must hold a JSON list",
    ),
    "invalid jsonl line": (
        lambda t, r: ["train", recipe_file(t), *data_file(t, "i.jsonl", b'{"text": "a"}\n{bad\n')],
        "line 2 is not valid JSON",
    ),
    "unsupported data type": (
        lambda t, r: ["train", recipe_file(t), *data_file(t, "d.xlsx", b"x")],
        "unsupported file type",
    ),
    # adapter directories and safetensors
    "not an adapter dir": (lambda t, r: ["eval", str(t)], "not a shardtune adapter directory"),
    "no such run": (
        lambda t, r: ["generate", "-a", str(t / "none"), "hi"],
        "no such run or adapter directory",
    ),
    "corrupt safetensors": (
        lambda t, r: [
            "generate",
            "-a",
            copy_run(r, t, lambda d: (d / "adapter.safetensors").write_bytes(b"\x08garbage")),
            "hi",
        ],
        "corrupt or truncated safetensors",
    ),
    "truncated safetensors": (
        lambda t, r: ["eval", copy_run(r, t, lambda d: _truncate(d / "adapter.safetensors"))],
        "corrupt or truncated safetensors",
    ),
    "corrupt adapter.json": (
        lambda t, r: [
            "merge",
            copy_run(r, t, lambda d: (d / "adapter.json").write_text("{nope")),
            "--out",
            str(t / "m"),
        ],
        "corrupt adapter config",
    ),
    "adapter from the future": (
        lambda t, r: ["export", copy_run(r, t, lambda d: _bump(d / "adapter.json")), "--out", str(t / "x")],
        "written by a newer shardtune",
    ),
    "adapter on the wrong base": (
        lambda t, r: ["generate", "-a", str(r), "-m", "tiny-gpt2", "hi"],
        "is it the right base model?",
    ),
    "merge into its own run": (
        lambda t, r: ["merge", str(r), "--out", str(r)],
        "is the input",
    ),
    "export unknown format": (
        lambda t, r: ["export", str(r), "--format", "gguf", "--out", str(t / "x")],
        "unknown format 'gguf'",
    ),
    "prune bad pattern": (
        lambda t, r: ["prune", "tiny-llama", "--out", str(t / "p"), "--pattern", "2-4"],
        "--pattern: expected N:M",
    ),
    "params unknown method": (
        lambda t, r: ["params", "--model", "tiny-llama", "--method", "nope"],
        "--method: unknown method",
    ),
    # an error names where the bad value came from: the option, the recipe key, the recorded field
    "generate --model missing": (
        lambda t, r: ["generate", "hi", "-m", str(t / "gone")],
        "error: --model: <GONE> is not a directory",
    ),
    "generate -a with --model missing": (
        lambda t, r: ["generate", "hi", "-a", str(r), "-m", str(t / "gone")],
        "error: --model: <GONE> is not a directory",
    ),
    "eval --model missing": (
        lambda t, r: ["eval", "-m", str(t / "gone"), "--data", _write(t, "d.jsonl", b'{"text": "a"}\n')],
        "error: --model: <GONE> is not a directory",
    ),
    "eval --data missing": (
        lambda t, r: ["eval", str(r), "--data", str(t / "gone.jsonl")],
        "error: --data: ",
    ),
    "eval --data not json": (
        lambda t, r: ["eval", str(r), "--data", _write(t, "d.jsonl", b"{oops\n")],
        "error: --data: ",
    ),
    "eval --format unknown": (
        lambda t, r: ["eval", str(r), "--data", _write(t, "d.jsonl", b'{"text": "a"}\n'), "--format", "csv"],
        "error: --format: must be one of 'auto', 'text'",
    ),
    "eval --base-model missing": (
        lambda t, r: ["eval", str(r), "--base-model", str(t / "gone")],
        "error: --base-model: <GONE> is not a directory",
    ),
    "merge --base-model missing": (
        lambda t, r: ["merge", str(r), "--out", str(t / "m"), "--base-model", str(t / "gone")],
        "error: --base-model: <GONE> is not a directory",
    ),
    "export with its base moved": (
        lambda t, r: ["export", copy_run(r, t, _base_moved), "--out", str(t / "x")],
        "adapter.json: base_model.name: /moved/away is not a directory (give the base model with --base-model)",
    ),
    "merge with its base moved": (
        lambda t, r: ["merge", copy_run(r, t, _base_moved), "--out", str(t / "x")],
        "adapter.json: base_model.name: /moved/away is not a directory (give the base model with --base-model)",
    ),
    "generate with its base moved": (
        lambda t, r: ["generate", "-a", copy_run(r, t, _base_moved), "hi"],
        "adapter.json: base_model.name: /moved/away is not a directory (give the base model with --model)",
    ),
    "routing with its base moved": (
        lambda t, r: ["routing", copy_run(r, t, _base_moved)],
        "adapter.json: base_model.name: /moved/away is not a directory (give the base model with --base-model)",
    ),
    "prune MODEL missing": (
        lambda t, r: ["prune", str(t / "gone"), "--out", str(t / "p")],
        "error: MODEL: <GONE> is not a directory",
    ),
    "params --recipe with a missing model": (
        lambda t, r: ["params", "--recipe", recipe_file(t, model={"name": str(t / "gone")})],
        "error: model.name: <GONE> is not a directory",
    ),
    "params --model missing": (
        lambda t, r: ["params", "--model", str(t / "gone")],
        "error: --model: <GONE> is not a directory",
    ),
    "params --set adapter.method": (
        lambda t, r: ["params", "-m", "tiny-llama", "--method", "lora", "--set", "adapter.method=fossil"],
        "error: --set adapter.method=fossil: give the method with --method",
    ),
    "params --set a bad value": (
        lambda t, r: ["params", "-m", "tiny-llama", "--set", "adapter.rank=0"],
        "error: adapter.rank: must be a positive integer, got 0",
    ),
    "params --set a typo": (
        lambda t, r: ["params", "-m", "tiny-llama", "--set", "adapter.rnak=2"],
        "error: adapter.rnak: unknown key (did you mean 'rank'?)",
    ),
    "params --compare --set a typo": (
        lambda t, r: ["params", "-m", "tiny-llama", "--compare", "--set", "adapter.rnak=2"],
        "error: --set adapter.rnak: no method has this option",
    ),
    "params --compare where no method fits": (
        lambda t, r: ["params", "-m", "tiny-llama", "--compare", "--set", "rank=100000"],
        "error: ",
    ),
    "params --no-double-quant alone": (
        lambda t, r: ["params", "-m", "tiny-llama", "--no-double-quant"],
        "error: --no-double-quant: applies to --quantize nf4 or fp4 only",
    ),
    "params --targets given twice": (
        lambda t, r: [
            "params",
            "-m",
            "tiny-llama",
            "--targets",
            "q_proj",
            "--set",
            "adapter.targets=[v_proj]",
        ],
        "--targets gives adapter.targets already",
    ),
    "generate a prompt past the context": (
        lambda t, r: ["generate", "-m", "tiny-gpt2", "a" * 3000, "--max-new-tokens", "5"],
        "error: PROMPT: prompt 1 has 30",
    ),
    "generate an answer past the context": (
        lambda t, r: ["generate", "-m", "tiny-gpt2", "hello", "--max-new-tokens", "5000"],
        "error: --max-new-tokens: prompt 1 has",
    ),
    "eval --base of a plain model": (
        lambda t, r: [
            "eval",
            "-m",
            "tiny-llama",
            "--data",
            _write(t, "d.jsonl", b'{"text": "a"}\n'),
            "--base",
        ],
        "error: --base: a plain model (--model) has no adapter to turn off",
    ),
    "eval on examples without a token": (
        lambda t, r: [
            "eval",
            str(r),
            "--data",
            _write(t, "e.jsonl", b'{"text": ""}\n{"text": ""}\n'),
            "--json",
        ],
        "no example has a token to measure",
    ),
    "eval --format without --data": (
        lambda t, r: ["eval", str(r), "--format", "alpaca"],
        "error: --format alpaca: applies to --data FILE only",
    ),
    "eval --metric on text records": (
        lambda t, r: [
            "eval",
            str(r),
            "--data",
            _write(t, "d.jsonl", b'{"text": "a"}\n'),
            "--metric",
            "contains",
        ],
        "error: --metric contains: these examples have no completions to score",
    ),
    "routing of nothing": (
        lambda t, r: ["routing", str(t / "gone")],
        "error: <GONE>: no such run directory or recipe file",
    ),
    "routing --set on a trained run": (
        lambda t, r: ["routing", str(r), "--set", "adapter.rank=3"],
        "error: --set adapter.rank=3: ",
    ),
    "routing --plot not a png": (
        lambda t, r: ["routing", str(r), "--plot", str(t / "heat.jpg")],
        "must end in .png",
    ),
    "max_length that leaves nothing to learn": (
        lambda t, r: ["train", recipe_file(t, data={"max_length": 2}), "-q"],
        "error: data.max_length: 2 tokens leave no training example a token to learn from",
    ),
    "a date for a number": (
        lambda t, r: ["train", recipe_file(t), "--set", "train.lr=2024-01-01"],
        "error: train.lr: must be a number, got 2024-01-01 (a date)",
    ),
    "adapter.exclude that matches nothing": (
        lambda t, r: ["train", recipe_file(t, adapter={"exclude": ["nonexistent"]})],
        "error: adapter.exclude: ['nonexistent'] matches none of the layers",
    ),
    # a key that would do nothing with the others as set
    "data.eval_split of a task": (
        lambda t, r: ["train", recipe_file(t), "--set", "data.eval_split=x.jsonl"],
        "error: data.eval_split: applies to data.path or data.hub only",
    ),
    "data.format of a task": (
        lambda t, r: ["train", recipe_file(t), "--set", "data.format=alpaca"],
        "error: data.format: applies to data.path or data.hub only",
    ),
    "model.revision of a builtin": (
        lambda t, r: ["train", recipe_file(t), "--set", "model.revision=main"],
        "error: model.revision: applies to hub ids only; model.name 'tiny-llama' is a builtin alias",
    ),
    "data.num_samples of a file": (
        lambda t, r: [
            "train",
            recipe_file(t, data={"task": None, "path": "x.jsonl"}),
            "--set",
            "data.num_samples=9",
        ],
        "error: data.num_samples: applies to data.task only",
    ),
    "data.revision without hub": (
        lambda t, r: ["train", recipe_file(t), "--set", "data.revision=v1"],
        "error: data.revision: applies to data.hub only",
    ),
    "data.text_field with alpaca": (
        lambda t, r: [
            "train",
            recipe_file(t, data={"task": None, "path": "x.jsonl", "format": "alpaca"}),
            "--set",
            "data.text_field=body",
        ],
        "error: data.text_field: applies to format: text only (format is alpaca)",
    ),
    "fossil mini_r without mini mode": (
        lambda t, r: ["train", recipe_file(t, adapter={"method": "fossil", "rank": 4, "mini_r": 8})],
        "error: adapter.mini_r: applies to mode: mini only (mode is default)",
    ),
}


def _base_moved(run):
    meta = json.loads((run / "adapter.json").read_text())
    meta["base_model"]["name"] = "/moved/away"
    (run / "adapter.json").write_text(json.dumps(meta))


def _write(tmp_path, name, content: bytes) -> str:
    (tmp_path / name).write_bytes(content)
    return str(tmp_path / name)


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _bump(path):
    meta = json.loads(path.read_text())
    meta["format_version"] = 99
    path.write_text(json.dumps(meta))


def test_there_are_at_least_30_cases():
    assert len(CASES) >= 30


@pytest.mark.parametrize("case", list(CASES))
def test_one_line_error_and_nonzero_exit(case, tmp_path, trained):
    make_args, expected = CASES[case]
    expected = expected.replace("<GONE>", str(tmp_path / "gone"))  # a path that does not exist
    result = runner.invoke(app, make_args(tmp_path, trained))
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    # (a note of what an override changed, e.g. `--set data.path=` dropping the task, may come first)
    err = "\n".join(line for line in result.stderr.strip().splitlines() if not line.startswith("note: "))
    assert err.startswith("error: ") and expected in err, err
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in result.output + result.stderr
