"""Finished rows -> shards committed durably in a run directory -> one final Parquet, written atomically.

    run_dir/
      shards/shard-000000.parquet   row_index + the output schema, one file per commit
      shards/shard-1f2e3d4c-000000.parquet   the same, from a writer with a tag (one per Ray worker)
      shards/.shard-000001.parquet.<pid>.tmp   a commit cut short by a crash: ignored, removed on open

The writer sees only arrays; it knows nothing of the engine.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from batchllm.errors import JobError
from batchllm.io.faults import crash_point

logger = logging.getLogger(__name__)

OUTPUT_COLUMNS = ("id", "output", "prompt_tokens", "output_tokens", "cached_tokens", "finish_reason", "error")
FINISH_REASONS = frozenset({"stop", "length", "error"})
_SHARD_NAME = re.compile(r"shard-(?:([0-9a-f]{8})-)?(\d{6,})\.parquet")


def check_keep_columns(keep_columns: Sequence[str]) -> None:
    """Kept input columns sit beside the output columns, so their names must differ; check before any work."""
    clashes = [c for c in keep_columns if c in OUTPUT_COLUMNS or c == "row_index"]
    if clashes:
        raise JobError(
            f"keep column(s) {', '.join(map(repr, clashes))} clash with output columns "
            f"({', '.join(OUTPUT_COLUMNS)}); rename them in the input"
        )


def result_table(
    row_index: np.ndarray,
    ids: pa.Array,
    keep: pa.Table | None,
    output: list[str | None],
    prompt_tokens: Sequence[int] | np.ndarray,
    output_tokens: Sequence[int] | np.ndarray,
    cached_tokens: Sequence[int] | np.ndarray,
    finish_reason: list[str],
    error: list[str | None],
) -> pa.Table:
    """One shard's table: `row_index` (int64) then the output columns, then the keep columns."""
    n = len(row_index)
    lengths = [len(ids), len(output), len(prompt_tokens), len(output_tokens), len(cached_tokens)]
    lengths += [len(finish_reason), len(error), n if keep is None else keep.num_rows]
    if any(length != n for length in lengths):
        raise ValueError(f"result columns differ in length: {n} row indices, others {lengths}")
    unknown = set(finish_reason) - FINISH_REASONS
    if unknown:
        raise ValueError(f"finish_reason must be one of {sorted(FINISH_REASONS)}, got {sorted(unknown)}")
    columns: dict[str, pa.Array | pa.ChunkedArray] = {
        "row_index": pa.array(np.asarray(row_index, dtype=np.int64)),
        "id": ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids,
        "output": pa.array(output, type=pa.string()),
        "prompt_tokens": pa.array(np.asarray(prompt_tokens, dtype=np.int32)),
        "output_tokens": pa.array(np.asarray(output_tokens, dtype=np.int32)),
        "cached_tokens": pa.array(np.asarray(cached_tokens, dtype=np.int32)),
        "finish_reason": pa.array(finish_reason, type=pa.string()),
        "error": pa.array(error, type=pa.string()),
    }
    if keep is not None:
        check_keep_columns(keep.column_names)
        columns.update({name: keep.column(name) for name in keep.column_names})
    return pa.table(columns)


