"""Who runs a window's work units: the engine in this process, or Ray workers (``distributed/``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from batchllm.job.progress import RowProgress
from batchllm.job.unit_worker import UnitCalls, UnitStats, UnitWorker
from batchllm.job.units import WorkUnit


class Executor(Protocol):
    """Runs a window's work units: ``LocalExecutor`` in this process, ``RayExecutor`` on Ray workers."""

    workers: int
    retries: int  # units run again because their worker died
    device: str
    dtype: str

    def run(self, units: list[WorkUnit], calls: UnitCalls, on_done: Callable[[UnitStats], None]) -> None: ...

    def close(self) -> None: ...


class LocalExecutor:
    """Units one after another on an engine in this process: the ``--workers 1`` run."""

    workers = 1
    retries = 0

    def __init__(self, worker: UnitWorker, progress: RowProgress) -> None:
        self.worker = worker
        self.progress = progress
        self.device = worker.host.device_name
        self.dtype = worker.host.dtype_name

    def run(self, units: list[WorkUnit], calls: UnitCalls, on_done: Callable[[UnitStats], None]) -> None:
        calls = UnitCalls(calls.should_stop, self.progress.advance, calls.on_commit)
        for unit in units:
            on_done(self.worker.run(unit, calls))

    def close(self) -> None:
        pass
