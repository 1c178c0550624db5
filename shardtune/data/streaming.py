"""Streaming (``data.streaming``): records read as training needs them, never all at once.

A source is read from a *position*, a small JSON object saved in every checkpoint:

* a local ``.jsonl``, ``.txt`` (a record a line) or ``.csv`` file — the byte offset of the next line
  and the line number;
* a ``.parquet`` file or a ``save_to_disk`` directory — the next row;
* a hub dataset — the state of a ``datasets`` IterableDataset (shard and example in it);
* a builtin task — the next generated example (a task is generated in memory, it is small).

Training reads the sources *window by window*. Window ``w`` is ``data.stream_window`` examples, each
drawn from source ``i`` with probability ``wᵢ / Σw`` (its ``weight``; one source: always it), then
shuffled, tokenized and — with ``data.packing`` — packed into rows (:func:`shardtune.data.examples.pack`),
the rows shuffled again. Every random choice of a window comes from a generator seeded with
``(data.seed, w)``, so a window is a function of the seed, its number and the sources' positions at
its start. Batches take rows in order, across windows (a global batch of ``batch_size × processes``
rows, each process its slice). The stream's state is therefore ``(w, rows of w trained on, the
sources' positions at the start of w)``: a resumed run rebuilds window ``w`` and continues at the next
row, with exactly the batches the killed run would have seen.

A source that ends starts again from its first training record (its ``epoch`` counts the passes); the
run is as long as ``train.max_steps`` says.

Held out: each source's first ``eval_samples`` records (unset: 64, at most a fifth of a checked file),
or ``eval_split``; its training records are the ones after them, and a training example equal to a
held-out one of any source is left out.

Checked before anything is written: a local file is read through once, in bounded memory, each record
parsed and turned into an example, so a file that turns invalid half-way is one line naming the file and
the line, before a model loads. A hub dataset is checked as it streams (reading it twice would download it
twice): a bad record there stops the run with the same line, exit 2, and the run's checkpoints stay to
resume from once the data is fixed.
"""

from __future__ import annotations

import csv
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from shardtune.core.errors import BadInput, RecipeError, first_line, named_as
from shardtune.data.examples import (
    Collator,
    _format_of,
    _held_out_examples,
    _pick_split,
    _single_source,
    csv_header,
    csv_record,
    held_out_count,
    json_line,
    load_hub_dataset,
    pack,
    quiet_datasets,
    record_to_example,
    task_examples,
)
from shardtune.recipe.schema import SOURCE_KEYS, DataSection

BOM = b"\xef\xbb\xbf"
LINE_FILES = (".jsonl", ".txt", ".csv")
ROW_FILES = (".parquet",)


# ---------------------------------------------------------------------------------------------------
# Readers: the records of one source from a position


class Reader:
    """Records from a position. :meth:`records` yields ``(record, where)`` — ``where`` names the record
    in errors (``line 12``) — and :attr:`position` is where the next record starts."""

    position: dict

    def records(self, position: dict | None) -> Iterator[tuple[object, str]]:
        raise NotImplementedError

    def check_position(self, position: object) -> str | None:
        """Why ``position`` (from a checkpoint) cannot be one of this source's, or None."""
        return None


