"""Progress of a run on several workers: the row bar or log line, plus each worker's throughput."""

from __future__ import annotations

import time

from batchllm.job.progress import RowProgress
from batchllm.job.results import UnitStats


class WorkerProgress(RowProgress):
    """Advances by whole units (workers report when a unit ends) and shows output tokens/s per worker,
    per second of the worker's own unit time, so a slow worker stands out."""

    def __init__(self, total_rows: int, enabled: bool = True, log_every_s: float = 30.0) -> None:
        super().__init__(total_rows, enabled, log_every_s)
        self.per_worker: dict[str, tuple[int, int, float]] = {}  # name -> rows, output tokens, seconds

    def unit_done(self, stats: UnitStats) -> None:
        rows, out, seconds = self.per_worker.get(stats.worker, (0, 0, 0.0))
        self.per_worker[stats.worker] = (
            rows + stats.rows,
            out + stats.output_tokens,
            seconds + stats.seconds,
        )
        self.advance(stats.rows, stats.prompt_tokens, stats.output_tokens, stats.cached_tokens)

    def advance(self, rows: int, prompt_tokens: int, output_tokens: int, cached_tokens: int = 0) -> None:
        super().advance(rows, prompt_tokens, output_tokens, cached_tokens)
        if self._bar is not None and self.per_worker:
            elapsed = max(time.perf_counter() - self.start, 1e-9)
            rate = f"out {self.output_tokens / elapsed:,.0f} tok/s  {self.workers_text()}"
            self._bar.update(self._task, rate=rate)

    def workers_text(self) -> str:
        return "  ".join(
            f"{name} {out / max(seconds, 1e-9):,.0f} tok/s"
            for name, (_, out, seconds) in self.per_worker.items()
        )

    def line(self) -> str:
        return f"{super().line()}  workers: {self.workers_text()}" if self.per_worker else super().line()
