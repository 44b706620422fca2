"""Input files (Parquet, JSONL) -> validated up front, then read lazily as RowBatches of ids, texts, keeps."""

from __future__ import annotations

import io
import json
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj
import pyarrow.parquet as pq

from batchllm.errors import JobError
from batchllm.io.writer import check_keep_columns

FORMATS_BY_SUFFIX = {".parquet": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl"}
_SCAN_ROWS = 65536  # JSONL rows parsed at a time while validating
_MAX_BLOCK = 2**31 - 1  # pyarrow.json block sizes are int32


@dataclass(frozen=True)
class RowBatch:
    """Consecutive input rows: `start` is the row index of the first."""

    start: int
    ids: pa.Array  # the id column in its own type, or int64 row indices
    texts: list[str | None]  # None where the text is unusable; text_errors says why
    text_errors: list[str | None]
    keep: pa.Table | None  # the keep columns, None when none were asked for

    def __len__(self) -> int:
        return len(self.texts)


@dataclass(frozen=True)
class InputSource(ABC):
    """A validated input file; `iter_batches` reads it lazily."""

    path: Path
    num_rows: int
    columns: list[str]
    column: str
    id_column: str | None
    keep_columns: tuple[str, ...]

    @abstractmethod
    def _tables(self, rows_per_batch: int, start: int) -> Iterator[pa.Table | list[dict]]:
        """Exactly `rows_per_batch` rows each (fewer at the end) from row `start`."""

    def iter_batches(self, rows_per_batch: int = 65536, start: int = 0) -> Iterator[RowBatch]:
        if rows_per_batch < 1:
            raise ValueError(f"rows_per_batch must be >= 1, got {rows_per_batch}")
        if not 0 <= start <= self.num_rows:
            raise ValueError(f"start must be in [0, {self.num_rows}], got {start}")
        row = start
        for chunk in self._tables(rows_per_batch, start):
            is_table = isinstance(chunk, pa.Table)
            batch = self._batch_from_table(row, chunk) if is_table else self._batch_from_rows(row, chunk)
            yield batch
            row += len(batch)

    def _ids(self, start: int, n: int, read: pa.Array | None) -> pa.Array:
        return read if self.id_column else pa.array(np.arange(start, start + n, dtype=np.int64))

    def _batch_from_table(self, start: int, table: pa.Table) -> RowBatch:
        texts, errors = _arrow_texts(table.column(self.column))
        ids = table.column(self.id_column).combine_chunks() if self.id_column else None
        keep = table.select(list(self.keep_columns)) if self.keep_columns else None
        return RowBatch(start, self._ids(start, len(texts), ids), texts, errors, keep)

    def _batch_from_rows(self, start: int, rows: list[dict]) -> RowBatch:
        raise NotImplementedError  # only JSONL falls back to parsed Python rows


def _arrow_texts(values: pa.ChunkedArray) -> tuple[list[str | None], list[str | None]]:
    if pa.types.is_dictionary(values.type):
        values = pc.cast(values, values.type.value_type)
    kind = values.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind):
        texts = values.to_pylist()
        return texts, ["text is null" if t is None else None for t in texts]
    nulls = values.is_null().to_pylist()
    return [None] * len(nulls), ["text is null" if n else f"text is not a string ({kind})" for n in nulls]


def _python_text(value: object) -> tuple[str | None, str | None]:
    if isinstance(value, str):
        return value, None
    if value is None:
        return None, "text is null"
    try:
        kind = str(pa.array([value]).type)  # name it as Arrow would, like the fast path does
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        kind = type(value).__name__
    return None, f"text is not a string ({kind})"


@dataclass(frozen=True)
class ParquetSource(InputSource):
    def _tables(self, rows_per_batch: int, start: int) -> Iterator[pa.Table]:
        columns = _needed_columns(self.column, self.id_column, self.keep_columns)
        with pq.ParquetFile(self.path) as pf:
            group, skip = 0, start
            while group < pf.num_row_groups and skip >= pf.metadata.row_group(group).num_rows:
                skip -= pf.metadata.row_group(group).num_rows  # skip whole row groups without reading them
                group += 1
            groups = list(range(group, pf.num_row_groups))
            if groups:
                batches = pf.iter_batches(batch_size=rows_per_batch, row_groups=groups, columns=columns)
                yield from _rebatch(batches, rows_per_batch, skip)


