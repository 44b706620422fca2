"""A dataset of many input files (a directory or a glob of Parquet/JSONL files) read as one input.

Files are read in sorted path order, one after another, and their rows numbered on across files, so
windows, resume and the report see one input. Directories named ``key=value`` in a file's path (Hive
partitioning) give every row of that file a string column ``key``, usable as
``--id-column`` and in ``--keep-columns``. Ids must be unique across the whole dataset.
"""

from __future__ import annotations

import glob
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from batchllm.errors import JobError
from batchllm.io.output_file import OutputPart, is_jsonl
from batchllm.io.source import InputSource, RowBatch, rebatch

OpenFile = Callable[[Path, str | None, tuple[str, ...]], InputSource]  # (path, id column, keep) -> source


@dataclass(frozen=True)
class DatasetFile:
    source: InputSource
    relative: Path  # the file's path below the dataset's root
    partitions: dict[str, str]  # Hive partition values from its directories
    start: int  # dataset row index of its first row


@dataclass(frozen=True)
class DatasetSource(InputSource):
    files: tuple[DatasetFile, ...]
    types: dict[str, pa.DataType]  # the id and keep columns' types, agreed by every file

    def _tables(self, rows_per_batch: int, start: int) -> Iterator[pa.Table]:
        raise NotImplementedError  # batches come from the files' own sources

    def iter_batches(self, rows_per_batch: int = 65536, start: int = 0) -> Iterator[RowBatch]:
        """Exactly ``rows_per_batch`` rows per batch (the last may be short), across file boundaries."""
        if rows_per_batch < 1:
            raise ValueError(f"rows_per_batch must be >= 1, got {rows_per_batch}")
        if not 0 <= start <= self.num_rows:
            raise ValueError(f"start must be in [0, {self.num_rows}], got {start}")
        yield from rebatch(self._file_batches(rows_per_batch, start), rows_per_batch)

    def _file_batches(self, rows_per_batch: int, start: int) -> Iterator[RowBatch]:
        for f in self.files:
            if f.start + f.source.num_rows <= start or f.source.num_rows == 0:
                continue
            for batch in f.source.iter_batches(rows_per_batch, max(0, start - f.start)):
                yield self._in_dataset(f, batch)

    def _in_dataset(self, f: DatasetFile, batch: RowBatch) -> RowBatch:
        """A file's batch numbered within the dataset, with its partition values as columns."""
        start, n = f.start + batch.start, len(batch)
        if self.id_column is None:
            ids = pa.array(np.arange(start, start + n, dtype=np.int64))
        else:
            ids = self._column(f, batch, self.id_column, batch.ids)
        keep = None
        if self.keep_columns:
            read = batch.keep.column_names if batch.keep is not None else []
            arrays = [self._column(f, batch, k, batch.keep.column(k) if k in read else None)
                      for k in self.keep_columns]  # fmt: skip
            keep = pa.table(dict(zip(self.keep_columns, arrays)))
        return RowBatch(start, ids, batch.texts, batch.text_errors, keep, batch.params, batch.schemas)

    def _column(self, f: DatasetFile, batch: RowBatch, name: str, read: pa.Array | None) -> pa.Array:
        kind = self.types[name]
        if read is None:  # a partition column
            return pa.array([f.partitions.get(name)] * len(batch), type=kind)
        read = read.combine_chunks() if isinstance(read, pa.ChunkedArray) else read
        return read if read.type == kind else read.cast(kind)


def is_dataset(path: Path) -> bool:
    return path.is_dir() or glob.has_magic(str(path))


def dataset_files(path: Path, suffixes: tuple[str, ...]) -> tuple[Path, list[Path]]:
    """(root, the data files in sorted order). Hidden files and names starting with ``_`` (markers
    such as ``_SUCCESS``) are skipped, as Spark and pyarrow do."""
    if path.is_dir():
        root, found = path, [p for p in path.rglob("*") if p.is_file()]
    else:
        root = _glob_root(path)
        found = [Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file()]
    files = [p for p in found if p.suffix.lower() in suffixes and not _hidden(p.relative_to(root))]
    if not files:
        kinds = "/".join(suffixes)
        raise JobError(f"no input files ({kinds}) found in {path}")
    return root, sorted(files, key=lambda p: p.relative_to(root).as_posix())


def input_stem(path: Path) -> str:
    """The name an output is named after: a file's stem, a dataset's root directory name."""
    path = Path(path)
    if not is_dataset(path):
        return path.stem
    return (path if path.is_dir() else _glob_root(path)).resolve().name or "dataset"


def _glob_root(pattern: Path) -> Path:
    parts = []
    for part in pattern.parts:
        if glob.has_magic(part):
            break
        parts.append(part)
    return Path(*parts) if parts else Path(".")


def _hidden(relative: Path) -> bool:
    return any(part.startswith((".", "_")) for part in relative.parts)


def partition_values(path: Path) -> dict[str, str]:
    """``reviews/date=2026-12-01/lang=en/part-0.parquet`` -> {date: 2026-12-01, lang: en}: every
    ``key=value`` directory of the path as given (the glob's fixed part too), values unescaped."""
    pairs = (part.split("=", 1) for part in path.parent.parts if "=" in part)
    return {key: unquote(value) for key, value in pairs if key}


