"""Chat templates (``data.chat_template``): the shipped ones, an inline Jinja template and a file; the
assistant masks checked by rendering each template (not by trusting it); roles a template cannot
render, and templates that cannot be used, are one-line errors; a run keeps its template for eval
and generate; ``data.assistant_turns: last`` trains the last assistant turn only."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import tiny_recipe
from typer.testing import CliRunner

from shardtune.artifacts.checkpoint import load_adapted_model
from shardtune.cli import app
from shardtune.core.catalog import CHAT_TEMPLATES
from shardtune.core.errors import BadInput
from shardtune.data.examples import IGNORE, Example, encode, segments
from shardtune.data.templates import TEMPLATES, template_text
from shardtune.models.loading import byte_tokenizer
from shardtune.recipe.schema import recipe_from_dict

runner = CliRunner()

CHAT = (
    ("system", "Be brief."),
    ("user", "Capital of Peru?"),
    ("assistant", "Lima"),
    ("user", "And of Chile?"),
    ("assistant", "Santiago"),
)
NO_SYSTEM = {"gemma"}  # (Gemma has no system role: its chats start with the user)


def tokenizer_with(name: str):
    tok = byte_tokenizer()
    tok.chat_template = TEMPLATES[name]
    return tok


def render(tok, turns, generation_prompt=False) -> str:
    messages = [{"role": r, "content": c} for r, c in turns]
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def test_the_shipped_templates_are_the_catalogs():
    assert list(TEMPLATES) == list(CHAT_TEMPLATES)


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_each_template_masks_exactly_the_assistant_turns_it_renders(name):
    tok = tokenizer_with(name)
    turns = CHAT[1:] if name in NO_SYSTEM else CHAT
    pieces = segments(Example(messages=turns), tok, chat=True)
    assert "".join(text for text, _ in pieces) == render(
        tok, turns
    )  # the whole chat, as the template renders it
    trained = [text for text, trainable in pieces if trainable]
    context = "".join(text for text, trainable in pieces if not trainable)
    assert (
        len(trained) == 2
        and trained[0].lstrip().startswith("Lima")
        and trained[1].lstrip().startswith("Santiago")
    )
    for role, content in turns:
        if role != "assistant":
            assert content in context and not any(content in t for t in trained)
    # the generation prompt is context: what the model sees before it answers is never trained on
    assert render(tok, turns[:-1], generation_prompt=True) == "".join(text for text, _ in pieces[:-1])
    last = segments(Example(messages=turns), tok, chat=True, assistant_turns="last")
    assert [t for t, trainable in last if trainable] == trained[1:]
    assert "".join(t for t, _ in last) == render(tok, turns)
    feat, _ = encode(Example(messages=turns), tok, 4096, chat=True, assistant_turns="last")
    learned = tok.decode(
        [i for i, label in zip(feat["input_ids"], feat["labels"], strict=True) if label != IGNORE]
    )
    assert "Santiago" in learned and "Lima" not in learned


@pytest.mark.parametrize(
    "name, turns, refusal",
    [
        ("gemma", CHAT, "gemma has no system role"),
        ("gemma", (("user", "q"), ("tool", "t"), ("assistant", "a")), "gemma has no tool role"),
        ("mistral", (("user", "q"), ("tool", "t"), ("assistant", "a")), "mistral has no tool role"),
        ("phi-3", (("user", "q"), ("tool", "t"), ("assistant", "a")), "phi-3 has no tool role"),
    ],
)
def test_a_role_a_template_cannot_render_is_one_line_naming_the_turns(name, turns, refusal):
    with pytest.raises(BadInput) as refused:
        segments(Example(messages=turns), tokenizer_with(name), chat=True)
    message = str(refused.value)
    assert (
        message.startswith("data.chat_template: the chat template refuses the turns ") and refusal in message
    )
    assert "\n" not in message


@pytest.mark.parametrize("name", ["chatml", "qwen", "llama-3"])
def test_tool_turns_render_as_context(name):
    turns = (("user", "weather?"), ("assistant", "call"), ("tool", "sunny"), ("assistant", "It is sunny."))
    pieces = segments(Example(messages=turns), tokenizer_with(name), chat=True)
    assert "sunny" in "".join(t for t, trainable in pieces if not trainable)
    assert [t.strip().startswith(("call", "It is sunny.")) for t, trainable in pieces if trainable] == [
        True,
        True,
    ]


def test_inline_and_file_templates_and_the_ones_that_cannot_be_used(tmp_path):
    inline = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    assert template_text(inline) == inline
    (tmp_path / "t.jinja").write_text(inline)
    assert template_text(str(tmp_path / "t.jinja")) == inline
    with pytest.raises(BadInput, match=r"^data.chat_template: .*nope.jinja: no such template file$"):
        template_text(str(tmp_path / "nope.jinja"))
    (tmp_path / "bad.jinja").write_text("{% for m in messages %}")
    with pytest.raises(BadInput, match=r"^data.chat_template: .*bad.jinja: not a Jinja template \(line 1: "):
        template_text(str(tmp_path / "bad.jinja"))
    tok = byte_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}{% endfor %}"
    )
    with pytest.raises(
        BadInput, match=r"^data.chat_template: the chat template renders nothing of an assistant turn"
    ):
        segments(Example(messages=(("user", "q"), ("assistant", "a"))), tok, chat=True)
    for value in ("yes", "chatm1"):
        raw = tiny_recipe(tmp_path, data={"chat_template": value})
        with pytest.raises(
            BadInput, match=r"^data.chat_template: must be one of: auto, true, false, a shipped"
        ):
            recipe_from_dict(raw)


def test_a_run_trains_with_its_named_template_and_eval_and_generate_use_it(tmp_path):
    chats = tmp_path / "chats.jsonl"
    rows = [
        {"conversations": [{"from": "human", "value": f"q{i}?"}, {"from": "gpt", "value": f"a{i}"}]}
        for i in range(24)
    ]
    chats.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = tiny_recipe(
        tmp_path,
        data={
            "task": None,
            "path": str(chats),
            "eval_samples": 4,
            "chat_template": "chatml",
            "max_length": 128,
        },
        train={"max_steps": 2},
    )
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    result = runner.invoke(app, ["train", str(tmp_path / "r.yaml")])
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "run" / "adapter.json").read_text())
    assert meta["chat_template"] == TEMPLATES["chatml"]
    _, tokenizer, _ = load_adapted_model(tmp_path / "run")
    assert tokenizer.chat_template == TEMPLATES["chatml"]  # not the tiny tokenizer's own
    done = runner.invoke(
        app, ["generate", "-a", str(tmp_path / "run"), "--max-new-tokens", "2", "--json", "q1?"]
    )
    assert done.exit_code == 0, done.output
    evaluated = runner.invoke(app, ["eval", str(tmp_path / "run"), "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    plain = tiny_recipe(tmp_path / "plain", data={"task": None, "path": str(chats), "eval_samples": 4})
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "r.yaml").write_text(
        yaml.safe_dump({**plain, "train": {**plain["train"], "max_steps": 2}})
    )
    assert runner.invoke(app, ["train", str(tmp_path / "plain" / "r.yaml")]).exit_code == 0
    assert json.loads((tmp_path / "plain" / "run" / "adapter.json").read_text())["chat_template"] is None
