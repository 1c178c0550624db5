"""Data: file types, formats, masks (prompt and chat), truncation, packing, held-out split, tasks."""

from __future__ import annotations

import json

import pytest

from shardtune.core.errors import BadInput
from shardtune.data.examples import (
    IGNORE,
    Example,
    encode,
    encode_all,
    load_examples,
    pack,
    read_records,
    segments,
)
from shardtune.data.tasks import TASKS, exact_match
from shardtune.models.loading import byte_tokenizer
from shardtune.recipe.schema import DataSection

ROWS = [{"instruction": f"Say {i}", "input": "" if i % 2 else "loudly", "output": f"{i}!"} for i in range(30)]


def section(**kw) -> DataSection:
    return DataSection(**{"eval_samples": 5, **kw})


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_formats_detected_from_jsonl(tmp_path):
    train, held = load_examples(section(path=str(write_jsonl(tmp_path / "a.jsonl", ROWS))))
    assert len(train) == 25 and len(held) == 5
    by_prompt = {e.prompt: e for e in train + held}
    assert by_prompt["Say 0\n\nloudly"].completion == "0!"  # alpaca: instruction + blank line + input
    assert by_prompt["Say 1"].completion == "1!"

    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}] * 10
    train, _ = load_examples(section(path=str(write_jsonl(tmp_path / "m.jsonl", rows))))
    assert train[0].messages == (("user", "hi"), ("assistant", "yo"))

    train, _ = load_examples(section(path=str(write_jsonl(tmp_path / "t.jsonl", [{"text": "abc"}] * 10))))
    assert train[0] == Example("", "abc")


def test_csv_parquet_txt_json_and_saved_dataset(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list([{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(20)])
    ds.to_csv(str(tmp_path / "d.csv"))
    ds.to_parquet(str(tmp_path / "d.parquet"))
    (tmp_path / "d.json").write_text(json.dumps(ds.to_list()))
    datasets.DatasetDict({"train": ds, "test": ds.select(range(3))}).save_to_disk(str(tmp_path / "saved"))
    for name in ("d.csv", "d.parquet", "d.json", "saved"):
        train, held = load_examples(section(path=str(tmp_path / name)))
        assert len(train) + len(held) == 20, name
        assert {e.completion for e in train + held} == {f"c{i}" for i in range(20)}
    train, held = load_examples(section(path=str(tmp_path / "saved"), eval_split="test"))
    assert len(train) == 20 and len(held) == 3
    (tmp_path / "lines.txt").write_text("one line\nanother line\n")
    train, held = load_examples(section(path=str(tmp_path / "lines.txt"), eval_samples=0))
    assert [e.completion for e in train] == ["one line", "another line"]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.jsonl", b"", "is empty"),
        ("bad.jsonl", b'{"text": "a"}\n{"text": \n', "line 2 is not valid JSON"),
        ("latin1.jsonl", b'{"text": "caf\xe9"}\n', "is not UTF-8"),
        ("cols.jsonl", b'{"question": "a", "answer": "b"}\n', "cannot tell the format from the record keys"),
        ("broken.parquet", b"PAR1\x00\x00garbage", "cannot read"),
        ("data.xlsx", b"x", "unsupported file type '.xlsx'"),
    ],
)
def test_bad_data_files(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(BadInput, match=message) as err:
        load_examples(section(path=str(tmp_path / name)))
    assert str(err.value).startswith("data")
    assert "\n" not in str(err.value)


def test_wrong_columns_for_explicit_format(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "a"}])
    with pytest.raises(BadInput, match=r"record \d has no string field 'completion'"):
        load_examples(section(path=str(path), format="prompt_completion"))


def test_prompt_mask_plain_and_chat():
    tok = byte_tokenizer()
    feat, _ = encode(Example("ab", "cd"), tok, 64, chat=False)
    assert feat["labels"] == [IGNORE, IGNORE] + feat["input_ids"][2:]
    assert feat["input_ids"][-1] == tok.eos_token_id

    feat, _ = encode(Example("ab", "cd"), tok, 128, chat=True)
    trained = tok.decode(
        [t for t, lab in zip(feat["input_ids"], feat["labels"], strict=True) if lab != IGNORE]
    )
    assert trained == "cd</s>\n"  # only the assistant turn (with its end-of-turn) is learned
    assert tok.decode(feat["input_ids"]).startswith("<|user|>\nab</s>\n<|assistant|>\n")


def test_multi_turn_chat_masks_every_user_turn():
    tok = byte_tokenizer()
    ex = Example(messages=(("user", "u1"), ("assistant", "a1"), ("user", "u2"), ("assistant", "a2")))
    pieces = segments(ex, tok, chat=True)
    assert [(t, trainable) for t, trainable in pieces if trainable] == [
        ("a1</s>\n", True),
        ("a2</s>\n", True),
    ]
    feat, _ = encode(ex, tok, 256)
    assert sum(lab != IGNORE for lab in feat["labels"]) == 2 * len("a1</s>\n") - 2 * 3  # '</s>' is one token


