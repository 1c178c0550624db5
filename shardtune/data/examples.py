"""Data: records from a builtin task, a local file/directory or a cached hub dataset → token ids with
loss masks → batches.

Formats (``data.format``, ``auto`` decides from the first record's keys):

* ``text`` — ``{"text": ...}``: every token is trained.
* ``prompt_completion`` — ``{"prompt": ..., "completion": ...}``: loss on the completion only.
* ``alpaca`` — ``{"instruction", "input" (optional), "output"}``: prompt = instruction (+ blank line
  + input), completion = output.
* ``messages`` — ``{"messages": [{"role", "content"}, ...]}``: rendered with the tokenizer's chat
  template; loss on the assistant turns only.
* ``sharegpt`` — ``{"conversations": [{"from", "value"}, ...]}``: as ``messages``, the speakers named
  as ShareGPT names them (:data:`SHAREGPT_ROLES`: human, gpt, system and the common aliases).

With ``data.chat_template`` on (``auto``: when the tokenizer has one) prompt/completion and alpaca
examples are rendered as a user turn and an assistant turn too, which is what instruct models
expect. Each example becomes segments ``(text, trainable)`` that are tokenized separately, so the
mask is exact. Plain examples end with the EOS token (trained); chat examples end with the
template's end-of-turn. Examples longer than ``data.max_length`` are truncated from the right and
counted; ``data.packing`` puts several whole examples in each ``max_length`` row, each attending
only to itself (:func:`pack`).
"""

from __future__ import annotations

import bisect
import io
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from shardtune.core.errors import BadInput, RecipeError, first_line, named_as
from shardtune.data.tasks import TASKS
from shardtune.recipe.schema import SOURCE_KEYS, DataSection

IGNORE = -100
CHAT_ROLES = ("system", "user", "assistant", "tool")
# ShareGPT's speakers (``from``) as chat roles: the original names and those other tools write.
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
    "function": "tool",
}
FILE_TYPES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


@dataclass(frozen=True)
class Example:
    """One training example: a prompt/completion pair, plain text (empty prompt), or a chat."""

    prompt: str = ""
    completion: str = ""
    messages: tuple[tuple[str, str], ...] = ()


# ---------------------------------------------------------------------------------------------------
# Records


