"""JSONL input: validated by one streaming scan (row count, column types), then parsed in chunks with
pyarrow.json, falling back to ``json`` for a chunk pyarrow refuses (to name a bad line, or to keep
values of mixed types row by row)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.json as pj

from batchllm.errors import JobError
from batchllm.io.source import InputSource, PythonRows, RowBatch, check_columns, needed_columns, python_value

_SCAN_ROWS = 65536  # JSONL rows parsed at a time while validating
_MAX_BLOCK = 2**31 - 1  # pyarrow.json block sizes are int32


@dataclass(frozen=True)
class JsonlSource(InputSource):
    schema: pa.Schema  # types of the needed columns, fixed by the validation scan so every batch agrees

    def _tables(self, rows_per_batch: int, start: int) -> Iterator[pa.Table | PythonRows]:
        for first_line, lines in _line_chunks(self.path, rows_per_batch, start):
            yield _parse_chunk(lines, first_line, self.path, self.schema)

    def _batch_from_rows(self, start: int, parsed: PythonRows) -> RowBatch:
        rows = parsed.rows
        texts: list[str | None] = []
        errors: list[str | None] = []
        for row, line_error in zip(rows, parsed.errors):
            text, error = (
                (None, line_error) if line_error else python_value(row.get(self.column), self.messages)
            )
            texts.append(text)
            errors.append(error)
        ids = self._python_column(rows, self.id_column) if self.id_column else None
        keep = None
        if self.keep_columns:
            keep = pa.table({k: self._python_column(rows, k) for k in self.keep_columns})
        params = [r.get(self.params_column) for r in rows] if self.params_column else None
        return RowBatch(start, self._ids(start, len(rows), ids), texts, errors, keep, params)

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
) -> pa.Table | PythonRows:
    """Fast: pyarrow.json. If it refuses (bad JSON, or types mixed within a column) or lets bytes that
    are not UTF-8 through, parse the chunk with `json` to find the bad line or to keep mixed-type
    values row by row."""
    data = b"".join(lines)
    parse = pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore" if schema else "infer")
    # One block holding the whole chunk, so no single long line can straddle a block boundary.
    read = pj.ReadOptions(block_size=min(max(len(data), 1), _MAX_BLOCK), use_threads=False)
    try:
        table = pj.read_json(io.BytesIO(data), read_options=read, parse_options=parse)
        _check_utf8(table)
        return table
    except pa.ArrowException:
        return _parse_python(lines, first_line, path)


def _check_utf8(table: pa.Table) -> None:
    """pyarrow.json lets bytes that are not UTF-8 into strings; a full validation raises ArrowInvalid."""
    table.validate(full=True)


def _parse_python(lines: list[bytes], first_line: int, path: Path) -> PythonRows:
    """Every line a JSON object, or a JobError naming the line. A line that is not UTF-8 keeps its
    other values (read with U+FFFD for the bad bytes) and becomes an error row."""
    rows, errors = [], []
    for lineno, line in enumerate(lines, first_line):
        if not line.strip():
            continue
        error = None
        try:
            text = line.decode("utf-8-sig")  # a BOM, as json.loads(bytes) allowed
        except UnicodeDecodeError as e:
            error = f"line {lineno} is not valid UTF-8 ({e.reason} at byte {e.start}): {_snippet(line)}"
            text = line.decode("utf-8", "replace")
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise JobError(
                f"{path}: line {lineno} is not valid JSON ({e.msg} at column {e.colno}): {_snippet(line)}"
            ) from e
        if not isinstance(value, dict):
            raise JobError(f"{path}: line {lineno} is not a JSON object: {_snippet(line)}")
        rows.append(value)
        errors.append(error)
    return PythonRows(rows, errors)


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
            chunk_types = _python_types(chunk.rows)
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


def open_jsonl(
    path: Path, column: str, id_column: str | None, keep: tuple[str, ...], params_column: str | None = None
) -> JsonlSource:
    try:
        num_rows, types = _scan_jsonl(path)
    except OSError as e:
        raise JobError(f"cannot read {path}: {e.strerror or e}") from e
    columns = list(types)
    check_columns(path, columns, column, id_column, keep)
    if params_column is not None and params_column not in columns:
        raise JobError(f"params column {params_column!r} not found in {path}")
    fields = []
    for name in needed_columns(column, id_column, keep, params_column):
        kind = types[name]
        if kind is None and name not in (column, params_column):
            raise JobError(f"column {name!r} in {path} holds values of incompatible types; it cannot be kept")
        fields.append((name, kind or pa.string()))  # mixed-type text: chunks with non-strings parse slowly
    schema = pa.schema(fields)
    return JsonlSource(path, num_rows, columns, column, id_column, keep, schema, params_column=params_column)