class LineFileReader(Reader):
    """A ``.jsonl`` file (a JSON record a line), a ``.txt`` file (a line is ``{"text": line}``) or a
    ``.csv`` file (a header, then a record a row), read line by line from a byte offset."""

    def __init__(self, path: Path, key: str):
        self.path, self.key, self.kind = path, key, path.suffix
        self.size = path.stat().st_size
        self.position = {"offset": 0, "line": 0, "size": self.size}

    def _lines(self, f, line: int) -> Iterator[str]:
        """Decoded lines from where ``f`` stands, :attr:`position` following each."""
        while True:
            raw = f.readline()
            if not raw:
                return
            if line == 0 and raw.startswith(BOM):
                raw = raw[len(BOM) :]
            line += 1
            self.position = {"offset": f.tell(), "line": line, "size": self.size}
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise BadInput(
                    f"{self.key}: {self.path} line {line} is not UTF-8 text (byte {e.start})"
                ) from None

    def records(self, position: dict | None) -> Iterator[tuple[object, str]]:
        start = position or {"offset": 0, "line": 0, "size": self.size}
        with open(self.path, "rb") as f:
            if self.kind == ".csv":
                yield from self._csv_records(f, start)
                return
            f.seek(start["offset"])
            for text in self._lines(f, start["line"]):
                line = self.position["line"]
                if self.kind == ".txt":
                    yield {"text": text.rstrip("\r\n")}, f"line {line}"
                    continue
                if text.strip():
                    yield json_line(text, self.key, self.path, line), f"line {line}"

    def _csv_records(self, f, start: dict) -> Iterator[tuple[object, str]]:
        header_reader = csv.reader(self._lines(f, 0))
        header = next((row for row in header_reader if row), None)
        if header is None:
            raise BadInput(f"{self.key}: {self.path} has no header row")
        header = csv_header(header, self.key, self.path, self.position["line"])
        if start["offset"] > 0:  # (resumed past the header)
            f.seek(start["offset"])
            self.position = dict(start)
        reader = csv.reader(self._lines(f, self.position["line"]))
        try:
            for row in reader:
                if not row:
                    continue
                line = self.position["line"]
                yield csv_record(header, row, self.key, self.path, line), f"line {line}"
        except csv.Error as e:
            raise BadInput(
                f"{self.key}: {self.path} line {self.position['line']} is not valid CSV ({e})"
            ) from None

    def check_position(self, position: object) -> str | None:
        if not (
            isinstance(position, dict)
            and set(position) == {"offset", "line", "size"}
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in position.values())
        ):
            return "is not a position in a line file"
        if position["size"] != self.size:
            return (
                f"was taken in {self.path} when it had {position['size']:,} bytes; it has {self.size:,} now, "
                "so the position no longer points at its records"
            )
        if position["offset"] > self.size:
            return f"is past the end of {self.path}"
        if position["offset"] > 0:
            with open(self.path, "rb") as f:
                f.seek(position["offset"] - 1)
                if f.read(1) != b"\n":
                    return f"is not at the start of a line of {self.path}"
        return None


class RowReader(Reader):
    """A ``.parquet`` file (record batches from the row group that holds the position) or a
    ``save_to_disk`` directory (memory-mapped rows)."""

    def __init__(self, path: Path, key: str, split: str, split_key: str):
        self.path, self.key, self.split, self.split_key = path, key, split, split_key
        self.position = {"row": 0}
        self.rows = self._count()

    def _count(self) -> int:
        if self.path.is_dir():
            return len(self._dataset())
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(self.path).metadata.num_rows
        except Exception as e:  # pyarrow raises many types for a damaged file
            raise BadInput(f"{self.key}: cannot read {self.path}: {first_line(e)}") from None

    def _dataset(self):
        """The save_to_disk directory's split (memory-mapped; opened once)."""
        if getattr(self, "_opened", None) is not None:
            return self._opened
        import datasets

        try:
            loaded = datasets.load_from_disk(str(self.path))
        except Exception as e:
            raise BadInput(f"{self.key}: cannot read {self.path}: {first_line(e)}") from None
        self._opened = _pick_split(loaded, str(self.path), self.split, self.split_key)
        return self._opened

    def records(self, position: dict | None) -> Iterator[tuple[object, str]]:
        row = (position or {"row": 0})["row"]
        for batch in self._batches(row):
            for record in batch:
                row += 1
                self.position = {"row": row}
                yield record, f"row {row}"

    def _batches(self, row: int) -> Iterator[list[dict]]:
        if self.path.is_dir():
            ds = self._dataset()
            for start in range(row, len(ds), 256):
                columns = ds[start : start + 256]
                yield [
                    dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)
                ]
            return
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(self.path)
            first, skip = 0, row
            while first < parquet.num_row_groups and skip >= parquet.metadata.row_group(first).num_rows:
                skip -= parquet.metadata.row_group(first).num_rows
                first += 1
            groups = list(range(first, parquet.num_row_groups))
            if not groups:
                return
            for batch in parquet.iter_batches(batch_size=256, row_groups=groups):
                records = batch.to_pylist()
                if skip:
                    records, skip = records[skip:], max(0, skip - len(records))
                if records:
                    yield records
        except OSError as e:
            raise BadInput(f"{self.key}: cannot read {self.path}: {first_line(e)}") from None

    def check_position(self, position: object) -> str | None:
        if not (
            isinstance(position, dict)
            and set(position) == {"row"}
            and isinstance(position["row"], int)
            and not isinstance(position["row"], bool)
            and 0 <= position["row"] <= self.rows
        ):
            return f"is not a row of {self.path} (it has {self.rows:,})"
        return None