class RunDir:
    """The run directory: results committed shard by shard, so a crash loses only unfinished rows.

    Without ``writer`` this instance owns the directory (one at a time): it removes temp files a crash
    left and numbers its shards after the untagged ones there. Concurrent writers (Ray workers) each
    pass a unique 8-hex-digit ``writer`` tag, which goes into their shard names, and leave temp files
    alone (another writer may be filling one)."""

    def __init__(self, path: Path, writer: str | None = None) -> None:
        if writer is not None and not re.fullmatch(r"[0-9a-f]{8}", writer):
            raise ValueError(f"a writer tag is 8 lowercase hex digits, got {writer!r}")
        self.path = Path(path)
        self.shards = self.path / "shards"
        self.writer = writer
        self._lock = threading.Lock()  # commits may come from a writer thread; shard numbers stay unique
        if writer is None:
            self._remove_temp_files()
        mine = (n for n, tag, _ in self._shard_paths() if tag == writer)
        self._next = max(mine, default=-1) + 1

    def ensure_writable(self, output: Path) -> None:
        """Create the run directory and check it and the output's directory accept files; fail fast."""
        try:
            self.shards.mkdir(parents=True, exist_ok=True)
            _probe(self.shards)
        except OSError as e:
            raise JobError(f"cannot write to the run directory {self.path}: {_reason(e)}") from e
        output = Path(output)
        if output.is_dir():
            raise JobError(
                f"output {output} is a directory; give a file path such as {output / 'out.parquet'}"
            )
        try:
            output.parent.mkdir(parents=True, exist_ok=True)
            _probe(output.parent)
        except OSError as e:
            raise JobError(f"cannot write the output {output}: {_reason(e)}") from e

    def commit(self, table: pa.Table) -> Path:
        """Write one shard atomically: it is whole or absent after a crash."""
        if "row_index" not in table.column_names:
            raise ValueError("a shard needs a row_index column; build it with result_table()")
        with self._lock:
            number, self._next = self._next, self._next + 1
        tag = "" if self.writer is None else f"{self.writer}-"
        path = self.shards / f"shard-{tag}{number:06d}.parquet"
        _write_atomic(table, path, what="a result shard")
        return path

    def committed_row_indices(self) -> np.ndarray:
        """int64 [rows committed so far], in shard order; reads only the row_index column."""
        parts = [
            self._read(path, ["row_index"]).column("row_index").to_numpy() for *_, path in self._shard_paths()
        ]
        return np.concatenate(parts).astype(np.int64, copy=False) if parts else np.empty(0, dtype=np.int64)

    def assemble(self, output: Path, num_rows: int) -> None:
        """Write every committed row, in input order, to `output` atomically. An empty input needs one
        empty shard (a zero-row result_table) so the output's schema is known."""
        output = Path(output)
        shards = [self._read(path) for *_, path in self._shard_paths()]
        if not shards:
            raise RuntimeError(f"no committed shards in {self.shards}; nothing to assemble into {output}")
        try:
            table = pa.concat_tables(shards)
        except pa.ArrowInvalid as e:
            raise RuntimeError(f"shards in {self.shards} do not share one schema: {e}") from e
        index = table.column("row_index").to_numpy()
        _check_complete(index, num_rows, output)
        table = table.take(np.argsort(index, kind="stable")).drop_columns(["row_index"])
        _write_atomic(table, output, what="the output")
        logger.info("wrote %d rows to %s", table.num_rows, output)

    def _shard_paths(self) -> list[tuple[int, str | None, Path]]:
        """(number, writer tag, path) of every committed shard, whoever wrote it."""
        if not self.shards.is_dir():
            return []
        found = ((_SHARD_NAME.fullmatch(p.name), p) for p in self.shards.iterdir())
        return sorted(((int(m.group(2)), m.group(1), p) for m, p in found if m), key=lambda t: t[::2])

    def _remove_temp_files(self) -> None:
        if not self.shards.is_dir():
            return
        for path in self.shards.glob(".*.tmp"):
            try:
                path.unlink()
            except OSError as e:  # harmless: temp files are never read
                logger.warning("could not remove the leftover temp file %s: %s", path, e)

    def _read(self, path: Path, columns: list[str] | None = None) -> pa.Table:
        try:
            return pq.read_table(path, columns=columns)
        except (OSError, pa.ArrowException) as e:
            raise JobError(f"cannot read the committed shard {path} ({e}); delete it to redo its rows") from e


def _check_complete(index: np.ndarray, num_rows: int, output: Path) -> None:
    """Every row index 0..num_rows-1 exactly once, or a RuntimeError naming what is wrong."""
    inside = (index >= 0) & (index < num_rows)
    counts = np.bincount(index[inside], minlength=num_rows)
    problems = []
    if not inside.all():
        problems.append(
            f"{(~inside).sum()} row indices outside 0..{num_rows - 1} ({_examples(index[~inside])})"
        )
    missing, duplicated = np.flatnonzero(counts == 0), np.flatnonzero(counts > 1)
    if missing.size:
        problems.append(f"{missing.size} rows missing ({_examples(missing)})")
    if duplicated.size:
        problems.append(f"{duplicated.size} rows committed more than once ({_examples(duplicated)})")
    if problems:
        raise RuntimeError(f"cannot assemble {output}: " + "; ".join(problems))


def _examples(values: np.ndarray, limit: int = 10) -> str:
    shown = ", ".join(str(v) for v in np.sort(values)[:limit])
    return f"rows {shown}" + (", ..." if values.size > limit else "")


def _write_atomic(table: pa.Table, path: Path, what: str) -> None:
    """Temp file in the same directory, fsync, rename over `path`, fsync the directory."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            pq.write_table(table, f)
            f.flush()
            os.fsync(f.fileno())
        crash_point("assemble" if what == "the output" else "shard_written")
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except (OSError, pa.ArrowException) as e:
        _unlink_quietly(tmp)
        raise JobError(f"cannot write {what} {path}: {_reason(e)}") from e


def _fsync_dir(path: Path) -> None:
    """Makes the rename itself durable (POSIX; other systems cannot open a directory)."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _probe(directory: Path) -> None:
    with tempfile.TemporaryFile(dir=directory):
        pass


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        logger.warning("could not remove the temp file %s", path)


def _reason(e: BaseException) -> str:
    if getattr(e, "errno", None) == errno.ENOSPC or "No space left" in str(e):
        return "the disk is full (committed shards are kept; free space and rerun to resume)"
    return getattr(e, "strerror", None) or str(e)
