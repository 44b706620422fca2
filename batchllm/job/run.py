"""``batchllm run``: input rows -> prompts -> plan -> work units -> engine(s) -> committed shards -> output.

Every run lives in a run directory (manifest, committed shards, metrics). Re-running the same command
resumes it: committed rows are skipped, the rest generated, and the output assembled in input order.
The driver reads, tokenizes and plans each window once; the window's plan becomes work units
(``job.units``) that run on the engine in this process, or on Ray workers with ``workers > 1`` or a
``ray_address`` (``distributed/``, imported only then). Both run units with the same ``UnitWorker``.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from batchllm.config import JobSpec
from batchllm.engine.loop import EngineStats
from batchllm.engine.placement import resolved_settings
from batchllm.errors import Interrupted
from batchllm.io.dataset import output_parts
from batchllm.io.faults import crash_point
from batchllm.io.manifest import check_or_write, input_fingerprint, output_settings
from batchllm.io.metrics import MetricsLog
from batchllm.io.run_lock import RunLock
from batchllm.io.run_marker import check_paths, check_recognised, clear, mark
from batchllm.io.sample_columns import explode_samples, pad_columns
from batchllm.io.writer import RunDir, check_output
from batchllm.job.counters import RowCounts
from batchllm.job.executor import Executor, LocalExecutor
from batchllm.job.fence import claim
from batchllm.job.inputs import JobInputs
from batchllm.job.interrupt import StopRequest
from batchllm.job.leftovers import end_leftovers
from batchllm.job.progress import RowProgress
from batchllm.job.read_ahead import ReadAhead
from batchllm.job.report import GROUP_KEYS, GUIDE_KEYS
from batchllm.job.rows import RowBlock
from batchllm.job.scoring import append_columns, score_schema
from batchllm.job.unit_worker import UnitCalls, UnitStats, UnitWorker
from batchllm.job.units import split_plan
from batchllm.job.window_plan import plan_window
from batchllm.job.windows import Window
from batchllm.model.loader import load_model
from batchllm.prefix_tree.plan import PlanStats

# Per worker: prefix copies are prefill of a prefix that another unit of the window prefilled already.
WORKER_KEYS = ("rows", "output_tokens", "seconds", "units", "prefill_tokens", "prefix_copy_tokens")


@dataclass
class RunOutcome:
    """What one attempt did."""

    rows: int = 0  # rows of the input
    rows_skipped: int = 0  # committed by an earlier attempt
    counts: RowCounts = field(default_factory=RowCounts)  # rows this attempt committed
    plan_stats: list[PlanStats] = field(default_factory=list)  # one per window
    engine: EngineStats = field(default_factory=EngineStats)
    phases: dict[str, float] = field(default_factory=dict)  # seconds per phase of this attempt
    wall_seconds: float = 0.0
    device: str = ""
    dtype: str = ""
    preemptions: int = 0
    peak_kv_blocks: int = 0
    kv_blocks: int = 0
    resumed: bool = False
    workers: int = 1
    worker_retries: int = 0  # units run again because their worker died
    per_worker: dict[str, dict] = field(default_factory=dict)  # name -> WORKER_KEYS

    @property
    def plan(self) -> PlanStats:
        return PlanStats.combine(self.plan_stats)

    def phase(self, name: str, seconds: float) -> None:
        self.phases[name] = self.phases.get(name, 0.0) + seconds


def run(job: JobSpec, fresh: bool = False, stop: StopRequest | None = None) -> RunOutcome:
    """Runs (or resumes) the job. Raises Interrupted, with finished rows committed, once ``stop`` is set."""
    return Job(job, fresh, stop or StopRequest()).run()


class Job:
    def __init__(self, job: JobSpec, fresh: bool, stop: StopRequest) -> None:
        self.t0 = time.perf_counter()
        self.stop, self.job, self.out = stop, job, RunOutcome()
        self.distributed = job.ray_address is not None or (job.workers or 1) > 1
        if self.distributed:  # fail before any work when Ray is missing
            from batchllm.distributed.ray_executor import import_ray

            import_ray()
        self.inputs = JobInputs.open(job)
        self.job = job = self.inputs.job or job  # an OpenAI batch file's requests widen it
        self.source, self.mcfg, self.grammars = self.inputs.source, self.inputs.mcfg, self.inputs.grammars
        self.parts = output_parts(self.source, job.output, job.output_dir)
        self.lock = self._take_run_dir(fresh)  # only once input, model and output are known to be fine
        try:
            self._open(self.inputs.model_path, self.inputs.tokenizer)
        except BaseException:
            self.lock.release()
            raise
        self.out.phase("load", time.perf_counter() - self.t0)

    def _take_run_dir(self, fresh: bool) -> RunLock:
        """Check where the run writes, lock the run directory, end what a killed run left, and with
        ``fresh`` remove the tool's files of an earlier run (nothing else)."""
        job = self.job
        for part in self.parts:
            check_paths(job.input, part.path, job.run_dir)
            check_output(part.path)
        check_recognised(job.run_dir)
        lock = RunLock.acquire(job.run_dir)
        try:
            end_leftovers(job.run_dir)
            if fresh:
                clear(job.run_dir)
            mark(job.run_dir)
        except BaseException:
            lock.release()
            raise
        return lock

    def _open(self, model_path: Path, tokenizer) -> None:
        job = self.job
        self.run_dir = RunDir(job.run_dir)
        self.run_dir.ensure_writable(self.parts[0].path)
        for part in self.parts:
            self.run_dir.remove_output_leftovers(part.path)
        self.metrics = MetricsLog(job.run_dir)
        template = getattr(tokenizer, "chat_template", None)
        settings = output_settings(job, model_path, template, resolved_settings(job.engine))
        self._claim(settings | (self.grammars.fingerprint() if self.grammars else {}))
        self.progress = self._progress()
        try:
            self.executor = self._executor(model_path, tokenizer)
        except BaseException:
            self.progress.close()
            raise

    def _claim(self, settings: dict) -> None:
        """Write (or check) the manifest, own the run directory, and read what is committed."""
        started = time.perf_counter()
        fingerprint, has_results = input_fingerprint(self.source), self.run_dir.has_results()
        self.out.resumed = check_or_write(self.job.run_dir, fingerprint, settings, has_results)
        self.out.phase("read", time.perf_counter() - started)
        self.owner = claim(self.job.run_dir)  # before reading what is committed: see fence.py
        self.done = np.zeros(self.source.num_rows, dtype=bool)
        self.done[self.run_dir.committed_row_indices()] = True

    def _progress(self) -> RowProgress:
        if not self.distributed:
            return RowProgress(self.source.num_rows, enabled=self.job.progress)
        from batchllm.distributed.progress import WorkerProgress

        return WorkerProgress(self.source.num_rows, enabled=self.job.progress)

    def _executor(self, model_path: Path, tokenizer) -> Executor:
        job = self.job
        if not self.distributed:
            cache = self.grammars.cache if self.grammars else None
            worker = UnitWorker.open(
                job, self.run_dir, "local", model_path, self.mcfg, tokenizer, load_model, cache
            )
            return LocalExecutor(worker, self.progress)
        from batchllm.distributed.ray_executor import RayExecutor

        return RayExecutor(job, self.run_dir, self.metrics, self.progress, self.owner)

    def run(self) -> RunOutcome:
        try:
            return self._run()
        finally:
            self.lock.release()

    def _run(self) -> RunOutcome:
        out, job = self.out, self.job
        out.rows, out.rows_skipped = self.source.num_rows, int(self.done.sum())
        out.device, out.dtype, out.workers = self.executor.device, self.executor.dtype, self.executor.workers
        self.metrics.append(
            "attempt",
            rows=out.rows,
            rows_committed=out.rows_skipped,
            resumed=out.resumed,
            workers=out.workers,
        )
        self.progress.advance(RowCounts(rows=out.rows_skipped))
        windows = ReadAhead(self.inputs.windows(job, self.done))
        try:
            for number in itertools.count():
                started = time.perf_counter()
                item = next(windows, None)
                out.phase("read", time.perf_counter() - started)
                if item is None:
                    break
                self._run_window(*item, number)
        except (Interrupted, KeyboardInterrupt):
            self._end("interrupted")
            raise Interrupted from None
        finally:
            windows.close()
            self.executor.close()
            self.progress.close()
        self._write()
        self._end("done")
        return out

    def _run_window(self, window: Window, continuations: list | None, number: int) -> None:
        """``continuations``: what each row scores, in a scoring job."""
        job, out = self.job, self.out
        failed = window.failed()
        if failed.size:
            table = self._failed_table(window.block(failed))
            self.run_dir.commit(table)
            counts = RowCounts.of_table(table)
            self._committed(counts)
            self.progress.advance(counts)
        started = time.perf_counter()
        planned = plan_window(job, window, continuations)
        out.plan_stats.append(planned.plan.stats)
        units = split_plan(planned.plan, planned.planned, self.executor.workers, prefix=f"w{number}u")
        self.prefixes_done: set[int] = set()  # prefix keys some unit of this window prefilled
        out.phase("plan", time.perf_counter() - started)
        calls = UnitCalls(should_stop=lambda: self.stop.requested, on_commit=self._committed)
        started = time.perf_counter()
        try:
            self.executor.run(units, calls, self._unit_done)
        finally:
            if self.distributed:  # prefill and decode happen on the workers, overlapped
                out.phase("generate", time.perf_counter() - started)

    def _unit_done(self, stats: UnitStats) -> None:
        out = self.out
        out.engine.add(stats.engine)
        if not self.distributed:
            out.phase("prompt_steps", stats.engine.prompt_step_seconds)
            out.phase("decode_steps", stats.engine.decode_step_seconds)
        out.preemptions += stats.preemptions
        out.peak_kv_blocks = max(out.peak_kv_blocks, stats.peak_kv_blocks)
        out.kv_blocks = max(out.kv_blocks, stats.kv_blocks)
        mine = out.per_worker.setdefault(stats.worker, dict.fromkeys(WORKER_KEYS, 0))
        copies = sum(tokens for key, tokens in stats.prefixes if key in self.prefixes_done)
        self.prefixes_done.update(key for key, _ in stats.prefixes)
        mine["rows"] += stats.counts.rows
        mine["output_tokens"] += stats.counts.output_tokens
        mine["seconds"] += stats.seconds
        mine["units"] += 1
        mine["prefill_tokens"] += stats.engine.prefill_tokens
        mine["prefix_copy_tokens"] += copies
        self.metrics.append(
            "unit", unit=stats.unit_id, worker=stats.worker, **stats.counts.as_dict(),
            prefill_tokens_computed=stats.engine.prefill_tokens, prefix_copy_tokens=copies,
            seconds=stats.seconds,
        )  # fmt: skip

    def _committed(self, counts: RowCounts, unit_prefill: int = 0) -> None:
        """After each shard (or each finished unit, from Ray workers): one metrics record, so a report
        can follow a run in progress."""
        self.out.counts.add(counts)
        e = self.out.engine
        self.metrics.append(
            "commit", **counts.as_dict(), prefill_tokens_computed=e.prefill_tokens + unit_prefill,
            elapsed=time.perf_counter() - self.t0, kv_blocks_used=e.kv_samples[-1][1] if e.kv_samples else 0,
        )  # fmt: skip
        crash_point("commit")

    def _write(self) -> None:
        started = time.perf_counter()
        if self.out.rows == 0:
            self.run_dir.commit(self._failed_table(RowBlock.empty(self.source)))
        batch_model = self.job.model if getattr(self.source, "batch_output", False) else None
        finish = explode_samples if self.job.explode_samples else None
        self.run_dir.assemble(self.job.output, self.out.rows, self.parts, batch_model, finish)
        self.out.phase("write", time.perf_counter() - started)

    def _failed_table(self, block: RowBlock) -> pa.Table:
        """Error rows, with the (null) columns that samples, logprobs or scoring add to other rows."""
        table = pad_columns(block.error_table(), self.job.sampling)
        return append_columns(table, score_schema(self.job.scoring))

    def _end(self, status: str) -> None:
        out = self.out
        out.wall_seconds = time.perf_counter() - self.t0
        out.worker_retries = self.executor.retries
        e, plan = out.engine, out.plan.to_dict()
        self.metrics.append(
            "end", status=status, wall_seconds=out.wall_seconds, phases=out.phases,
            unique_prompt_tokens=plan["unique_prompt_tokens"], prefill_tokens_computed=e.prefill_tokens,
            preemptions=out.preemptions, peak_kv_blocks=out.peak_kv_blocks, kv_blocks=out.kv_blocks,
            **{k: plan[k] for k in GROUP_KEYS}, kv_samples=e.kv_samples[-2000:], workers=out.per_worker,
            worker_retries=out.worker_retries, scored_tokens=e.scored_tokens,
            **{k: getattr(e, k) for k in GUIDE_KEYS},
        )  # fmt: skip