def _rebatch(batches: Iterator[pa.RecordBatch], size: int, skip: int) -> Iterator[pa.Table]:
    """Exactly `size` rows per table (the last may be short), after dropping the first `skip` rows."""
    pending: list[pa.RecordBatch] = []
    count = 0
    for batch in batches:
        dropped = min(skip, batch.num_rows)
        batch, skip = batch.slice(dropped), skip - dropped
        if batch.num_rows == 0:
            continue
        pending.append(batch)
        count += batch.num_rows
        while count >= size:
            table = pa.Table.from_batches(pending)
            yield table.slice(0, size)
            rest = table.slice(size)
            pending, count = rest.to_batches(), rest.num_rows
    if count:
        yield pa.Table.from_batches(pending)


def _open_parquet(path: Path) -> tuple[int, list[str]]:
    try:
        with pq.ParquetFile(path) as pf:  # reads the footer only
            return pf.metadata.num_rows, list(pf.schema_arrow.names)
    except (OSError, pa.ArrowException) as e:
        raise JobError(f"cannot read {path} as Parquet: {e}") from e


@dataclass(frozen=True)
class JsonlSource(InputSource):
    schema: pa.Schema  # types of the needed columns, fixed by the validation scan so every batch agrees

    def _tables(self, rows_per_batch: int, start: int) -> Iterator[pa.Table | list[dict]]:
        for first_line, lines in _line_chunks(self.path, rows_per_batch, start):
            yield _parse_chunk(lines, first_line, self.path, self.schema)

    def _batch_from_rows(self, start: int, rows: list[dict]) -> RowBatch:
        texts, errors = zip(*(_python_text(r.get(self.column)) for r in rows)) if rows else ((), ())
        ids = self._python_column(rows, self.id_column) if self.id_column else None
        keep = None
        if self.keep_columns:
            keep = pa.table({k: self._python_column(rows, k) for k in self.keep_columns})
        return RowBatch(start, self._ids(start, len(rows), ids), list(texts), list(errors), keep)

    def _python_column(self, rows: list[dict], name: str) -> pa.Array:
        return pa.array([r.get(name) for r in rows], type=self.schema.field(name).type)


def _line_chunks(path: Path, rows: int, skip_rows: int = 0) -> Iterator[tuple[int, list[bytes]]]:
    """(1-based number of the first line, raw lines) holding `rows` non-blank lines each."""
    with open(path, "rb") as f:
        numbered = enumerate(f, 1)
        skipped = 0
        if skip_rows:
            for _, line in numbered:
                skipped += bool(line.strip())
                if skipped == skip_rows:
                    break
        lines: list[bytes] = []
        count, first = 0, None
        for lineno, line in numbered:
            first = first or lineno
            lines.append(line)
            count += bool(line.strip())  # blank lines are not rows; pyarrow.json skips them too
            if count == rows:
                yield first, lines
                lines, count, first = [], 0, None
        if count:
            yield first or 1, lines


def _parse_chunk(
    lines: list[bytes], first_line: int, path: Path, schema: pa.Schema | None
) -> pa.Table | list[dict]:
    """Fast: pyarrow.json. If it refuses (bad JSON, or types mixed within a column), parse the chunk
    with `json` to find the bad line or to keep mixed-type values row by row."""
    data = b"".join(lines)
    parse = pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore" if schema else "infer")
    # One block holding the whole chunk, so no single long line can straddle a block boundary.
    read = pj.ReadOptions(block_size=min(max(len(data), 1), _MAX_BLOCK), use_threads=False)
    try:
        return pj.read_json(io.BytesIO(data), read_options=read, parse_options=parse)
    except pa.ArrowException:
        return _parse_python(lines, first_line, path)


def _parse_python(lines: list[bytes], first_line: int, path: Path) -> list[dict]:
    rows = []
    for lineno, line in enumerate(lines, first_line):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise JobError(
                f"{path}: line {lineno} is not valid JSON ({e.msg} at column {e.colno}): {_snippet(line)}"
            ) from e
        except UnicodeDecodeError as e:
            raise JobError(f"{path}: line {lineno} is not valid UTF-8 ({e.reason}): {_snippet(line)}") from e
        if not isinstance(value, dict):
            raise JobError(f"{path}: line {lineno} is not a JSON object: {_snippet(line)}")
        rows.append(value)
    return rows


def _snippet(line: bytes, width: int = 80) -> str:
    text = line.decode("utf-8", "replace").strip()
    return text if len(text) <= width else text[:width] + "..."


