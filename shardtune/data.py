"""Data: examples from a builtin task or a local file → token ids with loss masks → batches.

An example is ``(prompt, completion)``; plain text is ``("", text)``. The loss is computed on the
completion tokens only (prompt tokens get label -100), and every example ends with the EOS token.
Examples longer than ``data.max_length`` tokens are truncated from the right and counted.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from shardtune.errors import BadInput
from shardtune.recipe import DataSection
from shardtune.tasks import TASKS

IGNORE = -100


@dataclass(frozen=True)
class Example:
    prompt: str
    completion: str


def _read_records(path: Path) -> list[dict]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise BadInput(f"data.path: {path} is not UTF-8 text (byte {e.start})") from None
    if path.suffix == ".json":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise BadInput(f"data.path: {path} is not valid JSON (line {e.lineno}: {e.msg})") from None
        if not isinstance(records, list):
            raise BadInput(f"data.path: {path} must hold a JSON list of records")
        return records
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise BadInput(f"data.path: {path} line {lineno} is not valid JSON ({e.msg})") from None
    return records


def _record_to_example(rec: object, fmt: str, where: str) -> Example:
    if not isinstance(rec, dict):
        raise BadInput(f"data.path: {where} is not a JSON object")
    keys = ("text",) if fmt == "text" else ("prompt", "completion")
    for key in keys:
        if not isinstance(rec.get(key), str):
            raise BadInput(f"data.path: {where} has no string field {key!r} (data.format: {fmt})")
    return Example("", rec["text"]) if fmt == "text" else Example(rec["prompt"], rec["completion"])


def load_examples(data: DataSection) -> tuple[list[Example], list[Example]]:
    """Training and held-out examples for the recipe's data section."""
    if data.task is not None:
        task = TASKS.get(data.task)
        if task is None:
            raise BadInput(f"data.task: unknown task {data.task!r}; available: {', '.join(TASKS)}")
        train = [Example(p, c) for p, c in task.generate(data.num_samples, data.seed)]
        held = [Example(p, c) for p, c in task.generate(data.eval_samples, data.seed + 1_000_003)]
        return train, held

    path = Path(data.path).expanduser()
    if not path.is_file():
        raise BadInput(f"data.path: {data.path} not found")
    if path.suffix not in (".jsonl", ".json"):
        raise BadInput(f"data.path: {data.path}: unsupported file type {path.suffix!r} (use .jsonl or .json)")
    records = _read_records(path)
    if not records:
        raise BadInput(f"data.path: {data.path} holds no examples")
    fmt = data.format
    if fmt == "auto":
        first = records[0] if isinstance(records[0], dict) else {}
        fmt = "prompt_completion" if "prompt" in first and "completion" in first else "text"
    examples = [_record_to_example(r, fmt, f"{data.path} record {i + 1}") for i, r in enumerate(records)]
    random.Random(data.seed).shuffle(examples)
    n_eval = min(data.eval_samples, len(examples) // 5)
    return examples[n_eval:], examples[:n_eval]


def encode(example: Example, tokenizer: PreTrainedTokenizerBase, max_length: int) -> tuple[dict, bool]:
    """Token ids and labels (prompt masked); returns (features, was_truncated)."""
    bos = [tokenizer.bos_token_id] if _adds_bos(tokenizer) else []
    prompt = bos + tokenizer(example.prompt, add_special_tokens=False).input_ids
    completion = tokenizer(example.completion, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    ids = prompt + completion
    labels = [IGNORE] * len(prompt) + completion
    truncated = len(ids) > max_length
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}, truncated


def _adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    if tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("a", add_special_tokens=True).input_ids
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def encode_all(
    examples: list[Example], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> tuple[list[dict], int]:
    """Encode every example; drop ones with no trainable token left; return (features, n_truncated)."""
    features, n_truncated = [], 0
    for ex in examples:
        feat, truncated = encode(ex, tokenizer, max_length)
        n_truncated += truncated
        if any(label != IGNORE for label in feat["labels"]):
            features.append(feat)
    return features, n_truncated


class Collator:
    """Right-pad a list of features into ``input_ids``, ``attention_mask`` and ``labels`` tensors."""

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
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
