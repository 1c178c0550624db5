"""What the model is trained on: the tensors of collated, padded batches.

Expected token ids and labels are written out here from the tokenizer alone (prompt ids masked with -100,
completion ids + EOS trained, BOS masked) and compared with what ``shardtune.data.examples`` and the training
loader produce: pad positions (-100 labels, 0 attention mask), a tokenizer that adds BOS, chat turns
(loss on assistant turns only), packing (masks kept across rows), truncation, held-out split, data order.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_recipe
from tokenizers import processors

from shardtune.core.progress import Reporter
from shardtune.data.examples import (
    IGNORE,
    Collator,
    Example,
    encode,
    encode_all,
    load_examples,
    pack,
    prompt_ids,
)
from shardtune.models.loading import byte_tokenizer
from shardtune.recipe.schema import DataSection, recipe_from_dict
from shardtune.training.loop import EpochSampler, build_data

PAD, BOS, EOS = 0, 1, 2


def bos_tokenizer():
    """The byte tokenizer, but one that puts BOS in front of plain text (as Llama's does)."""
    tok = byte_tokenizer()
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS)]
    )
    assert tok("ab").input_ids[0] == BOS
    return tok


def raw(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False).input_ids


def expected_plain(tok, prompt: str, completion: str, bos: bool) -> tuple[list[int], list[int]]:
    """[BOS] + prompt + completion + EOS, with BOS and the prompt masked."""
    p, c = raw(tok, prompt), raw(tok, completion)
    head = [BOS] if bos else []
    ids = head + p + c + [EOS]
    labels = [IGNORE] * (len(head) + len(p)) + c + [EOS]
    return ids, labels


def check_batch(batch: dict, rows: list[tuple[list[int], list[int]]]) -> None:
    """Right padding: ids then PAD, mask 1 then 0, labels then -100 — row by row."""
    width = max(len(ids) for ids, _ in rows)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["input_ids"].shape == (len(rows), width)
    for row, (ids, labels) in enumerate(rows):
        n = len(ids)
        assert batch["input_ids"][row].tolist() == ids + [PAD] * (width - n)
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
        assert batch["labels"][row].tolist() == labels + [IGNORE] * (width - n)


@pytest.mark.parametrize("bos", [False, True])
def test_collated_batch_masks_prompt_bos_and_padding(bos):
    tok = bos_tokenizer() if bos else byte_tokenizer()
    pairs = [("say 1 =", " one"), ("repeat after me: abc =", " abc"), ("x", " a much longer completion")]
    features, truncated = encode_all([Example(p, c) for p, c in pairs], tok, 64)
    assert truncated == 0
    batch = Collator(tok.pad_token_id)(features)
    check_batch(batch, [expected_plain(tok, p, c, bos) for p, c in pairs])
    trained = batch["labels"] != IGNORE
    assert torch.equal(batch["labels"][trained], batch["input_ids"][trained])  # not shifted: HF shifts
    assert not (trained & (batch["attention_mask"] == 0)).any()
    other_pad = Collator(7)(features)  # a tokenizer whose pad id is not 0
    lengths = [len(f["input_ids"]) for f in features]
    assert min(lengths) < max(lengths)
    for row, n in enumerate(lengths):
        assert other_pad["input_ids"][row, n:].tolist() == [7] * (max(lengths) - n)


def test_bos_is_added_once_and_masked_in_prompts_and_chats():
    tok = bos_tokenizer()
    assert prompt_ids(Example("ab", ""), tok, chat=False) == [BOS] + raw(tok, "ab")  # generation sees it too
    assert prompt_ids(Example("ab", ""), byte_tokenizer(), chat=False) == raw(tok, "ab")
    # A chat template that writes BOS itself: the chat row holds exactly that one, masked.
    tok.chat_template = "{{ bos_token }}" + tok.chat_template
    feat, _ = encode(Example("ab", "cd"), tok, 128, chat=True)
    assert feat["input_ids"].count(BOS) == 1 and feat["input_ids"][0] == BOS and feat["labels"][0] == IGNORE
    assert feat["input_ids"] == raw(tok, "<s><|user|>\nab</s>\n<|assistant|>\ncd</s>\n")
    chat_prompt = prompt_ids(Example("ab", ""), tok, chat=True)
    assert chat_prompt == raw(tok, "<s><|user|>\nab</s>\n<|assistant|>\n") and chat_prompt.count(BOS) == 1