def _scan_jsonl(path: Path) -> tuple[int, dict[str, pa.DataType | None]]:
    """One streaming pass: row count and each column's type (None: values of incompatible types)."""
    num_rows = 0
    types: dict[str, pa.DataType | None] = {}
    for first_line, lines in _line_chunks(path, _SCAN_ROWS):
        chunk = _parse_chunk(lines, first_line, path, None)
        if isinstance(chunk, pa.Table):
            num_rows += chunk.num_rows
            chunk_types = {f.name: f.type for f in chunk.schema}
        else:
            num_rows += len(chunk)
            chunk_types = _python_types(chunk)
        for name, kind in chunk_types.items():
            types[name] = _merge_types(types[name], kind) if name in types else _json_type(kind)
    return num_rows, types


def _python_types(rows: list[dict]) -> dict[str, pa.DataType | None]:
    names = dict.fromkeys(k for r in rows for k in r)
    types: dict[str, pa.DataType | None] = {}
    for name in names:
        try:
            types[name] = pa.array([r.get(name) for r in rows]).type
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            types[name] = None
    return types


def _json_type(kind: pa.DataType | None) -> pa.DataType | None:
    """pyarrow.json guesses timestamps from ISO strings; JSON has only strings, so keep them strings."""
    if kind is None or not pa.types.is_timestamp(kind):
        return kind
    return pa.string()


def _merge_types(old: pa.DataType | None, new: pa.DataType | None) -> pa.DataType | None:
    new = _json_type(new)
    if old is None or new is None:
        return None
    schemas = [pa.schema([("c", old)]), pa.schema([("c", new)])]
    try:  # null -> anything, int64 + double -> double; string + int64 -> no single type
        return pa.unify_schemas(schemas, promote_options="permissive").field("c").type
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return None


def _open_jsonl(path: Path, column: str, id_column: str | None, keep: tuple[str, ...]) -> JsonlSource:
    try:
        num_rows, types = _scan_jsonl(path)
    except OSError as e:
        raise JobError(f"cannot read {path}: {e.strerror or e}") from e
    columns = list(types)
    _check_columns(path, columns, column, id_column, keep)
    fields = []
    for name in _needed_columns(column, id_column, keep):
        kind = types[name]
        if kind is None and name != column:
            raise JobError(f"column {name!r} in {path} holds values of incompatible types; it cannot be kept")
        fields.append((name, kind or pa.string()))  # mixed-type text: chunks with non-strings parse slowly
    return JsonlSource(path, num_rows, columns, column, id_column, keep, pa.schema(fields))


def _needed_columns(column: str, id_column: str | None, keep: tuple[str, ...]) -> list[str]:
    return list(dict.fromkeys([column, *([id_column] if id_column else []), *keep]))


def _check_columns(
    path: Path, columns: list[str], column: str, id_column: str | None, keep: tuple[str, ...]
) -> None:
    existing = ", ".join(repr(c) for c in columns) if columns else "none (the file has no rows)"
    for role, name in [("text", column), ("id", id_column), *(("keep", k) for k in keep)]:
        if name is not None and name not in columns:
            raise JobError(f"{role} column {name!r} not found in {path}; columns there: {existing}")


def open_input(
    path: Path, fmt: str | None, column: str, id_column: str | None, keep_columns: tuple[str, ...]
) -> InputSource:
    """Validate the input cheaply and return a lazy source. Raises JobError for anything unusable."""
    path = Path(path)
    fmt = fmt or FORMATS_BY_SUFFIX.get(path.suffix.lower())
    if fmt is None:
        raise JobError(f"cannot tell the format of {path} from its extension; pass --format parquet or jsonl")
    if fmt not in ("parquet", "jsonl"):
        raise JobError(f"unknown input format {fmt!r}; use parquet or jsonl")
    if not path.is_file():
        raise JobError(f"input file {path} does not exist" if not path.exists() else f"{path} is not a file")
    keep_columns = tuple(keep_columns)
    check_keep_columns(keep_columns)  # a clash with an output column would only surface at the first commit
    if fmt == "jsonl":
        return _open_jsonl(path, column, id_column, keep_columns)
    num_rows, columns = _open_parquet(path)
    _check_columns(path, columns, column, id_column, keep_columns)
    return ParquetSource(path, num_rows, columns, column, id_column, keep_columns)
