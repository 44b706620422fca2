"""``batchllm run``: input rows -> prompts -> plan -> engine -> committed shards -> output Parquet."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from batchllm.config import JobSpec
from batchllm.engine import Engine, EngineStats
from batchllm.errors import JobError
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
from batchllm.runner import ModelRunner
from batchllm.runtime import kv_pool_blocks, make_backend, resolve_placement
from batchllm.scheduler.block_pool import BlockPool
from batchllm.scheduler.scheduler import Scheduler
from batchllm.scheduler.sequence import Sequence
from batchllm.stopping import StopChecker
from batchllm.workload import Window, plan_sequences, read_windows, row_keys

log = logging.getLogger("batchllm")


@dataclass
class JobTotals:
    rows: int = 0
    rows_failed: int = 0
    prompt_tokens: int = 0
    unique_prompt_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    groups: int = 0
    duplicate_rows: int = 0


class WindowResults:
    """Per-row results of one window, committed to the run dir in shards as rows finish."""

    def __init__(self, window: Window, run_dir: RunDir, checkpoint_rows: int, checkpoint_seconds: float):
        n = len(window)
        self.window = window
        self.run_dir = run_dir
        self.output: list[str | None] = [None] * n
        self.prompt_tokens = np.array([0 if t is None else len(t) for t in window.token_ids], dtype=np.int32)
        self.output_tokens = np.zeros(n, dtype=np.int32)
        self.cached_tokens = np.zeros(n, dtype=np.int32)
        self.finish_reason: list[str] = ["error"] * n
        self.error: list[str | None] = list(window.errors)
        self._pending: list[int] = [i for i, e in enumerate(window.errors) if e is not None]
        self._every_rows = checkpoint_rows
        self._every_s = checkpoint_seconds
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
        self._last_commit = time.monotonic()
        if not self._pending:
            return
        rows = np.asarray(sorted(self._pending), dtype=np.int64)
        self._pending = []
        take = pa.array(rows)
        table = result_table(
            row_index=rows + self.window.start,
            ids=self.window.ids.take(take),
            keep=None if self.window.keep is None else self.window.keep.take(take),
            output=[self.output[i] for i in rows],
            prompt_tokens=self.prompt_tokens[rows],
            output_tokens=self.output_tokens[rows],
            cached_tokens=self.cached_tokens[rows],
            finish_reason=[self.finish_reason[i] for i in rows],
            error=[self.error[i] for i in rows],
        )
        self.run_dir.commit(table)


@dataclass
class RunOutcome:
    totals: JobTotals
    plan_stats: list[PlanStats]
    engine: EngineStats
    wall_seconds: float
    device: str
    dtype: str
    preemptions: int
    peak_kv_blocks: int
    kv_blocks: int


def run(job: JobSpec, checkpoint_rows: int = 10_000, checkpoint_seconds: float = 60.0) -> RunOutcome:
    t0 = time.perf_counter()
    source = open_input(job.input, job.format, job.column, job.id_column, job.keep_columns)
    run_dir = RunDir(job.run_dir)
    run_dir.ensure_writable(job.output)
    model_path = resolve_model_path(job.model)
    mcfg = load_model_config(model_path)
    tokenizer = load_tokenizer(model_path)
    prompter = Prompter(tokenizer, job.prefix, job.chat)
    place = resolve_placement(job.engine)
    model = load_model(model_path, mcfg, place.dtype, place.device, dummy=job.engine.load_format == "dummy")
    backend = make_backend(job.engine, place.device)
    stopper = StopChecker(tokenizer, mcfg.eos_token_ids, job.sampling)
    ecfg = job.engine
    bytes_per_block = kv_bytes_per_block(mcfg, ecfg.block_size, place.dtype)

    totals, plan_stats, engine_stats = JobTotals(), [], EngineStats()
    progress = RowProgress(source.num_rows, enabled=job.progress)
    kv_caches: list = []
    preemptions = peak = 0
    windows = read_windows(
        source, prompter, job.window_rows, job.sampling.max_new_tokens, mcfg.max_position_embeddings
    )
    for window in windows:
        results = WindowResults(window, run_dir, checkpoint_rows, checkpoint_seconds)
        runnable = window.runnable()
        prompts = [window.token_ids[i] for i in runnable]
        seqs = TokenSeqs.from_lists(prompts)
        share = ecfg.prefix_sharing
        plan = make_plan(seqs, sharing=share, dedup=share and job.sampling.greedy)
        plan_stats.append(plan.stats)
        needed = _blocks_needed(prompts, plan, job.sampling.max_new_tokens, ecfg.block_size)
        num_blocks = kv_pool_blocks(ecfg, place.device, bytes_per_block, needed)
        _check_pool(num_blocks, prompts, plan, job.sampling.max_new_tokens, ecfg.block_size, bytes_per_block)
        if not kv_caches or kv_caches[0][0].shape[0] < num_blocks:
            kv_caches = []
            kv_caches = allocate_kv_caches(mcfg, num_blocks, ecfg.block_size, place.dtype, place.device)
        pool = BlockPool(num_blocks)
        scheduler = Scheduler(pool, ecfg.block_size, ecfg.token_budget, ecfg.max_running)
        runner = ModelRunner(model, kv_caches, backend, ecfg.block_size, job.sampling)
        engine = Engine(scheduler, runner, stopper)
        dups = _duplicates_by_representative(plan.duplicate_of)

        def on_finish(seq: Sequence, results=results, runnable=runnable, dups=dups) -> None:
            text = stopper.text(seq.output_ids)
            reason = seq.finish_reason or "stop"
            n_out = len(seq.output_ids)
            results.finish(int(runnable[seq.seq_id]), text, n_out, seq.cached_tokens, reason)
            for dup in dups.get(seq.seq_id, ()):
                row = int(runnable[dup])
                results.finish(row, text, n_out, int(results.prompt_tokens[row]), reason)
            rows = 1 + len(dups.get(seq.seq_id, ()))
            progress.advance(rows, seq.prompt_len, n_out)

        failed = len(window) - len(runnable)
        progress.advance(failed, 0, 0)
        keys = row_keys(job.sampling.seed, window.ids, runnable)
        stats = engine.run(plan_sequences(plan, prompts, keys), on_finish)
        results.commit()
        engine_stats.add(stats)
        preemptions += scheduler.num_preemptions
        peak = max(peak, pool.peak_used)
        if pool.num_used:
            raise RuntimeError(f"KV pool holds {pool.num_used} blocks after the window finished")
        _add_totals(totals, results, plan.stats)
    progress.close()
    run_dir.assemble(job.output, source.num_rows)
    return RunOutcome(
        totals=totals,
        plan_stats=plan_stats,
        engine=engine_stats,
        wall_seconds=time.perf_counter() - t0,
        device=str(place.device),
        dtype=str(place.dtype).removeprefix("torch."),
        preemptions=preemptions,
        peak_kv_blocks=peak,
        kv_blocks=kv_caches[0][0].shape[0] if kv_caches else 0,
    )


def _duplicates_by_representative(duplicate_of: np.ndarray) -> dict[int, list[int]]:
    dups: dict[int, list[int]] = {}
    for row in np.nonzero(duplicate_of != np.arange(len(duplicate_of)))[0].tolist():
        dups.setdefault(int(duplicate_of[row]), []).append(row)
    return dups


def _blocks_needed(prompts, plan, max_new_tokens: int, block_size: int) -> int:
    """Blocks the window could ever hold at once: every row fully grown plus every prefix."""
    rows = sum(-(-(len(p) + max_new_tokens) // block_size) for p in prompts)
    return rows + plan.stats.groups * 2 + 1


def _check_pool(num_blocks, prompts, plan, max_new_tokens, block_size, bytes_per_block) -> None:
    if not prompts:
        return
    longest = max(len(p) for p in prompts) + max_new_tokens
    need = -(-longest // block_size) + plan.stats.max_tree_depth + 1
    if num_blocks < need:
        raise JobError(
            f"the KV cache holds {num_blocks} blocks but the longest row needs {need} "
            f"({need * bytes_per_block / 2**20:.1f} MiB); raise --kv-cache-memory"
        )


def _add_totals(totals: JobTotals, results: WindowResults, stats: PlanStats) -> None:
    ok = np.array([e is None for e in results.error])
    totals.rows += len(ok)
    totals.rows_failed += int((~ok).sum())
    totals.prompt_tokens += int(results.prompt_tokens[ok].sum())
    totals.cached_tokens += int(results.cached_tokens.sum())
    totals.output_tokens += int(results.output_tokens.sum())
    totals.unique_prompt_tokens += stats.unique_prompt_tokens
    totals.groups += stats.groups
    totals.duplicate_rows += stats.duplicate_rows