class HubReader(Reader):
    """A hub dataset as a ``datasets`` IterableDataset (downloaded as it is read; offline: from its
    snapshot in the hub cache); the position is the IterableDataset's own state."""

    def __init__(self, repo_id: str, split: str, revision: str | None, key: str, split_key: str):
        self.repo_id, self.split, self.revision, self.key, self.split_key = (
            repo_id,
            split,
            revision,
            key,
            split_key,
        )
        self.position = {"state": None, "record": 0}

    def _open(self):
        from shardtune.models import hub

        quiet_datasets()
        try:
            return load_hub_dataset(
                self.repo_id, self.split, self.revision, self.split_key, self.key, streaming=True
            )
        except BadInput:
            raise
        except Exception as e:
            raise hub.describe_failure(self.key, self.repo_id, self.revision, e) from None

    def records(self, position: dict | None) -> Iterator[tuple[object, str]]:
        from shardtune.models import hub

        ds = self._open()
        record, restored = 0, position is not None and position["state"] is not None
        misfit = (KeyError, TypeError, ValueError, IndexError, AttributeError)
        if restored:
            record = position["record"]
        try:
            if restored:
                ds.load_state_dict(position["state"])
            iterator = iter(ds)
            item = next(iterator, None)  # (a restored state is applied here)
        except misfit as e:
            if not restored:
                raise hub.describe_failure(self.key, self.repo_id, self.revision, e) from None
            raise BadInput(
                f"{self.key}: the checkpoint's position in the stream of {self.repo_id} does not fit it "
                f"({first_line(e)}); the checkpoint was edited, or the dataset changed"
            ) from None
        except Exception as e:
            raise hub.describe_failure(self.key, self.repo_id, self.revision, e) from None
        while item is not None:
            record += 1
            self.position = {"state": ds.state_dict(), "record": record}
            yield dict(item), f"record {record}"
            try:
                item = next(iterator, None)
            except Exception as e:
                raise hub.describe_failure(self.key, self.repo_id, self.revision, e) from None

    def check_position(self, position: object) -> str | None:
        if not (
            isinstance(position, dict)
            and set(position) == {"state", "record"}
            and isinstance(position["state"], dict | None)
            and isinstance(position["record"], int)
            and position["record"] >= 0
        ):
            return "is not a position in a hub dataset stream"
        return None


class TaskReader(Reader):
    """A builtin task's generated training examples (small; in memory), by number."""

    def __init__(self, data: DataSection):
        train, self.held = task_examples(data)
        self.train = [{"prompt": e.prompt, "completion": e.completion} for e in train]
        self.position = {"row": 0}

    def records(self, position: dict | None) -> Iterator[tuple[object, str]]:
        row = (position or {"row": 0})["row"]
        for record in self.train[row:]:
            row += 1
            self.position = {"row": row}
            yield record, f"example {row}"

    def check_position(self, position: object) -> str | None:
        ok = isinstance(position, dict) and set(position) == {"row"} and isinstance(position["row"], int)
        return None if ok and 0 <= position["row"] <= len(self.train) else "is not an example of the task"


