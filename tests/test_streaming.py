"""Streaming (``data.streaming``): records read as training needs them, window by window, from every
kind of source; the position in each stream saved in the checkpoint and a resumed run continuing at
the very next row; files checked whole (a record at a time) before anything is written."""

from __future__ import annotations

import csv
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import resumed_and_uninterrupted, tiny_recipe
from typer.testing import CliRunner

from shardtune.cli import app
from shardtune.data import examples as examples_module
from shardtune.data.examples import Example, encode_all
from shardtune.data.streaming import StreamedRows, open_streams
from shardtune.models.loading import byte_tokenizer
from shardtune.recipe.schema import recipe_from_dict

sys.path.insert(0, str(Path(__file__).parent))
from fakehub import FakeHub  # noqa: E402
from test_hub import hub_env, shardtune  # noqa: E402

runner = CliRunner()


def rows_of(n: int, tag: str = "r") -> list[dict]:
    return [{"prompt": f"{tag} q{i} =", "completion": f" {tag}{i}"} for i in range(n)]


def write(path: Path, rows: list[dict]) -> Path:
    """``rows`` in the file kind ``path``'s suffix says (a directory: datasets' save_to_disk)."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".csv":
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif path.suffix == ".txt":
        path.write_text("".join(r["prompt"] + r["completion"] + "\n" for r in rows))
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=7)  # several row groups
    else:
        import datasets

        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


def data_section(path, **data) -> object:
    raw = tiny_recipe(Path("/tmp"), data={"task": None, "path": str(path), "streaming": True, **data})
    return recipe_from_dict(raw).data


@functools.cache
def tokenizer():
    return byte_tokenizer()


def tokenize(window):
    return encode_all(window, tokenizer(), 48)


KINDS = ["a.jsonl", "a.csv", "a.txt", "a.parquet", "saved"]


@pytest.mark.parametrize("name", KINDS)
def test_a_resumed_stream_gives_exactly_the_rows_the_uninterrupted_one_gives_next(tmp_path, name):
    """For every kind of file: read some rows, save the state (through JSON, as a checkpoint does),
    open the source afresh, restore: the next rows — across window ends and the end of a pass — are
    the ones the uninterrupted stream gives."""
    path = write(tmp_path / name, rows_of(40))
    data = data_section(path, eval_samples=5, stream_window=6, packing=name.endswith("l"))
    stream, held = open_streams(data)
    rows = StreamedRows(stream, tokenize, data.packing, data.max_length)
    for _ in range(9):
        rows.next_row()
    state = json.loads(json.dumps(rows.state_dict()))
    expected = [rows.next_row() for _ in range(60)]  # past the end of the 35 training records
    again, _ = open_streams(data)
    resumed = StreamedRows(again, tokenize, data.packing, data.max_length)
    resumed.check_state(state, "trainer_state.json")
    resumed.load_state_dict(state)
    assert [resumed.next_row() for _ in range(60)] == expected
    assert stream.sources[0].epoch >= 1  # the pass ended and began again


@pytest.mark.parametrize("name", KINDS)
def test_held_out_are_the_first_records_and_a_pass_trains_on_each_of_the_rest_once(tmp_path, name):
    path = write(tmp_path / name, rows_of(30))
    data = data_section(path, eval_samples=4, stream_window=5)
    stream, held = open_streams(data)
    first = [stream.sources[0].next_example() for _ in range(26)]
    if name.endswith(".txt"):
        assert [e.completion for e in held] == [f"r q{i} = r{i}" for i in range(4)]
        assert sorted(e.completion for e in first) == sorted(f"r q{i} = r{i}" for i in range(4, 30))
    else:
        assert held == [Example(f"r q{i} =", f" r{i}") for i in range(4)]
        assert sorted(first, key=lambda e: int(e.completion[2:])) == [
            Example(f"r q{i} =", f" r{i}") for i in range(4, 30)
        ]
    assert stream.sources[0].epoch == 0
    assert stream.sources[0].next_example() == first[0] and stream.sources[0].epoch == 1


def test_a_window_shuffles_only_its_own_examples_and_the_seed_decides_the_order(tmp_path):
    """``data.stream_window``: the first window's rows are the first W training records, shuffled;
    a larger window reaches further; the same seed gives the same order, another seed another."""
    path = write(tmp_path / "a.jsonl", rows_of(60))

    def first_window(**data) -> list[int]:
        stream, _ = open_streams(data_section(path, eval_samples=0, **data))
        return [int(e.completion[2:]) for e in stream.draw(0)]

    small = first_window(stream_window=8)
    assert sorted(small) == list(range(8)) and small != list(range(8))  # the first 8, shuffled
    assert first_window(stream_window=8) == small
    assert first_window(stream_window=8, seed=1) != small
    wide = first_window(stream_window=50)
    assert sorted(wide) == list(range(50)) and wide[:8] != small


def test_a_streamed_mixture_draws_by_weight_and_never_trains_on_held_out_examples(tmp_path):
    a = write(tmp_path / "a.jsonl", rows_of(200, "A"))
    b = write(tmp_path / "b.jsonl", rows_of(100, "B") + rows_of(5, "A"))  # B repeats A's first five
    raw = tiny_recipe(tmp_path, data={"task": None, "streaming": True, "stream_window": 100})
    del raw["data"]["task"], raw["data"]["eval_samples"]
    raw["data"]["sources"] = [
        {"path": str(a), "weight": 3, "eval_samples": 5},
        {"path": str(b), "weight": 1, "eval_samples": 3},
    ]
    said = []
    stream, held = open_streams(recipe_from_dict(raw).data, said.append)
    drawn = [e for w in range(20) for e in stream.draw(w)]
    share = sum(e.prompt.startswith("A") for e in drawn) / len(drawn)
    assert 0.72 < share < 0.78  # 3 : 1
    assert not set(drawn) & set(held)  # A's held-out five are in b.jsonl too: never trained on
    assert len(held) == 8 and all("records checked" in line for line in said) and len(said) == 2


def test_streaming_never_reads_a_file_whole(tmp_path, monkeypatch):
    """The streamed path reads records one at a time: the whole-file readers are never called."""

    def whole(*args, **kwargs):
        raise AssertionError("read whole")

    for name in ("read_records", "_read_json_file", "_read_csv_file", "_load_with_datasets", "_read_text"):
        monkeypatch.setattr(examples_module, name, whole)
    for name in ("a.jsonl", "a.csv", "a.parquet"):
        stream, _ = open_streams(data_section(write(tmp_path / name, rows_of(30)), eval_samples=2))
        StreamedRows(stream, tokenize, True, 48).first_rows(3)


def stream_recipe(tmp_path: Path, path: Path, **data) -> dict:
    return tiny_recipe(
        tmp_path,
        data={"task": None, "path": str(path), "streaming": True, "eval_samples": 8, **data},
        train={"max_steps": 8, "batch_size": 4, "save_every": 4, "seed": 0},
    )


def test_a_streamed_packed_mixture_resumes_exactly_from_its_checkpoint(tmp_path):
    """Killed at step 4 of 8 (2 micro-batches a step; in the middle of a window, a source past its first
    pass): the resumed run's adapter equals the uninterrupted run's, bit for bit; the checkpoint holds
    the position."""
    a = write(tmp_path / "a.jsonl", rows_of(40, "A"))
    b = write(tmp_path / "b.parquet", rows_of(30, "B"))

    def make(where: Path) -> object:
        raw = stream_recipe(where, a, stream_window=7, packing=True)
        raw["train"]["grad_accum"] = 2  # (a checkpoint between micro-batches would show)
        del raw["data"]["path"], raw["data"]["eval_samples"]
        raw["data"]["sources"] = [
            {"path": str(a), "weight": 2, "eval_samples": 4},
            {"path": str(b), "weight": 1, "eval_samples": 4},
        ]
        return recipe_from_dict(raw)

    again, final = resumed_and_uninterrupted(make, tmp_path, checkpoint=4)
    assert again.keys() == final.keys() and all(torch.equal(again[k], final[k]) for k in final)
    state = json.loads((tmp_path / "run" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["stream"]["window"] > 0 and len(state["stream"]["sources"]) == 2


def run_cli(tmp_path: Path, raw: dict, *extra: str):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return runner.invoke(app, ["train", str(path), "-q", *extra])


def half_bad(tmp_path: Path, kind: str) -> tuple[Path, str]:
    """A file of 300 good records with a bad one at line/row 200, and what the error must say."""
    good = rows_of(300)
    path = tmp_path / ("data.csv" if kind == "csv" else "data.jsonl")
    if kind == "csv":
        write(path, good)
        lines = path.read_text().splitlines(keepends=True)
        lines[200] = "just one field\n"
        path.write_text("".join(lines))
        return path, f"data.path: {path} line 201 has 1 fields; the header has 2 (prompt, completion)"
    write(path, good)
    lines = path.read_bytes().splitlines(keepends=True)
    lines[199] = {
        "json": b'{"prompt": "cut short\n',
        "utf8": b'{"prompt": "\xff", "completion": "x"}\n',
        "format": b'{"prompt": "no completion"}\n',
    }[kind]
    path.write_bytes(b"".join(lines))
    return path, {
        "json": f"data.path: {path} line 200 is not valid JSON",
        "utf8": f"data.path: {path} line 200 is not UTF-8 text",
        "format": f"data.path: {path} line 200 has no string field 'completion'",
    }[kind]


@pytest.mark.parametrize("kind", ["json", "utf8", "format", "csv"])
def test_a_streamed_file_that_turns_invalid_half_way_is_one_line_and_no_run_directory(tmp_path, kind):
    path, message = half_bad(tmp_path, kind)
    # (windows of 8: the run's 32 rows would never reach line 200; the check before the run does)
    result = run_cli(tmp_path, stream_recipe(tmp_path, path, stream_window=8))
    assert result.exit_code == 2, result.output
    assert message in result.output and result.output.count("\n") == 1, result.output
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"train": {"max_steps": None, "epochs": 1}},
            "train.max_steps: streamed data has no length known ahead",
        ),
        (
            {"data": {"stream_window": 10, "streaming": False}},
            "data.stream_window: applies to data.streaming",
        ),
        ({"data": {"num_proc": 2}}, "data.num_proc: streamed data is tokenized as it is read"),
        ({"data": {"eval_samples": 50}}, "data.eval_samples: 50 is not less than the 50 examples"),
        ({"data": {"path": "JSON"}}, "is one JSON document, read whole; data.streaming reads a record"),
        ({"data": {"split": "test"}}, "data.split: applies to hub datasets"),
    ],
)
def test_streaming_keys_that_cannot_hold_are_one_line(tmp_path, change, message):
    path = write(tmp_path / "d.jsonl", rows_of(50))
    (tmp_path / "d.json").write_text(json.dumps(rows_of(50)))
    raw = stream_recipe(tmp_path, path)
    for section, values in change.items():
        for key, value in values.items():
            if value == "JSON":
                value = str(tmp_path / "d.json")
            if value is None:
                raw[section].pop(key, None)
            else:
                raw[section][key] = value
    result = run_cli(tmp_path, raw)
    assert result.exit_code == 2 and message in result.output, result.output
    assert result.output.count("\n") == 1 and not (tmp_path / "run").exists()


def test_a_streamed_mixture_source_needs_a_weight(tmp_path):
    path = write(tmp_path / "d.jsonl", rows_of(50))
    raw = stream_recipe(tmp_path, path)
    del raw["data"]["path"], raw["data"]["eval_samples"]
    raw["data"]["sources"] = [{"path": str(path), "weight": 1}, {"path": str(path), "num_samples": 10}]
    result = run_cli(tmp_path, raw)
    assert result.exit_code == 2 and "data.sources.1.num_samples: a streamed mixture draws" in result.output


def test_a_streamed_run_trains_evaluates_and_says_what_it_read(tmp_path):
    path = write(tmp_path / "d.jsonl", rows_of(120))
    raw = stream_recipe(tmp_path, path, packing=True)
    result = run_cli(tmp_path, raw, "--json")
    assert result.exit_code == 0, result.output
    log = (tmp_path / "run" / "train.log").read_text()
    assert f"data.streaming: {path}: 120 records checked" in log
    assert "data: streamed from 1 source in windows of 1000 examples, packed, 8 held out" in log
    done = runner.invoke(app, ["eval", str(tmp_path / "run"), "--json"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["adapter"]["examples"] == 8


def test_a_checkpoint_of_an_edited_file_or_edited_position_is_refused(tmp_path):
    path = write(tmp_path / "d.jsonl", rows_of(120))
    raw = stream_recipe(tmp_path, path, stream_window=8)
    assert run_cli(tmp_path, raw).exit_code == 0
    checkpoint = tmp_path / "run" / "checkpoint-4"
    state_file = checkpoint / "trainer_state.json"
    state = json.loads(state_file.read_text())
    position = state["stream"]["sources"][0]["position"]
    assert position["size"] == path.stat().st_size
    edited = dict(
        state, stream=dict(state["stream"], sources=[{"epoch": 0, "position": dict(position, offset=3)}])
    )
    state_file.write_text(json.dumps(edited))
    result = run_cli(tmp_path, raw, "--resume-from", str(checkpoint))
    assert result.exit_code == 2 and "key 'stream' source 0: the position is not at the start of a line" in (
        result.output
    )
    state_file.write_text(json.dumps(state))
    with open(path, "a") as f:
        f.write(json.dumps(rows_of(1)[0]) + "\n")
    result = run_cli(tmp_path, raw, "--resume-from", str(checkpoint))
    assert result.exit_code == 2 and "so the position no longer points at its records" in result.output


@pytest.fixture(scope="module")
def hub():
    rows = rows_of(40)
    rows[19] = {"prompt": "no completion here"}
    good = {
        "data/train.jsonl": "".join(json.dumps(r) + "\n" for r in rows_of(40)).encode(),
        "README.md": b"# d\n",
    }
    bad = {"data/train.jsonl": "".join(json.dumps(r) + "\n" for r in rows).encode(), "README.md": b"# d\n"}
    with FakeHub() as server:
        server.dataset("org/ds").add_commit(good)
        server.dataset("org/bad").add_commit(bad)
        yield server


# In a child process (huggingface_hub reads its settings when imported): open the hub stream, read 5
# rows (or restore a state), print the state and the 30 rows that come next.
HUB_STREAM = """
import json, sys
from shardtune.data.examples import encode_all
from shardtune.data.streaming import StreamedRows, open_streams
from shardtune.models.loading import byte_tokenizer
from shardtune.recipe.schema import recipe_from_dict
raw, state = json.loads(sys.argv[1]), json.loads(sys.argv[2])
tok = byte_tokenizer()
stream, held = open_streams(recipe_from_dict(raw).data)
rows = StreamedRows(stream, lambda w: encode_all(w, tok, 48), False, 48)
if state is None:
    for _ in range(5):
        rows.next_row()
    state = rows.state_dict()