def test_chat_rows_train_on_assistant_turns_only():
    tok = byte_tokenizer()
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "U1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "U2"},
        {"role": "assistant", "content": "A2"},
    ]
    pieces = [  # the tiny template, written out: (text, trained)
        ("<|system|>\nBe brief.</s>\n<|user|>\nU1</s>\n<|assistant|>\n", False),
        ("A1</s>\n", True),
        ("<|user|>\nU2</s>\n<|assistant|>\n", False),
        ("A2</s>\n", True),
    ]
    ids = [t for text, _ in pieces for t in raw(tok, text)]
    labels = [t if trained else IGNORE for text, trained in pieces for t in raw(tok, text)]
    from shardtune.data.examples import record_to_example

    example = record_to_example({"messages": messages}, "messages", "test")
    feat, _ = encode(example, tok, 256)
    assert feat == {"input_ids": ids, "labels": labels}
    # prompt/completion rendered as a chat: the user turn is masked, the reply and its end of turn trained
    feat, _ = encode(Example("hi", "yo"), tok, 256, chat=True)
    prompt, reply = "<|user|>\nhi</s>\n<|assistant|>\n", "yo</s>\n"
    assert feat["input_ids"] == raw(tok, prompt + reply)
    assert feat["labels"] == [IGNORE] * len(raw(tok, prompt)) + raw(tok, reply)
    batch = Collator(tok.pad_token_id)([feat, encode(Example("a", "b"), tok, 256, chat=True)[0]])
    assert tok.decode(batch["labels"][0][batch["labels"][0] != IGNORE]) == "yo</s>\n"


def write_rows(tmp_path, rows) -> str:
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_training_loader_batches_are_masked_and_padded(tmp_path):
    """The loader `shardtune train` uses: every batch row is one example, prompt masked, right-padded."""
    rows = [
        {"prompt": f"q{i} " + "z" * (i % 5) + " =", "completion": " " + "ab" * (1 + i % 3)} for i in range(40)
    ]
    raw_recipe = tiny_recipe(
        tmp_path,
        data={"task": None, "path": write_rows(tmp_path, rows), "eval_samples": 8, "chat_template": False},
        train={"batch_size": 8},
    )
    tok = byte_tokenizer()
    recipe = recipe_from_dict(raw_recipe)
    data = build_data(recipe, load_examples(recipe.data), tok, 1, Reporter(quiet=True))
    by_prompt = {r["prompt"]: r["completion"] for r in rows}
    seen = []
    for batch in data.loader:
        texts = []
        for row in range(batch["input_ids"].shape[0]):
            n = int(batch["attention_mask"][row].sum())
            texts.append(tok.decode(batch["input_ids"][row, :n]))
        prompts = [t.split(" =")[0] + " =" for t in texts]
        check_batch(batch, [expected_plain(tok, p, by_prompt[p], bos=False) for p in prompts])
        seen += prompts
    assert len(seen) == len(set(seen)) == 32  # 40 − 8 held out, batches of 8, each example once
    held = {e.prompt for e in data.eval_examples}
    assert len(held) == 8 and not held & set(seen)  # never trained on a held-out example


def test_packing_keeps_prompt_masks(tmp_path):
    rows = [{"prompt": f"copy {i:02d} =", "completion": f" {i:02d}{i:02d}"} for i in range(30)]
    raw_recipe = tiny_recipe(
        tmp_path,
        data={
            "task": None,
            "path": write_rows(tmp_path, rows),
            "eval_samples": 0,
            "chat_template": False,
            "packing": True,
            "max_length": 48,
        },
        train={"batch_size": 4},
    )
    tok = byte_tokenizer()
    recipe = recipe_from_dict(raw_recipe)
    data = build_data(recipe, load_examples(recipe.data), tok, 1, Reporter(quiet=True))
    examples, _ = load_examples(recipe_from_dict(raw_recipe).data)
    expected = []
    for e in examples:  # each example whole, its own masks, its first label masked (no token before it)
        ids, labels = expected_plain(tok, e.prompt, e.completion, bos=False)
        expected.append((ids, [IGNORE] + labels[1:]))
    found = []
    for row in data.train_rows:
        assert len(row["input_ids"]) <= 48 and sum(row["lengths"]) == len(row["input_ids"])
        start = 0
        for n in row["lengths"]:
            found.append((row["input_ids"][start : start + n], row["labels"][start : start + n]))
            start += n
    assert sorted(found) == sorted(expected)  # every example once, never cut, masks kept
    assert len(data.train_rows) == 10  # 15 tokens each: three to a row
    batch = next(iter(data.loader))
    assert batch["input_ids"].shape[0] == 4 and "attention_mask" not in batch
    assert (batch["labels"] == IGNORE).sum() > 0 and (batch["labels"] != IGNORE).sum() > 0


