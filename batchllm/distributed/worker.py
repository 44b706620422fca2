"""The body of a Ray actor: one ``UnitWorker`` (its model loaded once); units run one at a time.

The driver turns ``EngineWorker`` into an actor; this module does not import ray.
"""

from __future__ import annotations

import os
import secrets
import threading

import torch

from batchllm.config import JobSpec
from batchllm.errors import Interrupted
from batchllm.io.writer import RunDir
from batchllm.job.fence import Fence
from batchllm.job.unit_worker import UnitCalls, UnitStats, UnitWorker
from batchllm.job.units import WorkUnit


class EngineWorker:
    def __init__(self, job: JobSpec, name: str, threads: int | None, owner: str) -> None:
        if threads:
            torch.set_num_threads(threads)
        self._fence = Fence(job.run_dir, owner)
        # A writer tag of its own: shard names never collide with other workers or attempts.
        run_dir = RunDir(job.run_dir, writer=secrets.token_hex(4))
        self.worker = UnitWorker.open(job, run_dir, name)
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def ready(self) -> tuple[str, str]:
        """(device, dtype), once the model is loaded."""
        return self.worker.host.device_name, self.worker.host.dtype_name

    def pid(self) -> int:
        """This worker's process, recorded by the driver so that it never outlives a killed driver."""
        return os.getpid()

    def run(self, unit: WorkUnit, keep: frozenset[int] = frozenset(), kv_blocks: int = 0) -> UnitStats:
        """Run ``unit``, keeping the prefixes in ``keep`` for later units (see ``UnitWorker.run``)."""
        with self._lock:
            if self._stop.is_set():
                raise Interrupted
            fence = self._fence
            stop = UnitCalls(lambda: self._stop.is_set() or fence.lost(), may_commit=fence.holds)
            return self.worker.run(unit, stop, keep, kv_blocks)

    def stop(self) -> None:
        """Finish the current step, commit, and refuse further units."""
        self._stop.set()
