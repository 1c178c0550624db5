"""Chat templates: ``data.chat_template`` names the one a run renders chats with.

* ``auto`` (default) — the tokenizer's own when it has one (prompt/completion records are then a user
  turn and an assistant turn); ``true`` — the tokenizer's own, required; ``false`` — none;
* a template shipped here (:data:`TEMPLATES`): ``chatml``, ``qwen``, ``llama-3``, ``mistral``,
  ``gemma``, ``phi-3`` — the formats those model families were tuned on, written to render a chat
  turn by turn (what the loss masks rely on: :func:`shardtune.data.examples.segments` checks it on
  every example, by rendering, and refuses a template that does not);
* a Jinja template itself (a string holding ``{{`` or ``{%``), or a file that holds one (``.jinja``,
  ``.j2``, or any path: read when the run starts; relative to the working directory).

The chosen template is put on the tokenizer (:func:`use_chat_template`), so that training, the
held-out score, ``shardtune eval`` and ``shardtune generate`` of the run all render chats alike.
A role a template cannot render (Gemma has no system role, Mistral no tool role) is a one-line
error naming the turns, raised by the template (``raise_exception``).

The templates render ``bos_token`` where their family's does; shardtune tokenizes the rendered text
without adding special tokens of its own, so the BOS appears once.
"""

from __future__ import annotations

from pathlib import Path

from shardtune.core.errors import RecipeError

# One turn each: ``{role}`` and ``{content}``; the generation prompt opens an assistant turn.
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

QWEN = (
    "{% if messages and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}{% for m in messages %}"
    "{% if m['role'] == 'tool' %}"
    "{{ '<|im_start|>user\\n<tool_response>\\n' + m['content'] + '\\n</tool_response><|im_end|>\\n' }}"
    "{% else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

LLAMA_3 = (
    "{{ bos_token }}{% for m in messages %}"
    "{% set role = 'ipython' if m['role'] == 'tool' else m['role'] %}"
    "{{ '<|start_header_id|>' + role + '<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)

MISTRAL = (
    "{{ bos_token }}{% set system = messages[0]['content'] if messages and messages[0]['role'] == 'system' "
    "else '' %}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{% if not loop.first %}"
    "{{ raise_exception('mistral renders a system turn only at the start') }}{% endif %}"
    "{% elif m['role'] == 'user' %}"
    "{% if system and loop.index0 == 1 %}{{ '[INST] ' + system + '\\n\\n' + m['content'] + ' [/INST]' }}"
    "{% else %}{{ '[INST] ' + m['content'] + ' [/INST]' }}{% endif %}"
    "{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] + eos_token }}"
    "{% else %}{{ raise_exception('mistral has no ' + m['role'] + ' role') }}{% endif %}"
    "{% endfor %}"
)

GEMMA = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] not in ('user', 'assistant') %}"
    "{{ raise_exception('gemma has no ' + m['role'] + ' role (only user and assistant)') }}{% endif %}"
    "{% set role = 'model' if m['role'] == 'assistant' else 'user' %}"
    "{{ '<start_of_turn>' + role + '\\n' + m['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)

PHI_3 = (
    "{% for m in messages %}"
    "{% if m['role'] not in ('system', 'user', 'assistant') %}"
    "{{ raise_exception('phi-3 has no ' + m['role'] + ' role') }}{% endif %}"
    "{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

# in the order of shardtune.core.catalog.CHAT_TEMPLATES (a test checks that both list the same names)
TEMPLATES = {
    "chatml": CHATML,
    "qwen": QWEN,
    "llama-3": LLAMA_3,
    "mistral": MISTRAL,
    "gemma": GEMMA,
    "phi-3": PHI_3,
}


def is_jinja(text: str) -> bool:
    return "{{" in text or "{%" in text


def template_text(setting: str | bool, key: str = "data.chat_template") -> str | None:
    """The Jinja text ``setting`` names; None for the tokenizer's own (auto, true) or none (false)."""
    if isinstance(setting, bool) or setting == "auto":
        return None
    if setting in TEMPLATES:
        return TEMPLATES[setting]
    text = setting
    if not is_jinja(setting):
        path = Path(setting).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise RecipeError(key, f"{setting}: no such template file") from None
        except (OSError, UnicodeDecodeError) as e:
            raise RecipeError(key, f"{setting}: cannot read it ({type(e).__name__}: {e})") from None
    _check_syntax(text, setting, key)
    return text


def _check_syntax(text: str, setting: str, key: str) -> None:
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        ImmutableSandboxedEnvironment().parse(text)
    except TemplateSyntaxError as e:
        where = "" if is_jinja(setting) else f"{setting}: "
        raise RecipeError(key, f"{where}not a Jinja template (line {e.lineno}: {e.message})") from None


def use_chat_template(tokenizer, setting: str | bool, key: str = "data.chat_template") -> None:
    """Put the template ``setting`` names on the tokenizer (nothing for auto, true, false)."""
    text = template_text(setting, key)
    if text is not None:
        tokenizer.chat_template = text
