"""What every input reader yields: validated sources read lazily as RowBatches of ids, texts, keeps."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from batchllm.errors import JobError
from batchllm.io.messages import arrow_conversations, python_conversation

CONVERT_ROWS = 65536  # rows read and converted at a time; windows are joined from such parts


@dataclass(frozen=True)
class RowBatch:
    """Consecutive input rows: `start` is the row index of the first."""

    start: int
    ids: pa.Array  # the id column in its own type, or int64 row indices
    texts: list[str | None]  # None where the text is unusable; text_errors says why
    text_errors: list[str | None]
    keep: pa.Table | None  # the keep columns, None when none were asked for
    params: list | None = None  # each row's --params-column value (Python), None without that column
    schemas: list[str | None] | None = None  # each row's own JSON Schema text (OpenAI response_format)

    def __len__(self) -> int:
        return len(self.texts)

    @staticmethod
    def concat(batches: list[RowBatch]) -> RowBatch:
        """Consecutive batches (each starting where the one before ended) as one."""
        if len(batches) == 1:
            return batches[0]
        first = batches[0]
        keep = None if first.keep is None else pa.concat_tables([b.keep for b in batches])
        return RowBatch(
            first.start,
            pa.concat_arrays([_array(b.ids) for b in batches]),
            list(chain.from_iterable(b.texts for b in batches)),  # C speed: copies pointers only
            list(chain.from_iterable(b.text_errors for b in batches)),
            keep,
            None if first.params is None else list(chain.from_iterable(b.params for b in batches)),
            None if first.schemas is None else list(chain.from_iterable(b.schemas for b in batches)),
        )

    def split(self, rows: int) -> tuple[RowBatch, RowBatch]:
        """(the first ``rows`` rows, the rest)."""
        return self._rows(0, rows), self._rows(rows, len(self))

    def _rows(self, lo: int, hi: int) -> RowBatch:
        return RowBatch(
            self.start + lo, self.ids.slice(lo, hi - lo), self.texts[lo:hi], self.text_errors[lo:hi],
            None if self.keep is None else self.keep.slice(lo, hi - lo),
            None if self.params is None else self.params[lo:hi],
            None if self.schemas is None else self.schemas[lo:hi],
        )  # fmt: skip


def rebatch(parts: Iterator[RowBatch], size: int) -> Iterator[RowBatch]:
    """Consecutive batches joined and cut into batches of exactly ``size`` rows (the last may be short).
    Nothing here holds a yielded batch while the caller works on it."""
    pending: list[RowBatch] = []
    count = 0
    for part in parts:
        pending.append(part)
        count += len(part)
        del part
        while count >= size:
            out = list(RowBatch.concat(pending).split(size))
            pending, count = ([out[1]], len(out[1])) if len(out[1]) else ([], 0)
            del out[1]
            yield out.pop()
    if pending:
        out, pending = [RowBatch.concat(pending)], []
        yield out.pop()


@dataclass(frozen=True)
class PythonRows:
    """Rows parsed one by one (JSONL that pyarrow refused); ``errors`` holds a line's own error (its
    bytes are not UTF-8), which becomes that row's error."""

    rows: list[dict]
    errors: list[str | None]

    def __len__(self) -> int:
        return len(self.rows)