else:
    rows.load_state_dict(state)
print(json.dumps({"held": len(held), "state": state, "next": [rows.next_row()["input_ids"] for _ in range(30)]}))
"""


def hub_child(env: dict, *args: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    return subprocess.run(
        [sys.executable, "-c", *args], env={**full, **env}, capture_output=True, text=True, timeout=300
    )


def test_a_hub_dataset_streams_resumes_exactly_and_streams_offline_from_its_snapshot(hub, tmp_path):
    """Online, the stream is read as it downloads; its state restored offline (the dataset's snapshot in
    the hub cache, as `huggingface-cli download` leaves it) gives the same next rows, with no request."""
    env = hub_env(hub, tmp_path / "hf")
    raw = tiny_recipe(tmp_path, data={"task": None, "hub": "org/ds", "streaming": True, "stream_window": 6})
    online = hub_child(env, HUB_STREAM, json.dumps(raw), "null")
    assert online.returncode == 0, online.stderr
    first = json.loads(online.stdout)
    assert first["held"] == 16 and hub.fetched("train.jsonl") >= 1
    fetch = "from huggingface_hub import snapshot_download; snapshot_download('org/ds', repo_type='dataset')"
    assert hub_child(env, fetch).returncode == 0
    before = len(hub.requests)
    offline = hub_child(
        hub_env(hub, tmp_path / "hf", offline=True), HUB_STREAM, json.dumps(raw), json.dumps(first["state"])
    )
    assert offline.returncode == 0, offline.stderr
    assert json.loads(offline.stdout)["next"] == first["next"]
    assert len(hub.requests) == before  # offline: the snapshot, not a request
    edited = dict(first["state"], sources=[{"epoch": 0, "position": {"state": {"bogus": 1}, "record": 3}}])
    misfit = hub_child(
        hub_env(hub, tmp_path / "hf", offline=True), HUB_STREAM, json.dumps(raw), json.dumps(edited)
    )
    assert "data.hub: the checkpoint's position in the stream of org/ds does not fit it" in misfit.stderr
    # Downloaded by a run without streaming (the datasets cache, no snapshot): streamed offline from it.
    other = tmp_path / "hf-datasets"
    fetch = "import datasets; datasets.load_dataset('org/ds', split='train')"
    assert hub_child(hub_env(hub, other), fetch).returncode == 0
    before = len(hub.requests)
    offline = hub_child(hub_env(hub, other, offline=True), HUB_STREAM, json.dumps(raw), "null")
    assert offline.returncode == 0, offline.stderr
    assert json.loads(offline.stdout)["held"] == 16 and len(hub.requests) == before
    nowhere = hub_child(hub_env(hub, tmp_path / "empty", offline=True), HUB_STREAM, json.dumps(raw), "null")
    assert "data.hub: 'org/ds' is not a hub dataset in the Hugging Face cache" in nowhere.stderr


def test_a_bad_record_met_in_a_hub_stream_stops_the_run_with_one_line(hub, tmp_path):
    """A hub dataset is checked as it streams: record 20 is bad; the run stops there, exit 2, one
    line naming the record; its checkpoints stay."""
    raw = tiny_recipe(
        tmp_path,
        data={"task": None, "hub": "org/bad", "streaming": True, "stream_window": 4, "eval_samples": 2},
        train={"max_steps": 10, "batch_size": 2, "save_every": 2},
    )
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(raw))
    result = shardtune("train", tmp_path / "recipe.yaml", "-q", env=hub_env(hub, tmp_path / "hf"))
    assert result.returncode == 2, result.stderr
    assert (
        result.stderr
        == "error: data.hub: org/bad record 20 has no string field 'completion' (data.format: prompt_completion)\n"
    )
    assert list((tmp_path / "run").glob("checkpoint-*"))


def test_each_process_collates_its_slice_of_the_same_global_batches(tmp_path):
    """Several processes: every one builds the same rows; the global batch is batch_size × processes
    rows in order, process r collating rows r·b … (r+1)·b − 1 — no row twice, none skipped."""
    from shardtune.data.examples import Collator

    data = data_section(write(tmp_path / "a.jsonl", rows_of(50)), eval_samples=2, stream_window=9)

    def ids(rows):
        return [r["input_ids"] for r in rows]

    stream, _ = open_streams(data)
    single = ids(StreamedRows(stream, tokenize, False, 48).first_rows(12))
    collate = Collator(0)
    got = []
    for rank in range(3):
        stream, _ = open_streams(data)
        batches = StreamedRows(stream, tokenize, False, 48).batches(2, 3, rank, collate, "cpu")
        got.append([next(batches)["input_ids"] for _ in range(2)])
    for step in range(2):
        for rank in range(3):
            expected = single[6 * step + 2 * rank : 6 * step + 2 * rank + 2]
            width = got[rank][step].shape[1]
            assert [
                row[: len(e)].tolist() for row, e in zip(got[rank][step], expected, strict=True)
            ] == expected
            assert width == max(len(e) for e in expected)


def test_a_stream_with_nothing_to_learn_from_is_one_line_before_the_run(tmp_path):
    path = tmp_path / "d.jsonl"
    prompts = [{"prompt": "x" * 100 + str(i), "completion": " y"} for i in range(30)]  # fill max_length
    path.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    result = run_cli(tmp_path, stream_recipe(tmp_path, path, stream_window=4, eval_samples=0))
    assert result.exit_code == 2 and "gave no example with a token to learn from" in result.output, (
        result.output
    )
    assert not (tmp_path / "run").exists()
