"""Finished rows -> shards committed durably in a run directory -> one final Parquet, written atomically.

    run_dir/
      shards/shard-000000-<checksum>.parquet   row_index + the output schema, one file per commit
      shards/shard-1f2e3d4c-000000-<checksum>.parquet   the same, from a writer with a tag (a Ray worker)
      shards/.shard-000001-<checksum>.parquet.<pid>.tmp   a commit cut short by a crash: removed on open
      quarantine/shard-...parquet   a shard whose bytes no longer match its checksum: never read again

The writer sees only arrays; it knows nothing of the engine.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from batchllm.errors import JobError
from batchllm.io.faults import crash_point
from batchllm.io.openai_output import write_batch_output
from batchllm.io.output_file import OutputPart, is_jsonl, write_jsonl
from batchllm.io.shards import ShardFile, check_complete, encode, list_shards

logger = logging.getLogger(__name__)

OUTPUT_COLUMNS = ("id", "output", "prompt_tokens", "output_tokens", "cached_tokens", "finish_reason", "error")
FINISH_REASONS = frozenset({"stop", "length", "error", "scored"})  # scored: --choices, --score-column


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

    Without ``writer`` this instance owns the directory (the run holding its lock): it removes temp
    files a crash left, numbers its shards after the untagged ones there, and moves a shard that fails
    its checksum to ``quarantine/``. Concurrent writers (Ray workers) each pass a unique 8-hex-digit
    ``writer`` tag, which goes into their shard names, and leave temp files alone (another writer may be
    filling one). ``read_only`` (reports) changes nothing on disk."""

    def __init__(self, path: Path, writer: str | None = None, read_only: bool = False) -> None:
        if writer is not None and not re.fullmatch(r"[0-9a-f]{8}", writer):
            raise ValueError(f"a writer tag is 8 lowercase hex digits, got {writer!r}")
        self.path = Path(path)
        self.shards = self.path / "shards"
        self.quarantine = self.path / "quarantine"
        self.writer = writer
        self.owner = writer is None and not read_only
        self._lock = threading.Lock()  # commits may come from a writer thread; shard numbers stay unique
        if self.owner:
            self._remove_temp_files()
        mine = (s.number for s in list_shards(self.shards) if s.writer == writer)
        self._next = max(mine, default=-1) + 1

    def ensure_writable(self, output: Path) -> None:
        """Create the run directory and check it and the output's directory accept files; fail fast."""
        check_output(output)
        try:
            self.shards.mkdir(parents=True, exist_ok=True)
            _probe(self.shards)
        except OSError as e:
            raise JobError(f"cannot write to the run directory {self.path}: {_reason(e)}") from e

    def has_results(self) -> bool:
        """Whether any shard file (verified or not, of any naming) is in the run directory."""
        return self.shards.is_dir() and any(self.shards.glob("shard-*.parquet"))

    def commit(self, table: pa.Table) -> Path:
        """Write one shard atomically, its checksum in its name: it is whole or absent after a crash."""
        if "row_index" not in table.column_names:
            raise ValueError("a shard needs a row_index column; build it with result_table()")
        with self._lock:
            number, self._next = self._next, self._next + 1
        try:
            data = encode(table)
        except (OSError, pa.ArrowException) as e:
            raise JobError(f"cannot write a result shard in {self.shards}: {_reason(e)}") from e
        path = ShardFile.of(self.shards, number, self.writer, data).path
        _write_atomic(lambda f: f.write(data), path, what="a result shard")
        return path

    def committed_row_indices(self) -> np.ndarray:
        """int64 [rows committed so far], in shard order, from verified shards only."""
        parts = [t.column("row_index").to_numpy() for t in self.verified_tables(["row_index"])]
        return np.concatenate(parts).astype(np.int64, copy=False) if parts else np.empty(0, dtype=np.int64)

    def verified_tables(self, columns: list[str] | None = None) -> list[pa.Table]:
        """The table of every shard that matches its checksum; the others are named in a warning (and
        moved to ``quarantine/`` by the owner) so their rows are generated again."""
        tables = []
        for shard in list_shards(self.shards):
            table = self._read(shard, columns)
            if table is not None:
                tables.append(table)
        return tables

    def assemble(  # noqa: PLR0913
        self, output: Path, num_rows: int, parts: Sequence[OutputPart] = (), batch_model: str | None = None,
        finish: Callable[[pa.Table], pa.Table] | None = None,
    ) -> None:  # fmt: skip
        """Write every committed row, in input order, to `output` atomically (Parquet, or JSON Lines for
        a ``.jsonl`` name), or each of ``parts`` to its own file. An empty input needs one empty shard
        (a zero-row result_table) so the output's schema is known. With ``batch_model``, each part is
        written in the OpenAI batch output shape (``io.openai_output``). ``finish`` reshapes each
        ordered part last (``--explode-samples``)."""
        output = Path(output)
        committed = list_shards(self.shards)
        shards = self.verified_tables()
        if len(shards) < len(committed):
            raise JobError(
                f"a committed shard in {self.shards} was damaged after it was written (see the warning); "
                "run the same command again to generate its rows"
            )
        if not shards:
            raise RuntimeError(f"no committed shards in {self.shards}; nothing to assemble into {output}")
        try:
            table = pa.concat_tables(shards)
        except pa.ArrowInvalid as e:
            raise RuntimeError(f"shards in {self.shards} do not share one schema: {e}") from e
        index = table.column("row_index").to_numpy()
        check_complete(index, num_rows, output)
        table = table.take(np.argsort(index, kind="stable")).drop_columns(["row_index"])
        for part in parts or [OutputPart(output, 0, num_rows)]:
            piece = table.slice(part.start, part.stop - part.start)
            if finish is not None:
                piece = finish(piece)
            if batch_model is not None:
                write_batch_output(piece, part.path, batch_model, _write_atomic)
                continue
            write = lambda f, t=piece, p=part.path: _write_output(t, f, p)  # noqa: E731
            _write_atomic(write, part.path, what="the output")
            logger.info("wrote %d rows to %s", piece.num_rows, part.path)

    def remove_output_leftovers(self, output: Path) -> None:
        """Remove the temp files a killed assembly left beside ``output`` (of processes now gone)."""
        output = Path(output)
        for path in output.parent.glob(f".{output.name}.*.tmp"):
            pid = path.name[len(output.name) + 2 : -len(".tmp")]
            if pid.isdigit() and not _pid_alive(int(pid)):
                _unlink_quietly(path)

    def _remove_temp_files(self) -> None:
        if not self.shards.is_dir():
            return
        for path in self.shards.glob(".*.tmp"):
            try:
                path.unlink()
            except OSError as e:  # harmless: temp files are never read
                logger.warning("could not remove the leftover temp file %s: %s", path, e)

    def _read(self, shard: ShardFile, columns: list[str] | None) -> pa.Table | None:
        try:
            table = shard.read_verified(columns)
        except FileNotFoundError:
            return None  # moved aside meanwhile by the run that owns the directory
        except (OSError, pa.ArrowException) as e:
            raise JobError(
                f"cannot read the committed shard {shard.path} ({e}); delete it to redo its rows"
            ) from e
        if table is None:
            self._set_aside(shard)
        return table

    def _set_aside(self, shard: ShardFile) -> None:
        if not self.owner:
            logger.warning("shard %s fails its checksum; its rows are not counted", shard.path)
            return
        self.quarantine.mkdir(exist_ok=True)
        os.replace(shard.path, self.quarantine / shard.path.name)
        logger.warning(
            "shard %s fails its checksum (damaged on disk): moved to %s; its rows are generated again",
            shard.path.name, self.quarantine,
        )  # fmt: skip


def check_output(output: Path) -> None:
    """The output's directory accepts files, and the output is not a directory; fail fast."""
    output = Path(output)
    if output.is_dir():
        raise JobError(f"output {output} is a directory; give a file path such as {output / 'out.parquet'}")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        _probe(output.parent)
    except OSError as e:
        raise JobError(f"cannot write the output {output}: {_reason(e)}") from e


def _write_atomic(write: Callable[[BinaryIO], None], path: Path, what: str) -> None:
    """Temp file in the same directory, fsync, rename over `path`, fsync the directory."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        crash_point("assemble" if what == "the output" else "shard_written")
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except (OSError, pa.ArrowException) as e:
        _unlink_quietly(tmp)
        raise JobError(f"cannot write {what} {path}: {_reason(e)}") from e


def _write_output(table: pa.Table, f: BinaryIO, path: Path) -> None:
    write_jsonl(table, f) if is_jsonl(path) else pq.write_table(table, f)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # someone else's process
    return True


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