def _read_text(path: Path, key: str) -> str:
    """The file as text; a UTF-8 byte order mark (as some editors write one) is dropped."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise BadInput(f"{key}: {path} is not UTF-8 text (byte {e.start})") from None


class _RepeatedKey(ValueError):
    pass


def _one_value_per_key(pairs: list) -> dict:
    """A JSON object, refusing a key given twice (JSON parsers keep the last value silently)."""
    seen = {}
    for name, value in pairs:
        if name in seen:
            raise _RepeatedKey(name)
        seen[name] = value
    return seen


def _read_json_file(path: Path, key: str) -> list:
    """A .json file (a list of records, or ``{"data": [...]}``) or a .jsonl file (one record a line);
    ``key`` is the recipe key that named the file."""
    text = _read_text(path, key)
    if path.suffix == ".json":
        try:
            records = json.loads(text, object_pairs_hook=_one_value_per_key)
        except json.JSONDecodeError as e:
            raise BadInput(f"{key}: {path} is not valid JSON (line {e.lineno}: {e.msg})") from None
        except _RepeatedKey as e:
            raise BadInput(f"{key}: {path}: a record gives key {e.args[0]!r} twice; keep one") from None
        if isinstance(records, dict) and isinstance(records.get("data"), list):
            records = records["data"]
        if not isinstance(records, list):
            raise BadInput(f"{key}: {path} must hold a JSON list of records")
        return records
    return [json_line(line, key, path, n) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def json_line(line: str, key: str, path: Path, lineno: int) -> object:
    """One record of a .jsonl file (line ``lineno`` of ``path``, named by recipe key ``key``)."""
    try:
        return json.loads(line, object_pairs_hook=_one_value_per_key)
    except json.JSONDecodeError as e:
        raise BadInput(f"{key}: {path} line {lineno} is not valid JSON ({e.msg})") from None
    except _RepeatedKey as e:
        raise BadInput(f"{key}: {path} line {lineno} gives key {e.args[0]!r} twice; keep one") from None


def _load_with_datasets(
    kind: str, source: str, split: str, key: str, revision: str | None = None, split_key: str = "data.split"
) -> list:
    """parquet / text files, ``save_to_disk`` directories and cached hub datasets. ``key`` is the recipe
    key that named the source and ``split_key`` the one that named the split (errors name them)."""
    import datasets

    quiet_datasets()
    try:
        if kind == "disk":
            ds = _pick_split(datasets.load_from_disk(source), source, split, split_key)
        elif kind == "hub":
            ds = load_hub_dataset(source, split, revision, split_key)
        elif kind == "text":
            # utf-8-sig: a byte order mark is not part of the first example
            ds = datasets.load_dataset(kind, data_files=source, split="train", encoding="utf-8-sig")
        else:
            ds = datasets.load_dataset(kind, data_files=source, split="train")
    except BadInput:
        raise
    except UnicodeDecodeError as e:
        raise BadInput(f"{key}: {source} is not UTF-8 text (byte {e.start})") from None
    except Exception as e:  # datasets/pyarrow raise many types for unreadable input
        first = first_line(e)
        raise BadInput(f"{key}: cannot read {source}: {first}") from None
    return [dict(row) for row in ds]


def _pick_split(ds, source: str, split: str, split_key: str):
    """The split ``split`` of a ``save_to_disk`` DatasetDict. A single Dataset has no splits: it is the
    training data, so a held-out split or a training split other than the default would do nothing
    (or hold out the training examples themselves)."""
    import datasets

    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise BadInput(f"{split_key}: {source} has no split {split!r}; it has {', '.join(ds)}")
        return ds[split]
    if split_key == "data.eval_split":
        raise RecipeError(
            "data.eval_split",
            f"{source} is a single datasets.Dataset, which has no splits to hold out; leave eval_split "
            "unset to hold out data.eval_samples of its records, or save a DatasetDict with a held-out split",
        )
    if split != DataSection.model_fields["split"].default:
        raise RecipeError(
            "data.split",
            f"applies to hub datasets and save_to_disk DatasetDict directories; {source} is a single "
            "datasets.Dataset, which has no splits",
        )
    return ds


def quiet_datasets() -> None:
    """``datasets`` without progress bars or its own error lines (the one-line errors say it)."""
    import datasets

    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity(datasets.utils.logging.CRITICAL)


def load_hub_dataset(
    repo_id: str,
    split: str,
    revision: str | None,
    split_key: str = "data.split",
    key: str = "data.hub",
    streaming: bool = False,
):
    """A hub dataset as ``datasets.load_dataset`` gets it (download once, then the cache; ``streaming``:
    an IterableDataset read as it downloads); offline: from the datasets cache, else from its
    snapshot in the hub cache."""
    import datasets

    from shardtune.models import hub

    hub.check_dataset_id(key, repo_id)
    if not hub.offline():
        try:
            return datasets.load_dataset(repo_id, split=split, revision=revision, streaming=streaming)
        except ValueError as e:
            if "split" in str(e).lower():
                raise BadInput(
                    f"{split_key}: {repo_id} has no split {split!r} ({str(e).splitlines()[0]})"
                ) from None
            raise
        except Exception as e:
            raise hub.describe_failure(key, repo_id, revision, e) from None
    try:
        cached = datasets.load_dataset(repo_id, split=split, revision=revision)
        return cached.to_iterable_dataset() if streaming else cached  # (arrow files, memory-mapped)
    except (ConnectionError, OSError, ValueError):
        pass
    hub.check_available(key, repo_id, revision, repo_type="dataset")
    from huggingface_hub import snapshot_download

    local = snapshot_download(repo_id, repo_type="dataset", revision=revision, local_files_only=True)
    return datasets.load_dataset(local, split=split, streaming=streaming)


def read_records(data: DataSection, key: str | None = None, split_key: str = "data.split") -> list:
    """The records of ``data.path`` / ``data.hub`` (``data.split`` of a hub dataset or DatasetDict).
    ``key`` names the source in errors (default: ``data.path`` / ``data.hub``), ``split_key`` the split:
    the held-out data is read with them set to ``data.eval_split``."""
    if data.hub is not None:
        return _load_with_datasets("hub", data.hub, data.split, key or "data.hub", data.revision, split_key)
    key = key or "data.path"
    path = Path(data.path).expanduser()
    if path.is_dir():
        return _load_with_datasets("disk", str(path), data.split, key, split_key=split_key)
    if not path.is_file():
        raise BadInput(f"{key}: {data.path} not found")
    if path.suffix not in FILE_TYPES:
        raise BadInput(
            f"{key}: {data.path}: unsupported file type {path.suffix!r} (use {', '.join(FILE_TYPES)} "
            "or a datasets save_to_disk directory)"
        )
    if data.split != DataSection.model_fields["split"].default:
        raise RecipeError(
            "data.split",
            f"applies to hub datasets and save_to_disk DatasetDict directories; {data.path} is a single "
            "file (unset data.split; data.eval_split may name a second file of held-out examples)",
        )
    if path.stat().st_size == 0:
        raise BadInput(f"{key}: {data.path} is empty")
    if FILE_TYPES[path.suffix] == "json":
        return _read_json_file(path, key)
    if FILE_TYPES[path.suffix] == "csv":
        return _read_csv_file(path, key)
    return _load_with_datasets(FILE_TYPES[path.suffix], str(path), "train", key)


def _read_csv_file(path: Path, key: str) -> list[dict]:
    """A CSV file with a header row → one record per row, every field a string. A row with more or
    fewer fields than the header is an error naming its line."""
    import csv

    text = _read_text(path, key)
    reader = csv.reader(io.StringIO(text, newline=""))
    header, records = None, []
    try:
        for row in reader:
            if not row:
                continue  # a blank line
            if header is None:
                header = csv_header(row, key, path, reader.line_num)
                continue
            records.append(csv_record(header, row, key, path, reader.line_num))
    except csv.Error as e:
        raise BadInput(f"{key}: {path} line {reader.line_num} is not valid CSV ({e})") from None
    return records


def csv_header(row: list[str], key: str, path: Path, line: int) -> list[str]:
    if len(set(row)) != len(row) or not all(h.strip() for h in row):
        raise BadInput(f"{key}: {path} line {line}: the header needs distinct names")
    return row


def csv_record(header: list[str], row: list[str], key: str, path: Path, line: int) -> dict:
    """A CSV row as a record: as many fields as the header, or an error naming the line."""
    if len(row) != len(header):
        raise BadInput(
            f"{key}: {path} line {line} has {len(row)} fields; the header has {len(header)} ({', '.join(header)})"
        )
    return dict(zip(header, row, strict=True))


def detect_format(record: object) -> str:
    keys = set(record) if isinstance(record, dict) else set()
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if "text" in keys:
        return "text"
    raise BadInput(
        f"data.format: cannot tell the format from the record keys {sorted(keys)}; expected text, "
        "prompt+completion, instruction+output (alpaca), messages or conversations (sharegpt)"
    )


JSON_KINDS = {list: "a list", str: "a string", int: "a number", float: "a number", bool: "true/false"}


def _check_object(rec: object, where: str) -> None:
    """A record must be an object with named fields (a JSON ``{...}``); say what it is instead."""
    if not isinstance(rec, dict):
        kind = "null" if rec is None else JSON_KINDS.get(type(rec), type(rec).__name__)
        raise BadInput(f"{where} is {kind}, not an object ({{...}} with the format's keys)")


def record_to_example(rec: object, fmt: str, where: str, text_field: str = "text") -> Example:
    _check_object(rec, where)

    def field(key: str, optional: bool = False) -> str:
        value = rec.get(key)
        if value is None and optional:
            return ""
        if not isinstance(value, str):
            raise BadInput(f"{where} has no string field {key!r} (data.format: {fmt})")
        return value

    if fmt == "text":
        return Example("", field(text_field))
    if fmt == "prompt_completion":
        return Example(field("prompt"), field("completion"))
    if fmt == "alpaca":
        extra = field("input", optional=True)
        return Example(field("instruction") + (f"\n\n{extra}" if extra else ""), field("output"))
    if fmt == "sharegpt":
        return Example(messages=_checked_turns(_sharegpt_messages(rec, where), where))
    messages = rec.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadInput(f"{where} has no list field 'messages' (data.format: messages)")
    return Example(messages=_checked_turns(messages, where))


def _sharegpt_messages(rec: dict, where: str) -> list:
    """A ShareGPT record's ``conversations`` as ``messages`` (role, content)."""
    turns = rec.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise BadInput(f"{where} has no list field 'conversations' (data.format: sharegpt)")
    messages = []
    for k, turn in enumerate(turns, 1):
        if (
            not isinstance(turn, dict)
            or not isinstance(turn.get("from"), str)
            or not isinstance(turn.get("value"), str)
        ):
            raise BadInput(f"{where}: every turn of 'conversations' needs string 'from' and 'value'")
        role = SHAREGPT_ROLES.get(turn["from"].lower())
        if role is None:
            raise BadInput(
                f"{where}: turn {k} is from {turn['from']!r}; ShareGPT speakers are "
                f"{', '.join(SHAREGPT_ROLES)}"
            )
        messages.append({"role": role, "content": turn["value"]})
    return messages


