"""Tokenize once: the token rows of a run's examples, cached on disk and tokenized in parallel.

:func:`encode_cached` is :func:`shardtune.data.examples.encode_all` behind a cache keyed by everything
the rows depend on — the examples themselves (their text, hashed), the tokenizer (its vocabulary,
merges and special tokens), the chat template, whether examples are chats, ``data.max_length`` and
``data.assistant_turns`` — so a second run or a resume of the same data reads its rows instead of
tokenizing again, and any change to one of those tokenizes afresh (a new key). An entry is one
directory under ``$SHARDTUNE_CACHE/tokenized/`` (:func:`shardtune.models.loading.cache_dir`): the rows
in ``rows.safetensors`` (flat ``input_ids`` and ``labels``, int32, and each row's ``offsets``) and
``rows.json`` (the key, the counts), with shardtune's marker, written into a temporary directory and
renamed into place (:func:`shardtune.core.fileio.atomic_directory`), so a reader never sees half an
entry. An entry that does not read back whole (a disk error, an edit) is tokenized again, with a
warning, and replaced only when its marker says it is one of the cache's. ``data.tokenized_cache: false`` turns the cache off.

``data.num_proc`` tokenizes in that many processes (chunks of examples, in order: the same rows as
one process).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from shardtune.core.fileio import atomic_directory, read_marker
from shardtune.data.examples import Example, encode_all

CACHE_VERSION = 1
ROWS_FILE = "rows.safetensors"
META_FILE = "rows.json"
ENTRY_KIND = "tokenized rows"  # the kind in each entry's shardtune marker


def rows_key(examples: list[Example], tokenizer, max_length: int, chat: bool, assistant_turns: str) -> str:
    """The cache key: a hash of everything the token rows depend on."""
    digest = hashlib.sha256()
    settings = {
        "version": CACHE_VERSION,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "chat": chat,
        "chat_template": getattr(tokenizer, "chat_template", None) if chat else None,
        "max_length": max_length,
        "assistant_turns": assistant_turns,
        "count": len(examples),
    }
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for e in examples:
        digest.update(json.dumps([e.prompt, e.completion, e.messages], ensure_ascii=False).encode())
        digest.update(b"\0")
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what the tokenizer turns text into: its whole serialized form (vocabulary, merges,
    normalizer, pre- and post-processing) for a fast tokenizer, its vocabulary otherwise, and its
    special tokens."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    specials = {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}
    digest.update(json.dumps([specials, tokenizer.bos_token_id, tokenizer.eos_token_id]).encode())
    return digest.hexdigest()


def encode_cached(
    examples: list[Example],
    tokenizer,
    max_length: int,
    chat: bool,
    assistant_turns: str,
    cache: Path | None,
    num_proc: int = 1,
    write: bool = True,
    warn: Callable[[str], None] = lambda line: None,
) -> tuple[list[dict], int, bool]:
    """(rows, examples truncated, whether they came from the cache). ``cache``: the directory of
    entries, or None for no cache; ``write``: whether this process writes a missing entry (one
    process of several does)."""
    key = rows_key(examples, tokenizer, max_length, chat, assistant_turns) if cache is not None else None
    broken = False
    if key is not None:
        found = _read_entry(cache / key[:40], key, warn)
        if found is not None:
            return found[0], found[1], True
        broken = (cache / key[:40]).exists()
    rows, truncated = _encode(examples, tokenizer, max_length, chat, assistant_turns, num_proc)
    if key is not None and write:
        _write_entry(cache, key, rows, truncated, warn, replace=broken)
    return rows, truncated, False


def _encode(examples, tokenizer, max_length, chat, assistant_turns, num_proc) -> tuple[list[dict], int]:
    if num_proc <= 1 or len(examples) < 2 * num_proc:
        return encode_all(examples, tokenizer, max_length, chat, assistant_turns)
    import multiprocessing

    size = -(-len(examples) // num_proc)
    chunks = [examples[i : i + size] for i in range(0, len(examples), size)]
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(num_proc) as pool:
        parts = pool.starmap(
            encode_all, [(chunk, tokenizer, max_length, chat, assistant_turns) for chunk in chunks]
        )
    return [row for rows, _ in parts for row in rows], sum(n for _, n in parts)


def _read_entry(entry: Path, key: str, warn) -> tuple[list[dict], int] | None:
    if not (entry / META_FILE).is_file():
        return None
    try:
        meta = json.loads((entry / META_FILE).read_text(encoding="utf-8"))
        tensors = load_file(entry / ROWS_FILE)
        ids, labels, offsets = tensors["input_ids"], tensors["labels"], tensors["offsets"]
        ok = (
            meta.get("key") == key
            and ids.shape == labels.shape
            and offsets.ndim == 1
            and len(offsets) == meta["rows"] + 1
            and int(offsets[0]) == 0
            and int(offsets[-1]) == len(ids)
            and bool((offsets[1:] >= offsets[:-1]).all())
        )
        if not ok:
            raise ValueError("its files do not agree")
        truncated = int(meta["truncated"])
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
        warn(f"tokenized data cache {entry} does not read back ({type(e).__name__}: {e}); tokenizing again")
        return None
    bounds = offsets.tolist()
    id_list, label_list = ids.tolist(), labels.tolist()
    rows = [
        {"input_ids": id_list[a:b], "labels": label_list[a:b]}
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    return rows, truncated


def _write_entry(
    cache: Path, key: str, rows: list[dict], truncated: int, warn, replace: bool = False
) -> None:
    """Write the entry with :func:`shardtune.core.fileio.atomic_directory` (filled beside its place,
    marked as the cache's, renamed in). An entry already there is left alone — another process
    wrote it meanwhile — unless ``replace`` (it did not read back) and its marker says it is a
    tokenized-rows entry of shardtune's: nothing else in the cache directory is ever replaced."""
    entry = cache / key[:40]
    if entry.exists() or entry.is_symlink():
        marker = None if entry.is_symlink() else read_marker(entry)
        if not (replace and marker is not None and marker.get("kind") == ENTRY_KIND):
            if replace:
                warn(f"tokenized data cache {entry} is not shardtune's (no marker of its own): left alone")
            return
    lengths = torch.tensor([0] + [len(r["input_ids"]) for r in rows], dtype=torch.int64)
    tensors = {
        "input_ids": torch.tensor([t for r in rows for t in r["input_ids"]], dtype=torch.int32),
        "labels": torch.tensor([t for r in rows for t in r["labels"]], dtype=torch.int32),
        "offsets": torch.cumsum(lengths, 0),
    }
    meta = {"key": key, "rows": len(rows), "truncated": truncated, "version": CACHE_VERSION}
    try:
        with atomic_directory(entry, kind=ENTRY_KIND, entries=[ROWS_FILE, META_FILE]) as staging:
            save_file(tensors, staging / ROWS_FILE)
            (staging / META_FILE).write_text(json.dumps(meta) + "\n", encoding="utf-8")
    except (OSError, SafetensorError) as e:  # a cache not written costs the next run its time, nothing else
        warn(f"could not cache the tokenized data in {cache} ({type(e).__name__}: {e})")
