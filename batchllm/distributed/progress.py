"""Progress of a run on several workers: the row bar or log line, plus each worker's throughput."""

from __future__ import annotations

import time

from batchllm.job.counters import RowCounts
from batchllm.job.progress import RowProgress
from batchllm.job.unit_worker import UnitStats


class WorkerProgress(RowProgress):
    """Advances by whole units (workers report when a unit ends) and shows output tokens/s per worker,
    per second of the worker's own unit time, so a slow worker stands out."""

    def __init__(self, total_rows: int, enabled: bool = True, log_every_s: float = 30.0) -> None:
        super().__init__(total_rows, enabled, log_every_s)
        self.per_worker: dict[str, tuple[int, int, float]] = {}  # name -> rows, output tokens, seconds

    def unit_done(self, stats: UnitStats) -> None:
        rows, out, seconds = self.per_worker.get(stats.worker, (0, 0, 0.0))
        c = stats.counts
        self.per_worker[stats.worker] = (rows + c.rows, out + c.output_tokens, seconds + stats.seconds)
        self.advance(c)

    def advance(self, counts: RowCounts) -> None:
        super().advance(counts)
        if self._bar is not None and self.per_worker:
            elapsed = max(time.perf_counter() - self.start, 1e-9)
            rate = f"out {self.counts.output_tokens / elapsed:,.0f} tok/s  {self.workers_text()}"
            self._bar.update(self._task, rate=rate)

    def workers_text(self) -> str:
        return "  ".join(
            f"{name} {out / max(seconds, 1e-9):,.0f} tok/s"
            for name, (_, out, seconds) in self.per_worker.items()
        )

    def line(self) -> str:
        return f"{super().line()}  workers: {self.workers_text()}" if self.per_worker else super().line()