def open_dataset(
    path: Path, id_column: str | None, keep: tuple[str, ...], suffixes: tuple[str, ...], open_file: OpenFile
) -> DatasetSource:
    """Every data file under ``path`` opened (and checked) in order; ids checked unique across them."""
    root, paths = dataset_files(path, suffixes)
    relatives = [p.relative_to(root) for p in paths]
    partitions = [partition_values(p) for p in paths]
    keys = list(dict.fromkeys(k for d in partitions for k in d))
    file_id = None if id_column in keys else id_column
    files, start = [], 0
    for file_path, relative, values in zip(paths, relatives, partitions):
        source = open_file(file_path, file_id, tuple(k for k in keep if k not in keys))
        clash = [k for k in keys if k in source.columns]
        if clash:
            raise JobError(f"{file_path} has a column {clash[0]!r} that is also a partition directory name")
        files.append(DatasetFile(source, relative, values, start))
        start += source.num_rows
    columns = list(dict.fromkeys([c for f in files for c in f.source.columns] + keys))
    column = files[0].source.column
    types = {
        name: _agreed_type(files, name, keys) for name in ([id_column] if id_column else []) + list(keep)
    }
    first = files[0].source  # every file is opened alike: its conversations and params say the dataset's
    dataset = DatasetSource(
        root, start, columns, column, id_column, keep, tuple(files), types,
        messages=first.messages, params_column=first.params_column,
    )  # fmt: skip
    if id_column is not None:
        check_unique_ids(dataset)
    return dataset


def _agreed_type(files: list[DatasetFile], name: str, partition_keys: list[str]) -> pa.DataType:
    if name in partition_keys:
        return pa.string()
    agreed, first = None, None
    for f in files:
        kind = _file_type(f.source, name)
        if agreed is None:
            agreed, first = kind, f.source.path
            continue
        try:
            schemas = [pa.schema([(name, agreed)]), pa.schema([(name, kind)])]
            agreed = pa.unify_schemas(schemas, promote_options="permissive").field(name).type
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise JobError(
                f"column {name!r} is {agreed} in {first} but {kind} in {f.source.path}; the files of a "
                "dataset must agree on its type"
            ) from e
    return agreed


def _file_type(source: InputSource, name: str) -> pa.DataType:
    schema = getattr(source, "schema", None)  # JSONL: the types its validation scan found
    if schema is None:
        import pyarrow.parquet as pq

        schema = pq.read_schema(source.path)
    return schema.field(name).type


def check_unique_ids(dataset: DatasetSource) -> None:
    """A JobError naming an id that more than one row of the dataset has, and the files holding it."""
    per_file = [_file_ids(dataset, f) for f in dataset.files]
    kind = dataset.types[dataset.id_column]
    ids = pc.drop_null(pa.chunked_array([a for arrays in per_file for a in arrays], kind))
    counts = pc.value_counts(ids)
    repeated = counts.filter(pc.greater(counts.field("counts"), 1))
    if len(repeated) == 0:
        return
    value = repeated[0]["values"].as_py()
    holders = [str(f.relative) for f, arrays in zip(dataset.files, per_file)
               if any(pc.any(pc.equal(a, value)).as_py() for a in arrays)]  # fmt: skip
    raise JobError(
        f"id {value!r} of column {dataset.id_column!r} appears {repeated[0]['counts'].as_py()} times in the "
        f"dataset {dataset.path} (in {', '.join(holders[:3])}); ids must be unique across its files"
    )


def _file_ids(dataset: DatasetSource, f: DatasetFile) -> list[pa.Array]:
    """A file's ids as the dataset types them: a Parquet file's id column alone, a JSONL file parsed."""
    name, kind = dataset.id_column, dataset.types[dataset.id_column]
    if name not in f.source.columns:  # a partition column (null for a file without that directory)
        return [pa.array([f.partitions.get(name)] * f.source.num_rows, type=kind)]
    if getattr(f.source, "schema", None) is None:  # Parquet: read only the id column
        import pyarrow.parquet as pq

        return [pq.read_table(f.source.path, columns=[name]).column(name).combine_chunks().cast(kind)]
    return [dataset._in_dataset(f, b).ids for b in f.source.iter_batches()]


def output_parts(source: InputSource, output: Path, output_dir: Path | None) -> list[OutputPart]:
    """Where the output goes: ``output`` for every row, or with ``output_dir`` one file per input file
    at its path below the dataset's root (a single input file: its own name)."""
    if isinstance(source, DatasetSource) and source.path.is_dir():
        inside = (output_dir or output).resolve()
        if source.path.resolve() in (inside, *inside.parents):
            raise JobError(
                f"the output {output_dir or output} is inside the input directory {source.path}, so the "
                "next run would read it as input; put it elsewhere"
            )
    if getattr(source, "batch_output", False) and output_dir is None and not is_jsonl(output):
        raise JobError(
            f"the results of an OpenAI batch file are JSON lines; give --output NAME.jsonl, not {output}"
        )
    if output_dir is None:
        return [OutputPart(output, 0, source.num_rows)]
    if not isinstance(source, DatasetSource):
        return [OutputPart(output_dir / source.path.name, 0, source.num_rows)]
    ends = [(f.relative, f.start, f.start + f.source.num_rows) for f in source.files]
    return [OutputPart(output_dir / relative, start, stop) for relative, start, stop in ends]
