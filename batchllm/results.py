"""Per-row results of one window, committed to the run directory in shards as rows finish."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import pyarrow as pa

from batchllm.io.writer import RunDir, result_table
from batchllm.workload import Window


class WindowResults:
    def __init__(
        self,
        window: Window,
        run_dir: RunDir,
        every_rows: int,
        every_seconds: float,
        on_commit: Callable[[int, int], None],
    ) -> None:
        n = len(window)
        self.window = window
        self.run_dir = run_dir
        self.output: list[str | None] = [None] * n
        self.prompt_tokens = np.array([0 if t is None else len(t) for t in window.token_ids], dtype=np.int32)
        self.output_tokens = np.zeros(n, dtype=np.int32)
        self.cached_tokens = np.zeros(n, dtype=np.int32)
        self.finish_reason: list[str] = ["error"] * n
        self._pending: list[int] = window.failed().tolist()  # error rows are final at once
        self._every_rows = every_rows
        self._every_s = every_seconds
        self._on_commit = on_commit
        self._last_commit = time.monotonic()

    def finish(self, row: int, text: str, output_tokens: int, cached: int, reason: str) -> None:
        self.output[row] = text
        self.output_tokens[row] = output_tokens
        self.cached_tokens[row] = cached
        self.finish_reason[row] = reason
        self._pending.append(row)
        if len(self._pending) >= self._every_rows or time.monotonic() - self._last_commit >= self._every_s:
            self.commit()

    def commit(self) -> None:
        """Write the finished rows not yet committed as one shard (atomic)."""
        self._last_commit = time.monotonic()
        if not self._pending:
            return
        rows = np.asarray(sorted(self._pending), dtype=np.int64)
        take = pa.array(rows)
        w = self.window
        table = result_table(
            row_index=rows + w.start,
            ids=w.ids.take(take),
            keep=None if w.keep is None else w.keep.take(take),
            output=[self.output[i] for i in rows],
            prompt_tokens=self.prompt_tokens[rows],
            output_tokens=self.output_tokens[rows],
            cached_tokens=self.cached_tokens[rows],
            finish_reason=[self.finish_reason[i] for i in rows],
            error=[w.errors[i] for i in rows],
        )
        self.run_dir.commit(table)
        self._pending = []
        self._on_commit(len(rows), int(self.output_tokens[rows].sum()))
