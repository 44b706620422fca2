"""``batchllm run``: input rows -> prompts -> plan -> work units -> engine(s) -> committed shards -> output.

Every run lives in a run directory (manifest, committed shards, metrics). Re-running the same command
resumes it: committed rows are skipped, the rest generated, and the output assembled in input order.
The driver reads, tokenizes and plans each window once; the window's plan becomes work units
(``distributed.units``) that run on the engine in this process, or on Ray workers with ``workers > 1``
or a ``ray_address`` (``distributed.ray_executor``). Both run units with the same ``UnitRunner``.
"""

from __future__ import annotations

import itertools
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from batchllm.config import JobSpec
from batchllm.distributed.progress import WorkerProgress
from batchllm.distributed.worker import LocalExecutor, UnitCalls, UnitRunner
from batchllm.engine.loop import EngineStats
from batchllm.io.manifest import check_or_write, input_fingerprint, output_settings
from batchllm.io.metrics import MetricsLog
from batchllm.io.prompts import Prompter
from batchllm.io.reader import open_input
from batchllm.io.writer import RunDir, result_table
from batchllm.job.fence import claim
from batchllm.job.interrupt import Interrupted, StopRequest
from batchllm.job.progress import RowProgress
from batchllm.job.results import RowBlock, UnitStats, error_table
from batchllm.job.units import PlannedRows, WorkUnit, split_plan
from batchllm.job.windows import Window, read_windows, row_keys
from batchllm.model.config import load_model_config, resolve_model_path
from batchllm.model.loader import load_model
from batchllm.model.tokenizer import load_tokenizer
from batchllm.prefix_tree.plan import PlanStats, make_plan
from batchllm.prefix_tree.seqs import TokenSeqs
from batchllm.testing.faults import crash_point

log = logging.getLogger("batchllm")


class Executor(Protocol):
    """Runs a window's work units: ``LocalExecutor`` in this process, ``RayExecutor`` on Ray workers."""

    workers: int
    retries: int  # units run again because their worker died
    device: str
    dtype: str

    def run(self, units: list[WorkUnit], calls: UnitCalls, on_done: Callable[[UnitStats], None]) -> None: ...

    def close(self) -> None: ...


@dataclass
class RunOutcome:
    rows: int = 0  # rows of the input
    rows_skipped: int = 0  # committed by an earlier attempt
    rows_failed: int = 0  # in this attempt
    prompt_tokens: int = 0
    unique_prompt_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    plan_stats: list[PlanStats] = field(default_factory=list)
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
    per_worker: dict[str, dict] = field(default_factory=dict)  # name -> rows, output_tokens, seconds, units

    def phase(self, name: str, seconds: float) -> None:
        self.phases[name] = self.phases.get(name, 0.0) + seconds


def run(job: JobSpec, fresh: bool = False, stop: StopRequest | None = None) -> RunOutcome:
    """Runs (or resumes) the job. Raises Interrupted, with finished rows committed, once ``stop`` is set."""
    return JobRunner(job, fresh, stop or StopRequest()).run()