def _checked_turns(messages: list, where: str) -> tuple[tuple[str, str], ...]:
    """(role, content) of each message, each a string and a role chat templates know; an assistant
    turn to learn from."""
    turns = []
    for k, m in enumerate(messages, 1):
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise BadInput(f"{where}: every message needs string 'role' and 'content'")
        if m["role"] not in CHAT_ROLES:
            raise BadInput(
                f"{where}: message {k} has role {m['role']!r}; chat templates know {', '.join(CHAT_ROLES)}"
            )
        turns.append((m["role"], m["content"]))
    if not any(role == "assistant" for role, _ in turns):
        raise BadInput(f"{where} has no assistant message to learn from")
    return tuple(turns)


DEFAULT_EVAL_SAMPLES = 64


def load_examples(
    data: DataSection, report: Callable[[str], None] | None = None
) -> tuple[list[Example], list[Example]]:
    """Training and held-out examples for the recipe's data section; the two never share a record.
    A mixture (``data.sources``) is read source by source (:func:`_load_mixture`), its lines of
    what each source gave going to ``report``."""
    if data.sources is not None:
        return _load_mixture(data, report or (lambda line: None))
    if data.task is not None:
        return task_examples(data)

    source = data.path or data.hub
    key = "data.path" if data.path else "data.hub"
    records = _some_records(read_records(data), key, source)
    fmt = _format_of(records, data.format, f"{key}: {source}")
    examples = _to_examples(records, fmt, f"{key}: {source}", data.text_field)
    if data.eval_split is not None:
        return examples, _held_out_examples(data, fmt)
    # One source: a seeded shuffle, then the first n_eval are held out and the rest train.
    n_eval = held_out_count(data.eval_samples, len(examples), source)
    random.Random(data.seed).shuffle(examples)
    return examples[n_eval:], examples[:n_eval]