def reader_for(data: DataSection, key: str, split_key: str = "data.split") -> Reader:
    """The reader of a single-source data section (``key`` names the source in errors)."""
    if data.task is not None:
        return TaskReader(data)
    if data.hub is not None:
        return HubReader(data.hub, data.split, data.revision, key, split_key)
    path = Path(data.path).expanduser()
    if path.is_dir():
        return RowReader(path, key, data.split, split_key)
    if not path.is_file():
        raise BadInput(f"{key}: {data.path} not found")
    if path.suffix == ".json":
        raise BadInput(
            f"{key}: {data.path} is one JSON document, read whole; data.streaming reads a record at a time: "
            "write it as .jsonl (a record a line)"
        )
    if path.suffix not in LINE_FILES + ROW_FILES:
        raise BadInput(
            f"{key}: {data.path}: unsupported file type {path.suffix!r} for data.streaming (use "
            f"{', '.join(LINE_FILES + ROW_FILES)} or a datasets save_to_disk directory)"
        )
    if path.stat().st_size == 0:
        raise BadInput(f"{key}: {data.path} is empty")
    if data.split != DataSection.model_fields["split"].default:
        raise RecipeError(
            "data.split",
            f"applies to hub datasets and save_to_disk DatasetDict directories; {data.path} is a single file",
        )
    if path.suffix in ROW_FILES:
        return RowReader(path, key, data.split, split_key)
    return LineFileReader(path, key)


# ---------------------------------------------------------------------------------------------------
# Sources: training examples, pass after pass


@dataclass
class SourceStream:
    """One source's training examples: records from ``train_start`` on, again from there at the end
    (``epoch`` + 1). ``where`` names the source in errors (``data.path: x.jsonl``)."""

    reader: Reader
    fmt: str
    where: str
    text_field: str
    train_start: dict | None
    skip: set = field(default_factory=set)  # held-out examples (of every source): never trained on
    epoch: int = 0
    position: dict | None = None  # None: at train_start
    _records: Iterator | None = None
    _given: int = 0  # examples given in this pass

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def restore(self, state: dict) -> None:
        self.epoch, self.position, self._records = state["epoch"], state["position"], None

    def next_example(self):
        while True:
            if self._records is None:
                self._records = self.reader.records(self.position or self.train_start)
            item = next(self._records, None)
            if item is None:  # the end of a pass
                if self._given == 0:
                    raise BadInput(
                        f"{self.where} has no training record left after the held-out ones (eval_samples)"
                    )
                self.epoch, self.position, self._records, self._given = self.epoch + 1, None, None, 0
                continue
            record, at = item
            self.position = self.reader.position
            example = record_to_example(record, self.fmt, f"{self.where} {at}", self.text_field)
            if example in self.skip:
                continue
            self._given += 1
            return example


def _read_head(reader: Reader, data: DataSection, where: str, limit: int, whole: bool, report) -> tuple:
    """(format, the first ``limit`` records as (example, the position after it), the number of records).
    ``whole``: read on through every record, each turned into an example — the errors a training pass
    would meet, before the run starts — and count them (else the count is None). One record at a time."""
    started, fmt, head, count = time.perf_counter(), None, [], 0
    records = reader.records(None)
    for record, at in records:
        if fmt is None:
            fmt = _format_of([record], data.format, where)
        example = record_to_example(record, fmt, f"{where} {at}", data.text_field)
        count += 1
        if len(head) < limit:
            head.append((example, dict(reader.position)))
        elif not whole:
            break
    records.close()
    if count == 0:
        raise BadInput(f"{where} holds no examples")
    if not whole:
        return fmt, head, None
    size = getattr(reader, "size", None)
    report(
        f"data.streaming: {data.path}: {count:,} records checked"
        f"{f' ({size / 2**20:,.1f} MiB)' if size else ''} in {time.perf_counter() - started:.1f} s"
    )
    return fmt, head, count