@dataclass(frozen=True)
class InputSource(ABC):
    """A validated input file; `iter_batches` reads it lazily."""

    path: Path
    num_rows: int
    columns: list[str]
    column: str
    id_column: str | None
    keep_columns: tuple[str, ...]
    messages: bool = field(default=False, kw_only=True)  # `column` holds conversations (io.messages)
    params_column: str | None = field(default=None, kw_only=True)  # per-row sampling settings

    @abstractmethod
    def _tables(self, rows_per_batch: int, start: int) -> Iterator[pa.Table | PythonRows]:
        """Exactly `rows_per_batch` rows each (fewer at the end) from row `start`."""

    def iter_batches(self, rows_per_batch: int = 65536, start: int = 0) -> Iterator[RowBatch]:
        if rows_per_batch < 1:
            raise ValueError(f"rows_per_batch must be >= 1, got {rows_per_batch}")
        if not 0 <= start <= self.num_rows:
            raise ValueError(f"start must be in [0, {self.num_rows}], got {start}")
        yield from rebatch(self._converted(min(rows_per_batch, CONVERT_ROWS), start), rows_per_batch)

    def _converted(self, rows: int, start: int) -> Iterator[RowBatch]:
        """The input as RowBatches of ``rows`` rows: each read chunk is converted to Python (texts)
        and let go before the next is read, so a window never holds its texts twice (Arrow and
        Python: GBs at a million rows)."""
        for chunk in self._tables(rows, start):
            convert = self._batch_from_table if isinstance(chunk, pa.Table) else self._batch_from_rows
            batch = [convert(start, chunk)]
            del chunk
            start += len(batch[0])
            yield batch.pop()

    def _ids(self, start: int, n: int, read: pa.Array | None) -> pa.Array:
        return read if self.id_column else pa.array(np.arange(start, start + n, dtype=np.int64))

    def _batch_from_table(self, start: int, table: pa.Table) -> RowBatch:
        column = table.column(self.column)
        texts, errors = arrow_conversations(column) if self.messages else _arrow_texts(column)
        ids = table.column(self.id_column).combine_chunks() if self.id_column else None
        if ids is not None:
            ids = _valid_utf8(ids, f"id column {self.id_column!r}", errors)
        keep = table.select(list(self.keep_columns)) if self.keep_columns else None
        for i, name in enumerate(self.keep_columns):
            column = _valid_utf8(keep.column(name).combine_chunks(), f"keep column {name!r}", errors)
            keep = keep.set_column(i, name, column)
        texts = [None if e else t for t, e in zip(texts, errors)]  # a row with an error is not generated
        params = table.column(self.params_column).to_pylist() if self.params_column else None
        return RowBatch(start, self._ids(start, len(texts), ids), texts, errors, keep, params)

    def _batch_from_rows(self, start: int, rows: PythonRows) -> RowBatch:
        raise NotImplementedError  # only JSONL falls back to parsed Python rows


def _arrow_texts(values: pa.ChunkedArray) -> tuple[list[str | None], list[str | None]]:
    if pa.types.is_dictionary(values.type):
        values = pc.cast(values, values.type.value_type)
    kind = values.type
    if _is_string(kind):
        texts: list[str | None] = []
        errors: list[str | None] = []
        for chunk in values.chunks:  # chunk by chunk: no copy of the whole column (GBs in a big window)
            chunk_errors: list[str | None] = [None] * len(chunk)
            texts += _valid_utf8(chunk, "text", chunk_errors).to_pylist()
            errors += chunk_errors
        return texts, [e or ("text is null" if t is None else None) for t, e in zip(texts, errors)]
    nulls = values.is_null().to_pylist()
    return [None] * len(nulls), ["text is null" if n else f"text is not a string ({kind})" for n in nulls]


def _is_string(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)


def _valid_utf8(values: pa.Array, what: str, errors: list[str | None]) -> pa.Array:
    """``values`` with every string that is not valid UTF-8 (Parquet does not check) made null, and
    that row's error set: one bad value fails its row, not the job."""
    if not _is_string(values.type):
        return values
    try:
        values.validate(full=True)
        return values
    except pa.ArrowInvalid:
        pass
    fixed: list[str | None] = []
    for i, raw in enumerate(values.cast(pa.binary()).to_pylist()):
        try:
            fixed.append(None if raw is None else raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            fixed.append(None)
            errors[i] = errors[i] or f"{what} is not valid UTF-8 ({e.reason} at byte {e.start})"
    return pa.array(fixed, type=values.type)


def python_value(value: object, messages: bool) -> tuple[str | None, str | None]:
    """A JSONL row's text (or conversation, as canonical JSON) and its error."""
    return python_conversation(value) if messages else python_text(value)


def python_text(value: object) -> tuple[str | None, str | None]:
    if isinstance(value, str):
        return value, None
    if value is None:
        return None, "text is null"
    try:
        kind = str(pa.array([value]).type)  # name it as Arrow would, like the fast path does
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        kind = type(value).__name__
    return None, f"text is not a string ({kind})"


def needed_columns(
    column: str, id_column: str | None, keep: tuple[str, ...], params_column: str | None = None
) -> list[str]:
    extra = [c for c in (id_column, params_column) if c]
    return list(dict.fromkeys([column, *extra, *keep]))


def check_columns(
    path: Path, columns: list[str], column: str, id_column: str | None, keep: tuple[str, ...]
) -> None:
    existing = ", ".join(repr(c) for c in columns) if columns else "none (the file has no rows)"
    for role, name in [("text", column), ("id", id_column), *(("keep", k) for k in keep)]:
        if name is not None and name not in columns:
            raise JobError(f"{role} column {name!r} not found in {path}; columns there: {existing}")


def _array(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    return values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
