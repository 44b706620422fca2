"""Input files (Parquet, JSONL) -> validated up front, then read lazily as RowBatches of ids, texts, keeps."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from batchllm.errors import JobError
from batchllm.io.dataset import is_dataset, open_dataset
from batchllm.io.jsonl import open_jsonl
from batchllm.io.openai_batch import is_batch_file, open_batch_file
from batchllm.io.output_file import JSONL_SUFFIXES
from batchllm.io.source import InputSource, check_columns, needed_columns
from batchllm.io.writer import check_keep_columns

READ_ROWS = 65536  # rows per Parquet read; a window's table holds its reads as chunks
FORMATS_BY_SUFFIX = {".parquet": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl"}


@dataclass(frozen=True)
class ParquetSource(InputSource):
    def _tables(self, rows_per_batch: int, start: int) -> Iterator[pa.Table]:
        columns = needed_columns(self.column, self.id_column, self.keep_columns, self.params_column)
        with pq.ParquetFile(self.path) as pf:
            group, skip = 0, start
            while group < pf.num_row_groups and skip >= pf.metadata.row_group(group).num_rows:
                skip -= pf.metadata.row_group(group).num_rows  # skip whole row groups without reading them
                group += 1
            groups = list(range(group, pf.num_row_groups))
            if groups:
                # Read in small batches: a window is their chunks, never one copy of them all.
                read = min(rows_per_batch, READ_ROWS)
                batches = pf.iter_batches(batch_size=read, row_groups=groups, columns=columns)
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
            out, rest = [table.slice(0, size)], table.slice(size)
            pending, count = rest.to_batches(), rest.num_rows
            table = rest = batch = None  # nothing here holds the yielded rows while the caller works on them
            yield out.pop()
    if count:
        out, pending, batch = [pa.Table.from_batches(pending)], [], None
        yield out.pop()


def _open_parquet(path: Path) -> tuple[int, list[str]]:
    try:
        with pq.ParquetFile(path) as pf:  # reads the footer only
            return pf.metadata.num_rows, list(pf.schema_arrow.names)
    except (OSError, pa.ArrowException) as e:
        raise JobError(f"cannot read {path} as Parquet: {e}") from e


def open_input(
    path: Path,
    fmt: str | None,
    column: str,
    id_column: str | None,
    keep_columns: tuple[str, ...],
    messages: bool = False,
    params_column: str | None = None,
    model: str = "",
) -> InputSource:
    """Validate the input cheaply and return a lazy source. Raises JobError for anything unusable.
    A directory or a glob is a dataset of many files (``io.dataset``). With ``messages``, ``column``
    holds each row's conversation (``io.messages``) instead of its text; ``params_column`` holds each
    row's sampling settings (``io.row_params``). An OpenAI batch file (``--format openai``, or a JSONL
    file whose first line is a request) brings all three (``io.openai_batch``); ``model`` is the job's."""
    path = Path(path)
    if fmt is not None and fmt not in ("parquet", "jsonl", "openai"):
        raise JobError(f"unknown input format {fmt!r}; use parquet, jsonl or openai")
    keep_columns = tuple(keep_columns)
    check_keep_columns(keep_columns)  # a clash with an output column would only surface at the first commit

    def one(p: Path, id_column: str | None, keep: tuple[str, ...]) -> InputSource:
        if fmt == "openai" or (fmt is None and p.suffix.lower() in JSONL_SUFFIXES and is_batch_file(p)):
            return _openai(p, model, dataset=is_dataset(path))
        source = open_file(p, fmt, column, id_column, keep, params_column)
        return replace(source, messages=messages, params_column=params_column)

    if not is_dataset(path):
        return one(path, id_column, keep_columns)
    suffixes = tuple(
        s for s, f in FORMATS_BY_SUFFIX.items() if fmt in (None, f, "openai" if f == "jsonl" else f)
    )
    return open_dataset(path, id_column, keep_columns, suffixes, one)


def _openai(path: Path, model: str, dataset: bool) -> InputSource:
    if dataset:
        raise JobError(f"{path} is an OpenAI batch file; give batch files one at a time, not as a dataset")
    if not path.is_file():
        raise JobError(f"input file {path} does not exist" if not path.exists() else f"{path} is not a file")
    return open_batch_file(path, model)


def open_file(
    path: Path,
    fmt: str | None,
    column: str,
    id_column: str | None,
    keep_columns: tuple[str, ...],
    params_column: str | None = None,
) -> InputSource:
    """One input file, validated (its columns and, for JSONL, every line)."""
    fmt = fmt or FORMATS_BY_SUFFIX.get(path.suffix.lower())
    if fmt is None:
        raise JobError(f"cannot tell the format of {path} from its extension; pass --format parquet or jsonl")
    if not path.is_file():
        raise JobError(f"input file {path} does not exist" if not path.exists() else f"{path} is not a file")
    if fmt == "jsonl":
        return open_jsonl(path, column, id_column, keep_columns, params_column)
    num_rows, columns = _open_parquet(path)
    check_columns(path, columns, column, id_column, keep_columns)
    if params_column is not None and params_column not in columns:
        raise JobError(f"params column {params_column!r} not found in {path}")
    return ParquetSource(path, num_rows, columns, column, id_column, keep_columns)