@dataclass
class ExampleStream:
    """The training examples of every source, drawn window by window (see the module's docstring)."""

    sources: list[SourceStream]
    weights: list[float]
    seed: int
    window: int

    def draw(self, window: int) -> list:
        """The examples of window ``window``, shuffled; the sources move on past them."""
        rng = random.Random(f"shardtune stream {self.seed} {window}")
        picks = (
            [0] * self.window
            if len(self.sources) == 1
            else rng.choices(range(len(self.sources)), weights=self.weights, k=self.window)
        )
        examples = [self.sources[i].next_example() for i in picks]
        rng.shuffle(examples)
        return examples

    def state(self) -> list[dict]:
        return [s.state() for s in self.sources]

    def restore(self, states: list[dict]) -> None:
        for source, state in zip(self.sources, states, strict=True):
            source.restore(state)

    def check_state(self, states: object, where: str) -> None:
        """A checkpoint's stream state fits these sources: one line naming the file and key if not."""
        if not isinstance(states, list) or len(states) != len(self.sources):
            raise BadInput(
                f"{where}: key 'stream' does not hold {len(self.sources)} source positions; the file was edited"
            )
        for i, (source, state) in enumerate(zip(self.sources, states, strict=True)):
            if not (
                isinstance(state, dict)
                and set(state) == {"epoch", "position"}
                and isinstance(state["epoch"], int)
                and state["epoch"] >= 0
            ):
                raise BadInput(
                    f"{where}: key 'stream' source {i}: not an epoch and a position; the file was edited"
                )
            if state["position"] is not None:
                problem = source.reader.check_position(state["position"])
                if problem is not None:
                    raise BadInput(f"{where}: key 'stream' source {i}: the position {problem}")


def read_examples(data: DataSection, report: Callable[[str], None] | None = None) -> tuple:
    """(training, held-out) examples of the data section: a list read whole, or with ``data.streaming``
    an :class:`ExampleStream` (:func:`open_streams`)."""
    from shardtune.data.examples import load_examples

    return (open_streams if data.streaming else load_examples)(data, report)


def open_streams(
    data: DataSection, report: Callable[[str], None] | None = None
) -> tuple[ExampleStream, list]:
    """The training stream and the held-out examples of a streamed data section (one source or a
    mixture). Local files are checked whole first (:func:`_check_whole`)."""
    sections = (
        [(data, "data", {})]
        if data.sources is None
        else [
            (
                _single_source(data, s, f"data.sources.{i}"),
                f"data.sources.{i}",
                {**{f"data.{k}": f"data.sources.{i}.{k}" for k in SOURCE_KEYS}, "data": f"data.sources.{i}"},
            )
            for i, s in enumerate(data.sources)
        ]
    )
    report = report or (lambda line: None)
    streams, helds = [], []
    for section, prefix, names in sections:
        with named_as(names):
            stream, held = _open_source(section, prefix, report)
        streams.append(stream)
        helds.append(held)
    every_held = {e for held in helds for e in held}
    for stream in streams:
        stream.skip = every_held
    weights = [1.0] if data.sources is None else [s.weight for s in data.sources]
    return ExampleStream(streams, weights, data.seed, data.stream_window), [e for held in helds for e in held]


def _open_source(data: DataSection, prefix: str, report) -> tuple[SourceStream, list]:
    """One source (``prefix``: ``data`` or ``data.sources.N``, as errors name it): its reader, format,
    held-out examples and where its training records start."""
    key = f"{prefix}.task" if data.task else (f"{prefix}.path" if data.path else f"{prefix}.hub")
    name = data.task or data.path or data.hub
    where = f"{key}: {name}"
    reader = reader_for(data, key)
    if isinstance(reader, TaskReader):
        return SourceStream(reader, "prompt_completion", where, "text", None), reader.held
    whole = not isinstance(reader, HubReader)  # (a hub dataset is checked as it streams)
    limit = 0 if data.eval_split is not None else held_out_count(data.eval_samples, None, name)
    fmt, head, count = _read_head(reader, data, where, limit, whole, report)
    if data.eval_split is not None:
        return SourceStream(reader, fmt, where, data.text_field, None), _held_out_examples(data, fmt)
    n_eval = held_out_count(data.eval_samples, count, name)
    if len(head) < n_eval:
        raise BadInput(
            f"{where} holds {len(head)} records, not more than the {n_eval} held out (data.eval_samples)"
        )
    held = [example for example, _ in head[:n_eval]]
    train_start = head[n_eval - 1][1] if n_eval else None
    return SourceStream(reader, fmt, where, data.text_field, train_start), held


