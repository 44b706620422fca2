"""The driver side of a Ray run: engine workers (actors), units handed out prefix-affine, faults.

``job.assignment`` decides which worker runs which unit: each worker a contiguous run of the plan's
depth-first order, keeping the prefixes its later units (or units it may steal) need, and stealing
only when its own queue is empty. A worker runs one unit at a time (``IN_FLIGHT``) and gets the next
the moment it reports, so every unit not yet running can still go to whichever worker idles first. A
worker that dies has its queue and the rest of its unit (less the rows it committed) handed to the
others; when every worker has died a fresh set starts, at most ``MAX_RESTARTS`` times. Workers write
their own shards, so the run directory must be shared storage on a multi-node cluster.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from batchllm.config import JobSpec
from batchllm.distributed.progress import WorkerProgress
from batchllm.distributed.worker import EngineWorker
from batchllm.errors import Interrupted, JobError
from batchllm.io.faults import CRASH_ENV, worker_crash_spec
from batchllm.io.metrics import MetricsLog
from batchllm.io.writer import RunDir
from batchllm.job.assignment import Assignment
from batchllm.job.leftovers import forget_processes, record_processes
from batchllm.job.unit_worker import UnitCalls, UnitStats
from batchllm.job.units import WorkUnit, largest_kv_blocks

log = logging.getLogger("batchllm")

IN_FLIGHT = 1  # units sent to a worker at once: one queued in an actor could not be stolen
MAX_RESTARTS = 2  # fresh sets of workers after all have died
MAX_UNIT_ATTEMPTS = 4  # a unit that kills every worker it meets fails the job
START_TIMEOUT_S = 900.0  # workers waiting for resources the cluster lacks
WAIT_S = 0.2  # how often the driver looks at the stop request


def import_ray():
    try:
        import ray
    except ImportError as exc:
        raise JobError('--workers > 1 and --ray-address need Ray: pip install "batchllm[ray]"') from exc
    return ray


@dataclass
class _Worker:
    name: str
    actor: object
    inflight: int = 0
    alive: bool = True


@dataclass(frozen=True)
class _Shape:
    count: int
    gpus: int  # per worker: 1 on GPUs, 0 on CPUs
    threads: int | None  # torch threads per CPU worker


class RayExecutor:
    def __init__(
        self, job: JobSpec, run_dir: RunDir, metrics: MetricsLog, progress: WorkerProgress, owner: str
    ) -> None:
        self.ray = import_ray()
        self.job, self.run_dir, self.metrics, self.progress = job, run_dir, metrics, progress
        self.owner = owner  # this attempt's claim on the run directory (see fence.py)
        self.retries = 0
        self._restarts = 0
        self._names = 0
        self._last_death = ""
        self._pool: list[_Worker] = []
        self._pids: list[int] = []  # the workers' processes, for the record of what this driver started
        self._started_ray = self._init_ray()
        try:
            self.shape = self._shape()
            self.workers = self.shape.count
            self.device, self.dtype = self._start(first=True)
        except BaseException:
            self.close()
            raise
        log.info("%d Ray worker(s) on %s", self.workers, self.device)

    def run(self, units: list[WorkUnit], calls: UnitCalls, on_done: Callable[[UnitStats], None]) -> None:
        ray = self.ray
        assignment = Assignment(units, [w.name for w in self._live()])
        kv_blocks = largest_kv_blocks(units, self.job.engine.block_size, self.job.sampling.max_new_tokens)
        inflight: dict = {}  # ObjectRef -> (worker, unit)
        attempts: Counter[str] = Counter()
        stopping = False
        while assignment or inflight:
            if not stopping and calls.should_stop():
                stopping = True
                assignment = Assignment([], [])
                for w in self._live():
                    w.actor.stop.remote()
            if assignment:
                self._hand_out(assignment, inflight, kv_blocks)
            if not inflight:
                continue
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=WAIT_S)
            for ref in ready:
                worker, unit = inflight.pop(ref)
                worker.inflight -= 1
                stats = self._result(ref, worker, unit, stopping)
                if stats is not None:
                    on_done(stats)
                    self.progress.unit_done(stats)
                    calls.on_commit(stats.counts, 0)  # on_done counted the unit
                elif not stopping and worker.alive is False:
                    self._retry(worker, unit, attempts, assignment)
        if stopping:
            raise Interrupted

    def close(self) -> None:
        for w in self._pool:
            try:
                self.ray.kill(w.actor)
            except Exception:  # already gone
                pass
        self._pool = []
        if self._started_ray and self.ray.is_initialized():
            self.ray.shutdown()
            self._started_ray = False
            forget_processes(self.job.run_dir)  # shut down: nothing left for the next run to end

    def _result(self, ref, worker: _Worker, unit: WorkUnit, stopping: bool) -> UnitStats | None:
        """The unit's stats; None when its worker died (marked) or it stopped on request."""
        exc = self.ray.exceptions
        try:
            return self.ray.get(ref)
        except exc.RayActorError as e:
            if worker.alive:
                self._last_death = _first_line(e)
                log.warning("worker %s died: %s", worker.name, self._last_death)
            worker.alive = False
            return None
        except exc.RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, Interrupted) and stopping:
                return None
            if isinstance(cause, Exception):
                raise cause from None
            raise RuntimeError(f"worker {worker.name} failed on unit {unit.unit_id}: {_first_line(e)}") from e

    def _retry(self, worker: _Worker, unit: WorkUnit, attempts: Counter[str], assignment: Assignment) -> None:
        """Hand a dead worker's unit and queue to the others, less the rows it committed before it died."""
        attempts[unit.unit_id] += 1
        if attempts[unit.unit_id] >= MAX_UNIT_ATTEMPTS:
            raise JobError(
                f"unit {unit.unit_id} ({len(unit)} rows) lost its worker {attempts[unit.unit_id]} times "
                f"({self._last_death}); committed rows are kept: run the same command again to resume"
            )
        rest = unit.without(self.run_dir.committed_row_indices())
        self.retries += 1
        left = 0 if rest is None else len(rest)
        self.metrics.append("retry", unit=unit.unit_id, worker=worker.name, rows_left=left)
        assignment.retire(worker.name)
        if rest is not None:
            assignment.give_back(rest)

    def _hand_out(self, assignment: Assignment, inflight: dict, kv_blocks: int) -> None:
        for dead in (w for w in self._pool if not w.alive):
            assignment.retire(dead.name)
        live = self._live()
        if not live:
            if self._restarts >= MAX_RESTARTS:
                raise JobError(
                    f"all {self.workers} workers died {self._restarts + 1} times (last: {self._last_death}); "
                    "committed rows are kept: run the same command again to resume"
                )
            self._restarts += 1
            log.warning("every worker died; starting %d new ones", self.workers)
            self._start(first=False)
            live = self._pool
        for worker in live:
            handout = assignment.next_for(worker.name) if worker.inflight < IN_FLIGHT else None
            if handout is not None:
                ref = worker.actor.run.remote(handout.unit, handout.keep, kv_blocks)
                inflight[ref] = (worker, handout.unit)
                worker.inflight += 1

    def _live(self) -> list[_Worker]:
        return [w for w in self._pool if w.alive]

    def _init_ray(self) -> bool:
        """Start a local Ray runtime, or join ``ray_address``; False when one is running already."""
        ray = self.ray
        if ray.is_initialized():
            return False
        term = signal.getsignal(signal.SIGTERM)
        kwargs = (
            {"address": self.job.ray_address} if self.job.ray_address else {"num_cpus": self._local_cpus()}
        )
        try:
            ray.init(include_dashboard=False, logging_level=logging.WARNING, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise JobError(f"cannot start or join Ray ({self.job.ray_address or 'local'}): {e}") from e
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, term)  # ray.init replaces it; SIGTERM must stop the run cleanly
        return True

    def _local_cpus(self) -> int:
        return max(os.cpu_count() or 1, self.job.workers or 1)

    def _shape(self) -> _Shape:
        job = self.job
        resources = self.ray.cluster_resources()
        gpus = 0 if job.engine.device == "cpu" else int(resources.get("GPU", 0))
        if job.engine.device == "cuda" and not gpus:
            raise JobError("--device cuda was asked for but the Ray cluster has no GPUs")
        if gpus:
            if job.workers and job.workers > gpus:
                log.warning("--workers %d but only %d GPUs: running %d workers", job.workers, gpus, gpus)
            return _Shape(min(job.workers or gpus, gpus), 1, None)
        if job.workers is None:
            raise JobError(
                f"the Ray cluster at {job.ray_address} has no GPUs; give --workers N for N CPU workers"
            )
        cpus = int(resources.get("CPU", 1))
        largest = max((int(n["Resources"].get("CPU", 1)) for n in self.ray.nodes() if n["Alive"]), default=1)
        # Threads split the cores between the workers; a worker must fit on one node.
        return _Shape(job.workers, 0, max(1, min(cpus // job.workers, largest)))

    def _start(self, first: bool) -> tuple[str, str]:
        """A fresh set of workers, in ``self._pool`` (so close() ends them); their (device, dtype)."""
        ray, shape = self.ray, self.shape
        remote = ray.remote(EngineWorker)
        self._pool = pool = []
        for i in range(shape.count):
            name, self._names = f"w{self._names}", self._names + 1
            env = {CRASH_ENV: worker_crash_spec(i) if first else ""}
            actor = remote.options(
                num_cpus=shape.threads or 1,
                num_gpus=shape.gpus,
                max_concurrency=IN_FLIGHT + 1,  # run() takes a lock, so stop() can still get in
                runtime_env={"env_vars": env},
            ).remote(self.job, name, shape.threads, self.owner)
            pool.append(_Worker(name, actor))
        try:
            placed = ray.get([w.actor.ready.remote() for w in pool], timeout=START_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError as e:
            raise JobError(
                f"{shape.count} workers did not start within {START_TIMEOUT_S:.0f} s; does the cluster have "
                f"{shape.count * (shape.gpus or shape.threads or 1)} free {'GPUs' if shape.gpus else 'CPUs'}?"
            ) from e
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as e:
            raise JobError(f"a worker could not start: {_start_error(e)}") from e
        self._record(ray.get([w.actor.pid.remote() for w in pool]))
        return placed[0]

    def _record(self, worker_pids: list[int]) -> None:
        """The pids of the local Ray runtime and its workers, which the next run ends if this driver is
        killed before it shuts Ray down (see job/leftovers.py)."""
        self._pids += worker_pids
        if self._started_ray:
            record_processes(self.job.run_dir, _runtime_pids(self.ray) + self._pids)


def _runtime_pids(ray) -> list[int]:
    """The processes of the Ray runtime this driver started (GCS, raylet, agents); [] if unknown."""
    try:
        node = ray._private.worker._global_node
        return [info.process.pid for infos in node.all_processes.values() for info in infos if info.process]
    except Exception:  # a private API: another Ray version may lack it; the workers are still recorded
        return []


def _start_error(e: BaseException) -> str:
    """The exception line of a worker's failed start, not Ray's preamble; a JobError's message alone."""
    lines = [line.strip() for line in str(getattr(e, "error_msg", "") or e).splitlines() if line.strip()]
    last = lines[-1] if lines else type(e).__name__
    return last.removeprefix(f"{JobError.__module__}.{JobError.__name__}: ")


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__