class JobRunner:
    def __init__(self, job: JobSpec, fresh: bool, stop: StopRequest) -> None:
        self.t0 = time.perf_counter()
        self.stop = stop
        self.job = job
        self.out = RunOutcome()
        self.distributed = job.ray_address is not None or (job.workers or 1) > 1
        if self.distributed:  # fail before any work when Ray is missing
            from batchllm.distributed.ray_executor import import_ray

            import_ray()
        self.source = open_input(job.input, job.format, job.column, job.id_column, job.keep_columns)
        if fresh and job.run_dir.exists():
            shutil.rmtree(job.run_dir)
        self.run_dir = RunDir(job.run_dir)
        self.run_dir.ensure_writable(job.output)
        self.metrics = MetricsLog(job.run_dir)
        model_path = resolve_model_path(job.model)
        self.mcfg = load_model_config(model_path)
        tokenizer = load_tokenizer(model_path)
        self.prompter = Prompter(tokenizer, job.prefix, job.chat)
        settings = output_settings(job, model_path, getattr(tokenizer, "chat_template", None))
        started = time.perf_counter()
        self.out.resumed = check_or_write(job.run_dir, input_fingerprint(self.source), settings)
        self.out.phase("read", time.perf_counter() - started)
        self.owner = claim(job.run_dir)  # before reading what is committed: see fence.py
        self.done = np.zeros(self.source.num_rows, dtype=bool)
        self.done[self.run_dir.committed_row_indices()] = True
        progress = WorkerProgress if self.distributed else RowProgress
        self.progress = progress(self.source.num_rows, enabled=job.progress)
        try:
            self.executor = self._executor(model_path, tokenizer)
        except BaseException:
            self.progress.close()
            raise
        self.out.phase("load", time.perf_counter() - self.t0)

    def _executor(self, model_path: Path, tokenizer) -> Executor:
        job = self.job
        if not self.distributed:
            runner = UnitRunner(
                job, self.run_dir, "local", model_path, self.mcfg, tokenizer, loader=load_model
            )
            return LocalExecutor(runner, self.progress)
        from batchllm.distributed.ray_executor import RayExecutor

        return RayExecutor(job, self.run_dir, self.metrics, self.progress, self.owner)

    def run(self) -> RunOutcome:
        out, job = self.out, self.job
        out.rows = self.source.num_rows
        out.rows_skipped = int(self.done.sum())
        out.device, out.dtype, out.workers = self.executor.device, self.executor.dtype, self.executor.workers
        self.metrics.append(
            "attempt",
            rows=out.rows,
            rows_committed=out.rows_skipped,
            resumed=out.resumed,
            workers=out.workers,
        )
        self.progress.advance(out.rows_skipped, 0, 0)
        max_new, max_pos = job.sampling.max_new_tokens, self.mcfg.max_position_embeddings
        windows = read_windows(self.source, self.prompter, job.window_rows, max_new, max_pos, skip=self.done)
        try:
            for number in itertools.count():
                started = time.perf_counter()
                window = next(windows, None)
                out.phase("read", time.perf_counter() - started)
                if window is None:
                    break
                self._run_window(window, number)
        except (Interrupted, KeyboardInterrupt):
            self._end("interrupted")
            raise Interrupted from None
        finally:
            self.executor.close()
            self.progress.close()
        started = time.perf_counter()
        if out.rows == 0:
            self.run_dir.commit(_empty_result(self.source))
        self.run_dir.assemble(job.output, out.rows)
        out.phase("write", time.perf_counter() - started)
        self._end("done")
        return out

    def _run_window(self, window: Window, number: int) -> None:
        job, out = self.job, self.out
        failed = window.failed()
        if failed.size:
            self.run_dir.commit(error_table(RowBlock.of_window(window, failed)))
            self._commit(int(failed.size), 0)
        self.progress.advance(int(failed.size), 0, 0)
        out.rows_failed += int(failed.size)
        runnable = window.runnable()
        prompts = [window.token_ids[i] for i in runnable]
        started = time.perf_counter()
        share = job.engine.prefix_sharing
        plan = make_plan(TokenSeqs.from_lists(prompts), sharing=share, dedup=share and job.sampling.greedy)
        out.plan_stats.append(plan.stats)
        out.unique_prompt_tokens += plan.stats.unique_prompt_tokens
        keys = row_keys(job.sampling.seed, window.ids, runnable)
        planned = PlannedRows(
            RowBlock.of_window(window, runnable), prompts, keys, job.sampling.max_new_tokens
        )
        units = split_plan(plan, planned, self.executor.workers, prefix=f"w{number}u")
        out.phase("plan", time.perf_counter() - started)
        calls = UnitCalls(should_stop=lambda: self.stop.requested, on_commit=self._commit)
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
            out.phase("prefill", stats.engine.prefill_seconds)
            out.phase("decode", stats.engine.decode_seconds)
        out.preemptions += stats.preemptions
        out.peak_kv_blocks = max(out.peak_kv_blocks, stats.peak_kv_blocks)
        out.kv_blocks = max(out.kv_blocks, stats.kv_blocks)
        out.prompt_tokens += stats.prompt_tokens
        out.cached_tokens += stats.cached_tokens
        out.output_tokens += stats.output_tokens
        mine = out.per_worker.setdefault(
            stats.worker, {"rows": 0, "output_tokens": 0, "seconds": 0.0, "units": 0}
        )
        mine["rows"] += stats.rows
        mine["output_tokens"] += stats.output_tokens
        mine["seconds"] += stats.seconds
        mine["units"] += 1
        self.metrics.append(
            "unit",
            unit=stats.unit_id,
            worker=stats.worker,
            rows=stats.rows,
            prompt_tokens=stats.prompt_tokens,
            output_tokens=stats.output_tokens,
            prefill_tokens_computed=stats.engine.prefill_tokens,
            seconds=stats.seconds,
        )

    def _commit(self, rows: int, output_tokens: int, unit_prefill: int = 0) -> None:
        """After each shard (or each finished unit, from Ray workers): one metrics record, so a report
        can follow a run in progress."""
        e = self.out.engine
        self.metrics.append(
            "commit",
            rows=rows,
            output_tokens=output_tokens,
            prefill_tokens_computed=e.prefill_tokens + unit_prefill,
            elapsed=time.perf_counter() - self.t0,
            kv_blocks_used=e.kv_samples[-1][1] if e.kv_samples else 0,
        )
        crash_point("commit")

    def _end(self, status: str) -> None:
        out = self.out
        out.wall_seconds = time.perf_counter() - self.t0
        out.worker_retries = self.executor.retries
        e = out.engine
        self.metrics.append(
            "end",
            status=status,
            wall_seconds=out.wall_seconds,
            phases=out.phases,
            unique_prompt_tokens=out.unique_prompt_tokens,
            prefill_tokens_computed=e.prefill_tokens,
            preemptions=out.preemptions,
            peak_kv_blocks=out.peak_kv_blocks,
            kv_blocks=out.kv_blocks,
            **_group_stats(out.plan_stats),
            kv_samples=e.kv_samples[-2000:],
            workers=out.per_worker,
            worker_retries=out.worker_retries,
        )