# ---------------------------------------------------------------------------------------------------
# Rows and batches


class StreamedRows:
    """Token rows of an :class:`ExampleStream`, window after window. ``tokenize`` turns a window's
    examples into features (those with no token to learn from left out) and the number truncated.

    State: ``{"window": w, "rows_done": k, "sources": [...]}`` — the sources' positions at the start of
    window ``w``, of whose rows ``k`` have been given out."""

    def __init__(
        self,
        examples: ExampleStream,
        tokenize: Callable[[list], tuple[list[dict], int]],
        packing: bool,
        max_length: int,
    ):
        self.examples, self.tokenize, self.packing, self.max_length = examples, tokenize, packing, max_length
        self.window, self.done, self.start = 0, 0, examples.state()
        self.rows: list[dict] | None = None
        self.truncated = self.left_out = 0
        self._epochs_at_last_row = [0] * len(examples.sources)

    def _build(self) -> None:
        drawn = self.examples.draw(self.window)
        rows, truncated = self.tokenize(drawn)
        self.truncated += truncated
        self.left_out += len(drawn) - len(rows)
        if self.packing:
            rows = pack(rows, self.max_length)
            random.Random(f"shardtune stream rows {self.examples.seed} {self.window}").shuffle(rows)
        epochs = [s.epoch for s in self.examples.sources]
        if rows:
            self._epochs_at_last_row = epochs
        elif all(now > then for now, then in zip(epochs, self._epochs_at_last_row, strict=True)):
            raise BadInput(
                "data: a whole pass over the streamed data gave no example with a token to learn from "
                "(empty completions, or prompts that fill data.max_length)"
            )
        self.rows = rows

    def next_row(self) -> dict:
        while self.rows is None or self.done >= len(self.rows):
            if self.rows is not None:  # the window is done: the next one starts where the sources are
                self.window, self.done, self.start = self.window + 1, 0, self.examples.state()
            self._build()
        self.done += 1
        return self.rows[self.done - 1]

    def state_dict(self) -> dict:
        return {"window": self.window, "rows_done": self.done, "sources": self.start}

    def load_state_dict(self, state: dict) -> None:
        self.window, self.done, self.start = state["window"], state["rows_done"], state["sources"]
        self.examples.restore(self.start)
        self.rows = None
        self._epochs_at_last_row = [s.epoch for s in self.examples.sources]

    def check_state(self, state: object, where: str) -> None:
        """A checkpoint's ``stream`` fits this run: one line naming the file and the key if not."""
        if not (
            isinstance(state, dict)
            and set(state) == {"window", "rows_done", "sources"}
            and all(
                isinstance(state[k], int) and not isinstance(state[k], bool) and state[k] >= 0
                for k in ("window", "rows_done")
            )
        ):
            raise BadInput(
                f"{where}: key 'stream' is not a stream position (window, rows_done, sources); the file was edited"
            )
        self.examples.check_state(state["sources"], where)

    def first_rows(self, n: int) -> list[dict]:
        """The first ``n`` rows of the run (the stream is left where it was)."""
        saved, counts = self.state_dict(), (self.truncated, self.left_out)
        rows = [self.next_row() for _ in range(n)]
        if self.window == saved["window"]:  # still in the window it stood in: keep its rows
            self.done = saved["rows_done"]
        else:
            self.load_state_dict(saved)
            self.truncated, self.left_out = counts
        return rows

    def batches(
        self, batch_size: int, processes: int, rank: int, collate: Collator, device
    ) -> Iterator[dict]:
        """Micro-batches of this process: each global batch is ``batch_size × processes`` rows in
        order, process ``rank`` collating its slice. The state is taken after each one."""
        while True:
            rows = [self.next_row() for _ in range(batch_size * processes)]
            batch = collate(rows[rank * batch_size : (rank + 1) * batch_size])
            yield {k: v.to(device) for k, v in batch.items()}