def test_truncation_is_counted_and_packing_fills_rows():
    tok = byte_tokenizer()
    examples = [Example("p", "x" * n) for n in (3, 10, 30)]
    features, n_truncated = encode_all(examples, tok, 16)
    assert n_truncated == 1 and max(len(f["input_ids"]) for f in features) == 16
    rows = pack(features, 16)
    assert (
        all(len(r["input_ids"]) <= 16 for r in rows) and len(rows) == 3
    )  # 16, 12 and 5 tokens: no two share a row
    assert sorted(n for r in rows for n in r["lengths"]) == sorted(len(f["input_ids"]) for f in features)


def test_tasks_are_deterministic_and_scored():
    for task in TASKS.values():
        assert task.generate(5, 0) == task.generate(5, 0)
        assert task.generate(5, 0) != task.generate(5, 1)
    prompt, completion = TASKS["date_format"].generate(1, 0)[0]
    day, month, year = completion.split("/")
    assert prompt == f"Convert the date {year}-{month}-{day} to DD/MM/YYYY format."
    assert exact_match(" 14/05/1983\nmore text", "14/05/1983")
    assert not exact_match("The answer is 14/05/1983", "14/05/1983")
    train, held = load_examples(section(task="date_format", num_samples=50, eval_samples=20))
    assert len(held) == 20 and not {e.prompt for e in train} & {e.prompt for e in held}


def test_offline_cached_hub_dataset(tmp_path, monkeypatch):
    """A dataset repo present only in the hub cache (as a download leaves it) loads with no network."""
    import datasets

    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "datasets--acme--tiny-ds"
    (repo / "snapshots" / revision / "data").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(20)]
    datasets.Dataset.from_list(rows).to_parquet(
        str(repo / "snapshots" / revision / "data" / "train-00000.parquet")
    )
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    train, held = load_examples(section(hub="acme/tiny-ds"))
    assert len(train) + len(held) == 20 and train[0].completion.startswith("c")
    with pytest.raises(
        BadInput, match=r"data.hub: .acme/missing. is not a hub dataset in the Hugging Face cache"
    ):
        load_examples(section(hub="acme/missing"))


def _saved_datasets(tmp_path):
    """A single ``datasets.Dataset`` and a DatasetDict (train: 10, test: 3) written by save_to_disk."""
    import datasets

    ds = datasets.Dataset.from_list([{"prompt": f"Q{i}?", "completion": f"A{i}"} for i in range(10)])
    ds.save_to_disk(str(tmp_path / "dsone"))
    datasets.DatasetDict(train=ds, test=ds.select(range(3))).save_to_disk(str(tmp_path / "dsdict"))
    return tmp_path / "dsone", tmp_path / "dsdict"


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"prompt": "a", \n', r"data.eval_split: \S*held.jsonl line 1 is not valid JSON"),
        (b"", r"data.eval_split: \S*held.jsonl is empty"),
        (b"\n  \n\n", r"data.eval_split: \S*held.jsonl holds no examples"),
        (
            b'{"prompt": "a", "completion": "b"}\n"just a string"\n',
            r"data.eval_split: \S* record 2 is a string",
        ),
    ],
)
def test_errors_in_the_eval_file_name_eval_split(tmp_path, content, message):
    train = write_jsonl(tmp_path / "train.jsonl", [{"prompt": f"p{i}", "completion": "c"} for i in range(10)])
    (tmp_path / "held.jsonl").write_bytes(content)
    with pytest.raises(BadInput, match=message):
        load_examples(section(path=str(train), eval_split=str(tmp_path / "held.jsonl")))


def test_held_out_splits_of_saved_datasets_never_overlap_training(tmp_path):
    one, whole = _saved_datasets(tmp_path)
    with pytest.raises(BadInput, match=r"data.eval_split: \S*dsdict has no split 'nope'; it has train, test"):
        load_examples(section(path=str(whole), eval_split="nope"))
    with pytest.raises(
        BadInput, match=r"data.eval_split: is data.split \('train'\); held-out data must differ"
    ):
        load_examples(section(path=str(whole), eval_split="train"))
    with pytest.raises(
        BadInput, match=r"data.eval_split: \S*dsone is a single datasets.Dataset, which has no"
    ):
        load_examples(section(path=str(one), eval_split="test"))
    train, held = load_examples(section(path=str(whole), eval_split="test", eval_samples=None))
    assert len(train) == 10 and len(held) == 3