def _group_stats(stats: list[PlanStats]) -> dict:
    """The windows' group statistics combined (means weighted by groups / rows)."""
    groups = sum(s.groups for s in stats)
    reps = sum(s.rows - s.duplicate_rows for s in stats)
    return {
        "groups": groups,
        "avg_sharing_degree": sum(s.avg_sharing_degree * s.groups for s in stats) / groups if groups else 0.0,
        "avg_prefix_tokens": sum(s.avg_prefix_tokens * s.groups for s in stats) / groups if groups else 0.0,
        "avg_distinct_tokens": sum(s.avg_distinct_tokens * (s.rows - s.duplicate_rows) for s in stats) / reps
        if reps
        else 0.0,
        "duplicate_rows": sum(s.duplicate_rows for s in stats),
        "max_tree_depth": max((s.max_tree_depth for s in stats), default=0),
    }


def _empty_result(source) -> pa.Table:
    """A zero-row shard, so that an empty input still assembles an output with the right columns
    and types (an empty JSONL file is refused when opened, so only Parquet gets here)."""
    schema = pq.read_schema(source.path) if source.path.suffix == ".parquet" else pa.schema([])
    typed = {f.name: f.type for f in schema}
    id_type = typed.get(source.id_column, pa.int64()) if source.id_column else pa.int64()
    keep_schema = pa.schema([(c, typed.get(c, pa.null())) for c in source.keep_columns])
    keep = keep_schema.empty_table() if source.keep_columns else None
    no_ints = np.empty(0, np.int32)
    return result_table(
        np.empty(0, np.int64), pa.array([], id_type), keep, [], no_ints, no_ints, no_ints, [], []
    )
