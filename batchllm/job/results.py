"""Finished rows of one work unit, committed to the run directory in shards as they finish."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import numpy as np
import pyarrow as pa

from batchllm.errors import Interrupted
from batchllm.io.writer import RunDir
from batchllm.job.counters import RowCounts
from batchllm.job.rows import RowBlock
from batchllm.job.scoring import append_columns


class UnitResults:
    """Commits a shard every ``every_rows`` finished rows or ``every_seconds``, and on ``commit()``."""

    def __init__(
        self,
        rows: RowBlock,
        run_dir: RunDir,
        every_rows: int,
        every_seconds: float,
        on_commit: Callable[[RowCounts], None],
        may_commit: Callable[[], bool] = lambda: True,
        extra_columns: Callable[[np.ndarray], dict[str, pa.Array]] | None = None,
        extra_schema: pa.Schema | None = None,
    ) -> None:
        n = len(rows)
        self.rows = rows
        self.run_dir = run_dir
        self.output: list[str | None] = [None] * n
        self.output_tokens = np.zeros(n, dtype=np.int32)
        self.cached_tokens = np.zeros(n, dtype=np.int32)
        self.finish_reason: list[str] = ["error"] * n
        self.errors: list[str | None] = list(rows.errors)  # a finished row may add one (structured output)
        self.extra_schema = extra_schema  # columns a scoring job adds (job.scoring)
        self.extra: list[dict | None] = [None] * n if extra_schema is not None else []
        self.committed = RowCounts()
        self._pending: list[int] = []
        self._every_rows = every_rows
        self._every_s = every_seconds
        self._on_commit = on_commit
        self._may_commit = may_commit
        self._last_commit = time.monotonic()
        self._extra_columns = extra_columns  # rows -> more columns for their shard (--n, --logprobs)

    def finish(
        self, row: int, text: str, output_tokens: int, cached: int, reason: str, error: str | None = None
    ) -> RowCounts:
        """Record a finished row (``error``: what is wrong with its output, if anything); its counts."""
        self.errors[row] = error
        self.output[row] = text
        self.output_tokens[row] = output_tokens
        self.cached_tokens[row] = cached
        self.finish_reason[row] = reason
        self._pending.append(row)
        prompt = int(self.rows.prompt_tokens[row])
        return RowCounts(rows=1, prompt_tokens=prompt, cached_tokens=cached, output_tokens=output_tokens)

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
        block = dataclasses.replace(self.rows.take(rows), errors=[self.errors[i] for i in rows])
        table = block.table(
            [self.output[i] for i in rows],
            self.output_tokens[rows],
            self.cached_tokens[rows],
            [self.finish_reason[i] for i in rows],
        )
        for name, column in (self._extra_columns(rows) if self._extra_columns else {}).items():
            table = table.append_column(name, column)
        if self.extra_schema is not None:
            table = append_columns(table, self.extra_schema, [self.extra[i] for i in rows])
        self.run_dir.commit(table)
        self._pending = []
        counts = RowCounts.of_table(table)
        self.committed.add(counts)
        self._on_commit(counts)
