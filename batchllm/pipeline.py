"""``batchllm run``: input rows -> prompts -> plan -> engine -> committed shards -> output Parquet.

Every run lives in a run directory (manifest, committed shards, metrics). Re-running the same command
resumes it: committed rows are skipped, the rest generated, and the output assembled in input order.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from batchllm.config import JobSpec
from batchllm.engine import Engine, EngineStats
from batchllm.errors import JobError
from batchllm.faults import crash_point
from batchllm.interrupt import Interrupted, StopRequest
from batchllm.io.manifest import check_or_write, input_fingerprint, output_settings
from batchllm.io.metrics import MetricsLog
from batchllm.io.prompts import Prompter
from batchllm.io.reader import open_input
from batchllm.io.writer import RunDir, result_table
from batchllm.model.config import load_model_config, resolve_model_path
from batchllm.model.decoder import allocate_kv_caches, kv_bytes_per_block
from batchllm.model.loader import load_model
from batchllm.model.tokenizer import load_tokenizer
from batchllm.prefix_tree.plan import PlanStats, make_plan
from batchllm.prefix_tree.tree import TokenSeqs
from batchllm.progress import RowProgress
from batchllm.results import WindowResults
from batchllm.runner import ModelRunner
from batchllm.runtime import kv_pool_blocks, make_backend, resolve_placement
from batchllm.scheduler.block_pool import BlockPool
from batchllm.scheduler.scheduler import Scheduler
from batchllm.scheduler.sequence import Sequence
from batchllm.stopping import StopChecker
from batchllm.workload import Window, plan_sequences, read_windows, row_keys

log = logging.getLogger("batchllm")


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
        self.source = open_input(job.input, job.format, job.column, job.id_column, job.keep_columns)
        if fresh and job.run_dir.exists():
            shutil.rmtree(job.run_dir)
        self.run_dir = RunDir(job.run_dir)
        self.run_dir.ensure_writable(job.output)
        self.metrics = MetricsLog(job.run_dir)
        self.model_path = resolve_model_path(job.model)
        self.mcfg = load_model_config(self.model_path)
        self.tokenizer = load_tokenizer(self.model_path)
        self.prompter = Prompter(self.tokenizer, job.prefix, job.chat)
        settings = output_settings(job, self.model_path, getattr(self.tokenizer, "chat_template", None))
        started = time.perf_counter()
        self.out.resumed = check_or_write(job.run_dir, input_fingerprint(self.source), settings)
        self.out.phase("read", time.perf_counter() - started)
        self.done = np.zeros(self.source.num_rows, dtype=bool)
        self.done[self.run_dir.committed_row_indices()] = True
        self.place = resolve_placement(job.engine)
        self.model = load_model(
            self.model_path, self.mcfg, self.place.dtype, self.place.device, job.engine.load_format == "dummy"
        )
        self.backend = make_backend(job.engine, self.place.device)
        self.stopper = StopChecker(self.tokenizer, self.mcfg.eos_token_ids, job.sampling)
        self.kv_caches: list = []
        self.progress = RowProgress(self.source.num_rows, enabled=job.progress)
        self.out.phase("load", time.perf_counter() - self.t0)

    def run(self) -> RunOutcome:
        out, job = self.out, self.job
        out.rows = self.source.num_rows
        out.rows_skipped = int(self.done.sum())
        out.device, out.dtype = str(self.place.device), str(self.place.dtype).removeprefix("torch.")
        self.metrics.append("attempt", rows=out.rows, rows_committed=out.rows_skipped, resumed=out.resumed)
        self.progress.advance(out.rows_skipped, 0, 0)
        max_new, max_pos = job.sampling.max_new_tokens, self.mcfg.max_position_embeddings
        windows = read_windows(self.source, self.prompter, job.window_rows, max_new, max_pos, skip=self.done)
        try:
            while True:
                started = time.perf_counter()
                window = next(windows, None)
                out.phase("read", time.perf_counter() - started)
                if window is None:
                    break
                self._run_window(window)
        except (Interrupted, KeyboardInterrupt):
            self._end("interrupted")
            raise Interrupted from None
        finally:
            self.progress.close()
        started = time.perf_counter()
        if out.rows == 0:
            self.run_dir.commit(_empty_result(self.source))
        self.run_dir.assemble(job.output, out.rows)
        out.phase("write", time.perf_counter() - started)
        self._end("done")
        return out

    def _run_window(self, window: Window) -> None:
        job, out = self.job, self.out
        every = (job.checkpoint_rows, job.checkpoint_seconds)
        results = WindowResults(window, self.run_dir, *every, self._commit)
        runnable = window.runnable()
        prompts = [window.token_ids[i] for i in runnable]
        started = time.perf_counter()
        share = job.engine.prefix_sharing
        plan = make_plan(TokenSeqs.from_lists(prompts), sharing=share, dedup=share and job.sampling.greedy)
        out.plan_stats.append(plan.stats)
        out.phase("plan", time.perf_counter() - started)
        engine, pool = self._engine(prompts, plan)
        dups = _duplicates_by_representative(plan.duplicate_of)

        def on_finish(seq: Sequence) -> None:
            text, n_out, reason = self.stopper.text(seq.output_ids), len(seq.output_ids), seq.finish_reason
            results.finish(int(runnable[seq.seq_id]), text, n_out, seq.cached_tokens, reason)
            for dup in dups.get(seq.seq_id, ()):
                row = int(runnable[dup])
                results.finish(row, text, n_out, int(results.prompt_tokens[row]), reason)
            self.progress.advance(1 + len(dups.get(seq.seq_id, ())), seq.prompt_len, n_out)
            crash_point("row")

        self.progress.advance(window.num_failed, 0, 0)
        keys = row_keys(job.sampling.seed, window.ids, runnable)
        try:
            stats = engine.run(plan_sequences(plan, prompts, keys), on_finish, lambda: self.stop.requested)
        finally:
            results.commit()
        out.engine.add(stats)
        out.phase("prefill", stats.prefill_seconds)
        out.phase("decode", stats.decode_seconds)
        out.preemptions += engine.scheduler.num_preemptions
        out.peak_kv_blocks = max(out.peak_kv_blocks, pool.peak_used)
        if pool.num_used:
            raise RuntimeError(f"KV pool holds {pool.num_used} blocks after the window finished")
        out.unique_prompt_tokens += plan.stats.unique_prompt_tokens
        out.rows_failed += window.num_failed
        ok = window.runnable()
        out.prompt_tokens += int(results.prompt_tokens[ok].sum())
        out.cached_tokens += int(results.cached_tokens.sum())
        out.output_tokens += int(results.output_tokens.sum())

    def _engine(self, prompts: list[np.ndarray], plan) -> tuple[Engine, BlockPool]:
        ecfg, mcfg, place = self.job.engine, self.mcfg, self.place
        bytes_per_block = kv_bytes_per_block(mcfg, ecfg.block_size, place.dtype)
        max_new = self.job.sampling.max_new_tokens
        needed = sum(-(-(len(p) + max_new) // ecfg.block_size) for p in prompts) + 2 * plan.stats.groups + 1
        num_blocks = kv_pool_blocks(ecfg, place.device, bytes_per_block, needed)
        if prompts:
            longest = -(-(max(len(p) for p in prompts) + max_new) // ecfg.block_size)
            least = longest + plan.stats.max_tree_depth + 1
            if num_blocks < least:
                raise JobError(
                    f"the KV cache holds {num_blocks} blocks but the longest row needs {least} "
                    f"({least * bytes_per_block / 2**20:.1f} MiB); raise --kv-cache-memory"
                )
        if not self.kv_caches or self.kv_caches[0][0].shape[0] < num_blocks:
            self.kv_caches = []  # free the old pool before allocating the larger one
            self.kv_caches = allocate_kv_caches(mcfg, num_blocks, ecfg.block_size, place.dtype, place.device)
            self.out.kv_blocks = num_blocks
        pool = BlockPool(num_blocks)
        scheduler = Scheduler(pool, ecfg.block_size, ecfg.token_budget, ecfg.max_running)
        runner = ModelRunner(self.model, self.kv_caches, self.backend, ecfg.block_size, self.job.sampling)
        return Engine(scheduler, runner, self.stopper), pool

    def _commit(self, rows: int, output_tokens: int) -> None:
        """After each shard: one metrics record, so a report can follow a run in progress."""
        e = self.out.engine
        self.metrics.append(
            "commit",
            rows=rows,
            output_tokens=output_tokens,
            prefill_tokens_computed=e.prefill_tokens,
            elapsed=time.perf_counter() - self.t0,
            kv_blocks_used=e.kv_samples[-1][1] if e.kv_samples else 0,
        )
        crash_point("commit")

    def _end(self, status: str) -> None:
        out = self.out
        out.wall_seconds = time.perf_counter() - self.t0
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
            groups=sum(s.groups for s in out.plan_stats),
            kv_samples=e.kv_samples[-2000:],
        )


def _duplicates_by_representative(duplicate_of: np.ndarray) -> dict[int, list[int]]:
    dups: dict[int, list[int]] = {}
    for row in np.nonzero(duplicate_of != np.arange(len(duplicate_of)))[0].tolist():
        dups.setdefault(int(duplicate_of[row]), []).append(row)
    return dups


def _empty_result(source) -> pa.Table:
    """A zero-row shard, so that an empty input still assembles an output with the right columns."""
    batch = next(source.iter_batches(rows_per_batch=1), None)
    ids = batch.ids if batch is not None else pa.array([], pa.int64())
    keep = batch.keep if batch is not None else None
    no_ints = np.empty(0, np.int32)
    return result_table(np.empty(0, np.int64), ids, keep, [], no_ints, no_ints, no_ints, [], [])