def task_examples(data: DataSection) -> tuple[list[Example], list[Example]]:
    """A builtin task's generated (training, held-out) examples."""
    task = TASKS.get(data.task)
    if task is None:
        raise BadInput(f"data.task: unknown task {data.task!r}; available: {', '.join(TASKS)}")
    n_eval = DEFAULT_EVAL_SAMPLES if data.eval_samples is None else data.eval_samples
    split = task.split(data.num_samples, n_eval, data.seed)
    return [Example(p, c) for p, c in split.train], [Example(p, c) for p, c in split.held]


def held_out_count(eval_samples: int | None, count: int | None, source: str) -> int:
    """How many of a source's ``count`` examples are held out: ``data.eval_samples`` (fewer than
    ``count``), or unset 64, at most a fifth (a source of unknown size: 64)."""
    if eval_samples is None:
        return DEFAULT_EVAL_SAMPLES if count is None else min(DEFAULT_EVAL_SAMPLES, count // 5)
    if count is not None and eval_samples >= count:
        raise RecipeError(
            "data.eval_samples",
            f"{eval_samples} is not less than the {count} examples in {source}; hold out fewer so that some "
            "are left to train on",
        )
    return eval_samples


def _load_mixture(data: DataSection, report: Callable[[str], None]) -> tuple[list[Example], list[Example]]:
    """``data.sources``: each source read as a single-source data section (its own held-out examples,
    drawn as that section would draw them), then mixed:

    * ``num_samples`` — exactly that many training examples (a task generates them; a file's are
      taken in a seeded order, whole passes over it repeated when it holds fewer);
    * ``weight`` — the weighted sources share what is left in proportion to their weights ``wᵢ``,
      in the largest mixture that uses none of their examples twice: with ``pᵢ = wᵢ / Σw`` and
      ``nᵢ`` examples, ``N = minᵢ nᵢ / pᵢ`` and source ``i`` gives ``round(pᵢ · N)``;
    * neither — all of its training examples.

    A training example equal to a held-out one of another source is left out (two sources that
    share records never train on what the other holds out). The mixture is shuffled with ``data.seed``:
    the same recipe gives the same examples in the same order, so a resumed run continues it
    exactly."""
    pools, helds = [], []
    for i, source in enumerate(data.sources):
        where = f"data.sources.{i}"
        with named_as({**{f"data.{k}": f"{where}.{k}" for k in SOURCE_KEYS}, "data": where}):
            train, held = load_examples(_single_source(data, source, where))
        pools.append(train)
        helds.append(held)
    counts = _mixture_counts(data, pools)
    mixture, overlapping = [], 0
    for i, (pool, count) in enumerate(zip(pools, counts, strict=True)):
        picked = _take(pool, count, random.Random(f"shardtune mixture {data.seed} {i}"))
        others = {e for j, held in enumerate(helds) if j != i for e in held}  # (a task's own: its rules)
        kept = [e for e in picked if e not in others]
        overlapping += len(picked) - len(kept)
        mixture += kept
    total = len(mixture)
    for i, (source, count) in enumerate(zip(data.sources, counts, strict=True)):
        name = source.task or source.path or source.hub
        how = (
            f"weight {source.weight:g}"
            if source.weight is not None
            else (f"num_samples {source.num_samples}" if source.num_samples is not None else "all of it")
        )
        report(
            f"data.sources.{i}: {name}: {count} training examples ({100 * count / max(total, 1):.1f}% of "
            f"the mixture; {how}), {len(helds[i])} held out"
        )
    if overlapping:
        report(
            f"data.sources: {overlapping} training examples equal to held-out ones of another source left out"
        )
    random.Random(f"shardtune mixture {data.seed}").shuffle(mixture)
    return mixture, [e for held in helds for e in held]


def _single_source(data: DataSection, source, where: str) -> DataSection:
    """One source of a mixture as the data section of a recipe that had only it."""
    from pydantic import ValidationError

    from shardtune.recipe.schema import first_recipe_error

    own = source.model_dump(exclude={"weight", "num_samples"}, exclude_defaults=True)
    if source.task is not None and source.num_samples is not None:
        own["num_samples"] = source.num_samples  # a task generates exactly this many
    shared = {
        k: getattr(data, k) for k in ("chat_template", "assistant_turns", "packing", "max_length", "seed")
    }
    try:
        return DataSection.model_validate({**own, **shared})
    except ValidationError as e:
        error = first_recipe_error(e, own)
        raise RecipeError(f"{where}.{error.key}", error.problem) from None


def _mixture_counts(data: DataSection, pools: list[list[Example]]) -> list[int]:
    """How many training examples each source gives the mixture (:func:`_load_mixture`)."""
    counts = []
    weighted = [i for i, s in enumerate(data.sources) if s.weight is not None]
    total_weight = sum(data.sources[i].weight for i in weighted)
    largest = min((len(pools[i]) * total_weight / data.sources[i].weight for i in weighted), default=0.0)
    for i, (source, pool) in enumerate(zip(data.sources, pools, strict=True)):
        if source.weight is not None:
            count = min(len(pool), round(source.weight / total_weight * largest))
            if count == 0:
                raise RecipeError(
                    f"data.sources.{i}.weight",
                    f"{source.weight:g} gives this source no example of a mixture of {round(largest)} "
                    f"(its share is {100 * source.weight / total_weight:.2g}%); raise it",
                )
        elif source.num_samples is not None and source.task is None:
            count = source.num_samples
        else:
            count = len(pool)
        counts.append(count)
    return counts


def _take(pool: list[Example], count: int, rng: random.Random) -> list[Example]:
    """``count`` examples of ``pool`` in a seeded order: whole shuffled passes, then part of one."""
    taken = []
    while len(taken) < count:
        order = list(pool)
        rng.shuffle(order)
        taken += order[: count - len(taken)]
    return taken


def _some_records(records: list, key: str, source: str) -> list:
    """The records, or an error naming ``key`` when there are none (an empty held-out set would
    leave eval_loss unmeasured without a word)."""
    if not records:
        raise BadInput(f"{key}: {source} holds no examples")
    return records


def _format_of(records: list, setting: str, source: str) -> str:
    """``data.format``, or with ``auto`` the format the first record's keys say."""
    if setting != "auto":
        return setting
    _check_object(records[0], f"{source} record 1")
    return detect_format(records[0])


def _to_examples(records: list, fmt: str, source: str, text_field: str) -> list[Example]:
    """Records → examples; an error names the record by its number in ``source``."""
    return [record_to_example(r, fmt, f"{source} record {i + 1}", text_field) for i, r in enumerate(records)]


def _held_out_examples(data: DataSection, fmt: str) -> list[Example]:
    """The examples ``data.eval_split`` names (in the training data's format), at most
    ``data.eval_samples`` of them. Errors about the held-out file or split name ``data.eval_split``."""
    held_source = _held_out_source(data)
    if held_source.path != data.path:  # a second file: every error about it is about eval_split
        source = held_source.path
        records = read_records(held_source, key="data.eval_split", split_key="data.eval_split")
    else:  # a split of the same hub dataset or directory
        source = f"split {data.eval_split!r} of {data.path or data.hub}"
        records = read_records(held_source, split_key="data.eval_split")
    records = _some_records(records, "data.eval_split", source)
    where = f"data.eval_split: {source}"
    held = _to_examples(records, fmt, where, data.text_field)
    return held[: DEFAULT_EVAL_SAMPLES if data.eval_samples is None else data.eval_samples]


def _held_out_source(data: DataSection) -> DataSection:
    """Where ``data.eval_split`` points: a split of the same hub dataset or save_to_disk directory, or
    — next to a local data file — a second file."""
    if data.hub is not None or Path(data.path).expanduser().is_dir():
        if data.eval_split == data.split:
            raise RecipeError("data.eval_split", f"is data.split ({data.split!r}); held-out data must differ")
        return data.model_copy(update={"split": data.eval_split})
    second = Path(data.eval_split).expanduser()
    if not second.is_file():
        raise RecipeError(
            "data.eval_split",
            f"{data.path} is a single file, so eval_split must name a second file with the held-out "
            f"examples ({data.eval_split!r} is not one); or leave it unset to hold out data.eval_samples "
            "records of data.path",
        )
    if second.resolve() == Path(data.path).expanduser().resolve():
        raise RecipeError(
            "data.eval_split", f"names data.path itself ({data.path}); held-out data must differ"
        )
    return data.model_copy(update={"path": str(second), "eval_split": None})


# ---------------------------------------------------------------------------------------------------
# Tokens


def uses_chat(tokenizer: PreTrainedTokenizerBase, setting: str | bool) -> bool:
    """Whether examples are rendered as chats (``data.chat_template``; a named template is on the
    tokenizer by now, :mod:`shardtune.data.templates`)."""
    has = bool(getattr(tokenizer, "chat_template", None))
    if setting == "auto":
        return has
    if isinstance(setting, str):  # a shipped, inline or file template
        return True
    if setting and not has:
        raise BadInput("data.chat_template: the tokenizer has no chat template")
    return bool(setting)


def _render(tokenizer, turns, add_generation_prompt: bool) -> str:
    from jinja2 import TemplateError

    messages = [{"role": r, "content": c} for r, c in turns]
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except TemplateError as e:
        roles = " → ".join(r for r, _ in turns)
        raise BadInput(f"data.chat_template: the chat template refuses the turns {roles} ({e})") from None


def segments(
    example: Example, tokenizer: PreTrainedTokenizerBase, chat: bool, assistant_turns: str = "all"
) -> list[tuple[str, bool]]:
    """The example as ``(text, trainable)`` pieces, in order: each assistant turn trainable (with
    ``assistant_turns="last"`` only the last one), everything else context. Each piece is the
    difference between two renderings of the chat by its template — up to the turn with the
    generation prompt, and through it — so the masks are what the template really renders, and a
    template that does not render turn by turn is refused."""
    turns = example.messages or (
        (("user", example.prompt), ("assistant", example.completion)) if chat and example.prompt else ()
    )
    if turns:
        if not getattr(tokenizer, "chat_template", None):
            raise BadInput("data.format: messages needs a tokenizer with a chat template")
        out, done = [], ""
        last = max((k for k, (role, _) in enumerate(turns) if role == "assistant"), default=-1)
        for k, (role, _) in enumerate(turns):
            if role != "assistant":
                continue
            before = _render(tokenizer, turns[:k], add_generation_prompt=True)
            full = _render(tokenizer, turns[: k + 1], add_generation_prompt=False)
            if not before.startswith(done) or not full.startswith(before):
                raise BadInput("data.chat_template: the chat template does not render turns incrementally")
            if full == before and turns[k][1].strip():
                raise BadInput(
                    "data.chat_template: the chat template renders nothing of an assistant turn (the turns "
                    f"{' → '.join(r for r, _ in turns[: k + 1])}): there would be nothing to learn"
                )
            out += [
                (before[len(done) :], False),
                (full[len(before) :], assistant_turns == "all" or k == last),
            ]
            done = full
        return [(text, trainable) for text, trainable in out if text]
    return [(example.prompt, False), (example.completion, True)]


def prompt_ids(example: Example, tokenizer: PreTrainedTokenizerBase, chat: bool) -> list[int]:
    """Token ids of the prompt as the model sees it before generating the completion (a chat: every
    turn before its last assistant turn)."""
    if example.messages:
        last = max(k for k, (role, _) in enumerate(example.messages) if role == "assistant")
        text = _render(tokenizer, example.messages[:last], add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False).input_ids
    if chat:
        text = _render(tokenizer, (("user", example.prompt),), add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False).input_ids
    return _bos(tokenizer) + tokenizer(example.prompt, add_special_tokens=False).input_ids


def prompt_text(example: Example) -> str:
    """The prompt as a person reads it (a chat: its last user turn before the answer)."""
    if example.messages:
        return next((c for role, c in reversed(example.messages[:-1]) if role == "user"), "")
    return example.prompt


def expected_answer(example: Example) -> str:
    """What a scored answer is compared with: the completion, or a chat's last assistant turn."""
    if example.messages:
        return next(content for role, content in reversed(example.messages) if role == "assistant")
    return example.completion


def all_examples(data: DataSection) -> list[Example]:
    """Every record of ``data.path`` / ``data.hub`` as an example (no split): for evaluating on a file."""
    source = data.path or data.hub
    key = "data.path" if data.path else "data.hub"
    records = _some_records(read_records(data), key, source)
    fmt = _format_of(records, data.format, f"{key}: {source}")
    return _to_examples(records, fmt, f"{key}: {source}", data.text_field)


def _bos(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """[BOS] if the tokenizer puts one in front of plain text by itself, else []."""
    if tokenizer.bos_token_id is None:
        return []
    ids = tokenizer("a", add_special_tokens=True).input_ids
    return [tokenizer.bos_token_id] if ids and ids[0] == tokenizer.bos_token_id else []


def encode(
    example: Example,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    chat: bool = False,
    assistant_turns: str = "all",
) -> tuple[dict, bool]:
    """Token ids and labels (non-trainable segments masked); returns (features, was_truncated)."""
    pieces = segments(example, tokenizer, chat, assistant_turns)
    is_chat = bool(example.messages) or (chat and bool(example.prompt))
    ids, labels = ([], []) if is_chat else (_bos(tokenizer), [IGNORE] * len(_bos(tokenizer)))
    for text, trainable in pieces:
        piece = tokenizer(text, add_special_tokens=False).input_ids
        ids += piece
        labels += piece if trainable else [IGNORE] * len(piece)
    if not is_chat:
        ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    truncated = len(ids) > max_length
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}, truncated


def encode_all(
    examples: list[Example],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    chat: bool = False,
    assistant_turns: str = "all",
) -> tuple[list[dict], int]:
    """Encode every example; drop ones with no trainable token left; return (features, n_truncated)."""
    features, n_truncated = [], 0
    for ex in examples:
        feat, truncated = encode(ex, tokenizer, max_length, chat, assistant_turns)
        n_truncated += truncated
        if any(label != IGNORE for label in feat["labels"][1:]):
            features.append(feat)
    return features, n_truncated


def pack(features: list[dict], max_length: int) -> list[dict]:
    """Whole examples into rows of at most ``max_length`` tokens, each attending only to itself.

    Best-fit decreasing: the longest example first, each into the row whose free space it fills
    best (a new row when none has room), so rows come out nearly full whatever the length mix.
    An example is never cut: a row's ``lengths`` name its examples, in order, and
    :class:`Collator` turns them into position ids that restart at each one, which the model reads
    as separate sequences (a block-diagonal causal mask; varlen kernels with flash attention):

        position_ids = [0 … n₁−1, 0 … n₂−1, …]     token t attends to s ⇔ s ≤ t in the same example

    The first label of each example is masked: the token before it belongs to another example,
    and in a row of its own that label has no token before it either. The loss of a packed row is
    then the token-weighted mean of its examples' own losses. The last row is kept however short
    (the collator pads it).
    """
    order = sorted(range(len(features)), key=lambda i: -len(features[i]["input_ids"]))
    rows: list[list[int]] = []  # feature indices per row
    free: list[tuple[int, int]] = []  # (free tokens, row), sorted: the best fit is the first with room
    for i in order:
        n = len(features[i]["input_ids"])
        k = bisect.bisect_left(free, (n, -1))
        if k == len(free):
            rows.append([i])
            bisect.insort(free, (max_length - n, len(rows) - 1))
            continue
        room, row = free.pop(k)
        rows[row].append(i)
        bisect.insort(free, (room - n, row))
    packed = []
    for members in rows:
        members.sort()  # each row in the data's own order
        ids, labels = [], []
        for i in members:
            ids += features[i]["input_ids"]
            labels += [IGNORE] + list(features[i]["labels"][1:])
        packed.append(
            {
                "input_ids": ids,
                "labels": labels,
                "lengths": [len(features[i]["input_ids"]) for i in members],
            }
        )
    return packed


class Collator:
    """Right-pad a list of features into ``input_ids``, ``attention_mask`` and ``labels`` tensors.

    Packed rows (:func:`pack`, with ``lengths``) get ``position_ids`` instead of an attention mask:
    they restart at each example, and at the padding, which thus forms a sequence of its own that no
    real token sees. ``num_tokens`` counts the real tokens (for tokens/s); :func:`model_inputs` leaves
    it out of what the model is given.
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE, dtype=torch.long)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            ids[row, :n] = torch.tensor(f["input_ids"])
            mask[row, :n] = 1
            labels[row, :n] = torch.tensor(f["labels"])
        if "lengths" not in features[0]:
            return {"input_ids": ids, "attention_mask": mask, "labels": labels}
        positions = torch.zeros((len(features), width), dtype=torch.long)
        for row, f in enumerate(features):
            lengths = list(f["lengths"])
            if sum(lengths) < width:
                lengths.append(width - sum(lengths))  # the padding: a sequence of its own
            positions[row] = torch.cat([torch.arange(n) for n in lengths])
        return {"input_ids": ids, "labels": labels, "position_ids": positions, "num_tokens": mask.sum()}


def model_inputs(batch: dict) -> dict:
    """What the model is given of a collated batch: everything but the real-token count. Packed
    rows (no attention mask) also turn the key/value cache off, which transformers needs in order
    to read their position ids as separate sequences."""
    inputs = {k: v for k, v in batch.items() if k != "num_tokens"}
    if "position_ids" in inputs and "attention_mask" not in inputs:
        inputs["use_cache"] = False
    return inputs


def real_tokens(batch: dict) -> torch.Tensor:
    """The number of real (non-padding) tokens of a collated batch."""
    return batch["num_tokens"] if "num_tokens" in batch else batch["attention_mask"].sum()
