"""Per-row results: the rows a piece of work writes, committed to the run directory in shards as they
finish, and what running a work unit cost."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from batchllm.engine.loop import EngineStats
from batchllm.io.writer import RunDir, result_table
from batchllm.job.interrupt import Interrupted
from batchllm.job.windows import Window


@dataclass(frozen=True, eq=False)
class RowBlock:
    """Rows as the output knows them: where each sits in the input, its id and kept columns."""

    row_index: np.ndarray  # int64 [rows]: input row index
    ids: pa.Array  # [rows]
    keep: pa.Table | None  # [rows] kept input columns
    prompt_tokens: np.ndarray  # int32 [rows]: 0 where the row could not be tokenized
    errors: list[str | None]  # [rows]: the row's error, None for a row to generate

    @classmethod
    def of_window(cls, window: Window, rows: np.ndarray) -> RowBlock:
        """Window-local ``rows`` (int64) of ``window``."""
        take = pa.array(rows, type=pa.int64())
        lengths = [0 if window.token_ids[i] is None else len(window.token_ids[i]) for i in rows.tolist()]
        return cls(
            row_index=rows.astype(np.int64) + window.start,
            ids=window.ids.take(take),
            keep=None if window.keep is None else window.keep.take(take),
            prompt_tokens=np.asarray(lengths, dtype=np.int32),
            errors=[window.errors[i] for i in rows.tolist()],
        )

    def __len__(self) -> int:
        return len(self.row_index)

    def take(self, rows: np.ndarray) -> RowBlock:
        take = pa.array(rows, type=pa.int64())
        return RowBlock(
            self.row_index[rows],
            self.ids.take(take),
            None if self.keep is None else self.keep.take(take),
            self.prompt_tokens[rows],
            [self.errors[i] for i in rows.tolist()],
        )


def error_table(block: RowBlock) -> pa.Table:
    """The shard of rows that failed before generation: no output, their error."""
    n = len(block)
    zeros = np.zeros(n, dtype=np.int32)
    return result_table(
        block.row_index, block.ids, block.keep, [None] * n, block.prompt_tokens, zeros, zeros,
        ["error"] * n, block.errors,
    )  # fmt: skip


@dataclass(frozen=True)
class UnitStats:
    """What one work unit did on one worker."""

    unit_id: str
    worker: str
    rows: int  # rows committed, duplicates included
    prompt_tokens: int
    cached_tokens: int
    output_tokens: int
    engine: EngineStats
    preemptions: int
    peak_kv_blocks: int
    kv_blocks: int  # the worker's KV pool size
    seconds: float  # wall time of the unit on its worker


class UnitResults:
    """Finished rows of one unit, committed as a shard every ``every_rows`` rows or ``every_seconds``."""

    def __init__(
        self,
        rows: RowBlock,
        run_dir: RunDir,
        every_rows: int,
        every_seconds: float,
        on_commit: Callable[[int, int], None],
        may_commit: Callable[[], bool] = lambda: True,
    ) -> None:
        n = len(rows)
        self.rows = rows
        self.run_dir = run_dir
        self.output: list[str | None] = [None] * n
        self.output_tokens = np.zeros(n, dtype=np.int32)
        self.cached_tokens = np.zeros(n, dtype=np.int32)
        self.finish_reason: list[str] = ["error"] * n
        self._pending: list[int] = []
        self._every_rows = every_rows
        self._every_s = every_seconds
        self._on_commit = on_commit
        self._may_commit = may_commit
        self._last_commit = time.monotonic()

    def finish(self, row: int, text: str, output_tokens: int, cached: int, reason: str) -> None:
        self.output[row] = text
        self.output_tokens[row] = output_tokens
        self.cached_tokens[row] = cached
        self.finish_reason[row] = reason
        self._pending.append(row)

    def maybe_commit(self) -> None:
        """Commit if a checkpoint is due; called between rows, so a row and its duplicates commit together."""
        if len(self._pending) >= self._every_rows or time.monotonic() - self._last_commit >= self._every_s:
            self.commit()

    def commit(self) -> None:
        """Write the finished rows not yet committed as one shard (atomic). Raises Interrupted, writing
        nothing, once ``may_commit()`` says another attempt owns the run directory."""
        self._last_commit = time.monotonic()
        if not self._pending:
            return
        if not self._may_commit():
            self._pending = []
            raise Interrupted("another attempt owns the run directory")
        rows = np.asarray(sorted(self._pending), dtype=np.int64)
        block = self.rows.take(rows)
        table = result_table(
            row_index=block.row_index,
            ids=block.ids,
            keep=block.keep,
            output=[self.output[i] for i in rows],
            prompt_tokens=block.prompt_tokens,
            output_tokens=self.output_tokens[rows],
            cached_tokens=self.cached_tokens[rows],
            finish_reason=[self.finish_reason[i] for i in rows],
            error=[None] * len(rows),
        )
        self.run_dir.commit(table)
        self._pending = []
        self._on_commit(len(rows), int(self.output_tokens[rows].sum()))