def test_pack_keeps_examples_whole_and_fills_rows_best_first():
    feats = [{"input_ids": [i] * n, "labels": [i] * n} for i, n in enumerate((5, 7, 3, 6, 1))]
    rows = pack(feats, 8)
    # best-fit decreasing: 7 (+1), 6, 5 (+3); each row in the data's own order, the last one short
    assert [r["lengths"] for r in rows] == [[7, 1], [6], [5, 3]]
    assert rows[0] == {"input_ids": [1] * 7 + [4], "labels": [IGNORE] + [1] * 6 + [IGNORE], "lengths": [7, 1]}
    assert rows[2]["input_ids"] == [0] * 5 + [2] * 3
    assert pack(feats[:1], 8) == [{"input_ids": [0] * 5, "labels": [IGNORE] + [0] * 4, "lengths": [5]}]
    assert pack(feats, 8) == rows  # deterministic


def test_truncation_keeps_the_start_and_drops_rows_with_nothing_to_learn():
    tok = byte_tokenizer()
    ids, labels = expected_plain(tok, "abcdef", "ghij", bos=False)
    feat, truncated = encode(Example("abcdef", "ghij"), tok, 8)
    assert truncated and feat == {"input_ids": ids[:8], "labels": labels[:8]}
    feat, truncated = encode(Example("abcdef", "ghij"), tok, len(ids))  # exactly max_length: not truncated
    assert not truncated and feat == {"input_ids": ids, "labels": labels}
    features, n = encode_all([Example("abcdefgh", "ij"), Example("ab", "cd")], tok, 8)
    assert n == 1 and len(features) == 1  # the first lost its whole completion
    assert features[0]["input_ids"] == expected_plain(tok, "ab", "cd", bos=False)[0]
    # text rows: the first token is never a target (nothing predicts it), so one token is nothing to learn
    assert encode_all([Example("", "abc")], tok, 1)[0] == []
    assert len(encode_all([Example("", "abc")], tok, 2)[0]) == 1


def test_heldout_split_is_disjoint_seeded_and_complete(tmp_path):
    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(50)]
    path = write_rows(tmp_path, rows)
    train, held = load_examples(DataSection(path=path, eval_samples=8, seed=3))
    assert len(held) == 8 and len(train) == 42
    assert {e.prompt for e in train} | {e.prompt for e in held} == {r["prompt"] for r in rows}
    assert not {e.prompt for e in train} & {e.prompt for e in held}
    again, held_again = load_examples(DataSection(path=path, eval_samples=8, seed=3))
    assert again == train and held_again == held
    _, other = load_examples(DataSection(path=path, eval_samples=8, seed=4))
    assert other != held
    _, asked = load_examples(DataSection(path=path, eval_samples=30, seed=3))
    assert len(asked) == 30  # set: exactly as many as asked
    _, unset = load_examples(DataSection(path=path, seed=3))
    assert len(unset) == 10  # unset: a fifth of the data (at most 64)


def test_epoch_sampler_gives_a_fresh_permutation_per_epoch():
    sampler = EpochSampler(20, seed=5)
    orders = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        orders.append(list(sampler))
        assert sorted(orders[-1]) == list(range(20))
    assert orders[0] != orders[1] != orders[2]
    sampler.set_epoch(1)
    assert list(sampler) == orders[1]  # a pure function of (seed, epoch): resume sees the same order
    assert list(EpochSampler(20, seed=6)) != orders[0]


def test_plain_text_rows_train_every_token_and_eos_also_with_a_chat_template():
    """``text`` rows have no prompt: never rendered as a chat, every token (after BOS) and EOS trained."""
    for tok, head in ((byte_tokenizer(), []), (bos_tokenizer(), [BOS])):
        for chat in (False, True):
            feat, _ = encode(Example("", "just text"), tok, 64, chat=chat)
            body = raw(tok, "just text") + [EOS]
            assert feat == {"input_ids": head + body, "labels": [IGNORE] * len(head) + body}
