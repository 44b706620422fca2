"""Progress while generating: a rich bar on a terminal, periodic one-line log records otherwise."""

from __future__ import annotations

import logging
import sys
import time

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from batchllm.job.counters import RowCounts

log = logging.getLogger("batchllm")


class RowProgress:
    def __init__(self, total_rows: int, enabled: bool = True, log_every_s: float = 30.0) -> None:
        self.total = total_rows
        self.counts = RowCounts()
        self.start = time.perf_counter()
        self.enabled = enabled
        self._log_every = log_every_s
        self._last_log = self.start
        self._bar: Progress | None = None
        if enabled and sys.stderr.isatty():
            self._bar = Progress(
                TextColumn("[bold]generating"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeRemainingColumn(),
                transient=True,
            )
            self._task = self._bar.add_task("rows", total=total_rows, rate="")
            self._bar.start()

    def advance(self, counts: RowCounts) -> None:
        self.counts.add(counts)
        c, elapsed = self.counts, max(time.perf_counter() - self.start, 1e-9)
        if self._bar is not None:
            rate = f"in {c.prompt_tokens / elapsed:,.0f} tok/s  out {c.output_tokens / elapsed:,.0f} tok/s"
            self._bar.update(self._task, completed=c.rows, rate=rate)
        elif self.enabled and time.perf_counter() - self._last_log >= self._log_every:
            self._last_log = time.perf_counter()
            log.info(self.line())

    def line(self) -> str:
        c, elapsed = self.counts, max(time.perf_counter() - self.start, 1e-9)
        rate = c.rows / elapsed
        eta = (self.total - c.rows) / rate if rate else float("nan")
        return (
            f"rows {c.rows}/{self.total} ({100 * c.rows / max(self.total, 1):.1f}%)"
            f"  in {c.prompt_tokens / elapsed:,.0f} tok/s  out {c.output_tokens / elapsed:,.0f} tok/s"
            f"  prefix reuse {self.reuse():.0%}  eta {eta:,.0f}s"
        )

    def reuse(self) -> float:
        """Share of the finished rows' prompt tokens that were not computed for that row."""
        c = self.counts
        return c.cached_tokens / c.prompt_tokens if c.prompt_tokens else 0.0

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