def test_split_of_a_file_or_single_dataset_is_refused(tmp_path):
    one, whole = _saved_datasets(tmp_path)
    data = write_jsonl(tmp_path / "a.jsonl", ROWS)
    for path in (data, one):
        with pytest.raises(
            BadInput, match=r"data.split: applies to hub datasets and save_to_disk DatasetDict directories"
        ):
            load_examples(section(path=str(path), split="validation"))
        train, held = load_examples(section(path=str(path), split="train"))  # the default: fine
        assert train and held
    train, held = load_examples(section(path=str(whole), split="test", eval_samples=1))
    assert len(train) + len(held) == 3


def test_utf8_byte_order_mark_is_accepted(tmp_path):
    bom = b"\xef\xbb\xbf"
    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(10)]
    (tmp_path / "a.jsonl").write_bytes(bom + "\n".join(json.dumps(r) for r in rows).encode())
    (tmp_path / "a.json").write_bytes(bom + json.dumps(rows).encode())
    (tmp_path / "a.csv").write_bytes(bom + b"prompt,completion\n" + b"".join(b"p,c\n" for _ in range(10)))
    (tmp_path / "a.txt").write_bytes(bom + b"first line\nsecond line\n")
    for name in ("a.jsonl", "a.json", "a.csv"):
        train, held = load_examples(section(path=str(tmp_path / name)))
        assert len(train) + len(held) == 10 and all(e.prompt.startswith("p") for e in train), name
    train, _ = load_examples(section(path=str(tmp_path / "a.txt"), eval_samples=0))
    assert [e.completion for e in train] == ["first line", "second line"]


@pytest.mark.parametrize("record, kind", [([1, 2], "a list"), ("text", "a string"), (3, "a number")])
def test_record_that_is_not_an_object(tmp_path, record, kind):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(BadInput, match=rf"data.path: \S*a.jsonl record 1 is {kind}, not an object \({{...}}"):
        load_examples(section(path=str(path)))


def test_a_key_given_twice_in_a_record_is_refused(tmp_path):
    """JSON parsers keep the last of two values silently; which one the user meant, only they know."""
    (tmp_path / "d.jsonl").write_text('{"prompt": "a", "prompt": "b", "completion": "c"}\n')
    (tmp_path / "d.json").write_text('[{"prompt": "a", "completion": "c", "completion": "d"}]')
    with pytest.raises(BadInput, match=r"d.jsonl line 1 gives key 'prompt' twice; keep one"):
        read_records(DataSection(path=str(tmp_path / "d.jsonl")))
    with pytest.raises(BadInput, match=r"d.json: a record gives key 'completion' twice; keep one"):
        read_records(DataSection(path=str(tmp_path / "d.json")))


def test_sharegpt_conversations_are_chats_with_their_speakers_named_as_roles(tmp_path):
    rows = [
        {
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": f"q{i}"},
                {"from": "gpt", "value": f"a{i}"},
                {"from": "Human", "value": "again"},  # case does not matter
                {"from": "chatgpt", "value": f"b{i}"},
                {"from": "function_call", "value": "f()"},
                {"from": "observation", "value": "42"},
                {"from": "model", "value": "done"},
            ]
        }
        for i in range(10)
    ]
    path = write_jsonl(tmp_path / "chats.jsonl", rows)
    for fmt in ("auto", "sharegpt"):
        train, held = load_examples(section(path=str(path), format=fmt, eval_samples=2))
        assert len(train) == 8 and len(held) == 2
        (first,) = [e for e in train + held if e.messages[1] == ("user", "q0")]
        assert first.messages == (
            ("system", "Be brief."),
            ("user", "q0"),
            ("assistant", "a0"),
            ("user", "again"),
            ("assistant", "b0"),
            ("assistant", "f()"),
            ("tool", "42"),
            ("assistant", "done"),
        )
    # every assistant turn is learned, as with messages
    tok = byte_tokenizer()
    pieces = segments(first, tok, chat=True)
    assert [t for t, trainable in pieces if trainable][:2] == ["a0</s>\n", "b0</s>\n"]


@pytest.mark.parametrize(
    "record, message",
    [
        (
            {"conversations": [{"from": "alien", "value": "x"}]},
            "turn 1 is from 'alien'; ShareGPT speakers are system, human",
        ),
        ({"conversations": [{"from": "human"}]}, "needs string 'from' and 'value'"),
        ({"conversations": []}, "has no list field 'conversations'"),
        ({"conversations": [{"from": "human", "value": "q"}]}, "has no assistant message to learn from"),
    ],
)
def test_bad_sharegpt_records_are_one_line(tmp_path, record, message):
    path = write_jsonl(tmp_path / "c.jsonl", [record] * 4)
    with pytest.raises(BadInput, match=message) as err:
        load_examples(section(path=str(path), eval_samples=1))
    assert "\n" not in str(err.value)
