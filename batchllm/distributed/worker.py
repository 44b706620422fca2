"""One engine and its model: runs work units and commits their rows as shards.

``UnitRunner`` is the same code in the single-process run (``LocalExecutor``) and in every Ray actor
(``EngineWorker``, turned into an actor by the driver; this module does not import ray).
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from batchllm.config import JobSpec
from batchllm.engine.loop import Engine
from batchllm.engine.model_runner import ModelRunner
from batchllm.engine.placement import kv_pool_blocks, make_backend, resolve_placement
from batchllm.engine.stopping import StopChecker
from batchllm.errors import JobError
from batchllm.io.writer import RunDir
from batchllm.job.fence import Fence
from batchllm.job.interrupt import Interrupted
from batchllm.job.progress import RowProgress
from batchllm.job.results import UnitResults, UnitStats
from batchllm.job.units import WorkUnit, unit_sequences
from batchllm.model.config import ModelConfig, load_model_config, resolve_model_path
from batchllm.model.decoder import allocate_kv_caches, kv_bytes_per_block
from batchllm.model.loader import load_model
from batchllm.model.tokenizer import load_tokenizer
from batchllm.scheduler.block_pool import BlockPool
from batchllm.scheduler.scheduler import Scheduler
from batchllm.scheduler.seq import Sequence
from batchllm.testing.faults import crash_point


@dataclass(frozen=True)
class UnitCalls:
    """How a running unit talks to whoever runs it."""

    should_stop: Callable[[], bool] = lambda: False
    # rows finished: (rows, prompt tokens, output tokens, prompt tokens whose KV was reused)
    on_rows: Callable[[int, int, int, int], None] = lambda rows, prompt, output, cached: None
    # after each shard: (rows, output tokens, prefill tokens computed so far in the running unit)
    on_commit: Callable[[int, int, int], None] = lambda rows, output_tokens, unit_prefill: None
    may_commit: Callable[[], bool] = lambda: True  # before each shard


class UnitRunner:
    def __init__(
        self,
        job: JobSpec,
        run_dir: RunDir,
        name: str,
        model_path: Path,
        mcfg: ModelConfig,
        tokenizer,
        loader: Callable = load_model,  # the driver passes its own, so benchmarks can time it
    ) -> None:
        self.job, self.run_dir, self.name, self.mcfg = job, run_dir, name, mcfg
        self.place = resolve_placement(job.engine)
        dummy = job.engine.load_format == "dummy"
        self.model = loader(model_path, mcfg, self.place.dtype, self.place.device, dummy)
        self.backend = make_backend(job.engine, self.place.device)
        self.stopper = StopChecker(tokenizer, mcfg.eos_token_ids, job.sampling)
        self.kv_caches: list = []
        self.kv_blocks = 0

    @classmethod
    def open(cls, job: JobSpec, run_dir: RunDir, name: str) -> UnitRunner:
        model_path = resolve_model_path(job.model)
        return cls(job, run_dir, name, model_path, load_model_config(model_path), load_tokenizer(model_path))

    def run(self, unit: WorkUnit, calls: UnitCalls) -> UnitStats:
        """Generate every row of ``unit``; finished rows are committed even when this raises."""
        t0, job = time.perf_counter(), self.job
        every = (job.checkpoint_rows, job.checkpoint_seconds)
        engine, pool = self._engine(unit)

        def committed(rows: int, output_tokens: int) -> None:
            calls.on_commit(rows, output_tokens, engine.stats.prefill_tokens)

        results = UnitResults(unit.rows, self.run_dir, *every, committed, calls.may_commit)
        dups = unit.duplicates()
        prompt_tokens = unit.rows.prompt_tokens

        def on_finish(seq: Sequence) -> None:
            text, n_out, reason = self.stopper.text(seq.output_ids), len(seq.output_ids), seq.finish_reason
            results.finish(seq.seq_id, text, n_out, seq.cached_tokens, reason)
            for dup in dups.get(seq.seq_id, ()):
                results.finish(dup, text, n_out, int(prompt_tokens[dup]), reason)
            results.maybe_commit()
            copies = len(dups.get(seq.seq_id, ()))
            n, cached = 1 + copies, seq.cached_tokens + copies * seq.prompt_len
            calls.on_rows(n, n * seq.prompt_len, n * n_out, cached)
            crash_point("row")

        try:
            stats = engine.run(unit_sequences(unit), on_finish, calls.should_stop)
        finally:
            results.commit()
        if pool.num_used:
            raise RuntimeError(f"KV pool holds {pool.num_used} blocks after unit {unit.unit_id} finished")
        return UnitStats(
            unit_id=unit.unit_id,
            worker=self.name,
            rows=len(unit),
            prompt_tokens=int(prompt_tokens.sum()),
            cached_tokens=int(results.cached_tokens.sum()),
            output_tokens=int(results.output_tokens.sum()),
            engine=stats,
            preemptions=engine.scheduler.num_preemptions,
            peak_kv_blocks=pool.peak_used,
            kv_blocks=self.kv_blocks,
            seconds=time.perf_counter() - t0,
        )

    def _engine(self, unit: WorkUnit) -> tuple[Engine, BlockPool]:
        ecfg, mcfg, place = self.job.engine, self.mcfg, self.place
        bytes_per_block = kv_bytes_per_block(mcfg, ecfg.block_size, place.dtype)
        max_new = self.job.sampling.max_new_tokens
        blocks = [-(-(len(p) + max_new) // ecfg.block_size) for p in unit.token_ids]
        needed = sum(blocks) + 2 * unit.num_groups + 1
        num_blocks = kv_pool_blocks(ecfg, place.device, bytes_per_block, needed)
        least = max(blocks, default=0) + unit.depth + 1
        if blocks and num_blocks < least:
            raise JobError(
                f"the KV cache holds {num_blocks} blocks but the longest row needs {least} "
                f"({least * bytes_per_block / 2**20:.1f} MiB); raise --kv-cache-memory"
            )
        if not self.kv_caches or self.kv_caches[0][0].shape[0] < num_blocks:
            self.kv_caches = []  # free the old pool before allocating the larger one
            self.kv_caches = allocate_kv_caches(mcfg, num_blocks, ecfg.block_size, place.dtype, place.device)
            self.kv_blocks = num_blocks
        pool = BlockPool(num_blocks)
        scheduler = Scheduler(pool, ecfg.block_size, ecfg.token_budget, ecfg.max_running, max_new)
        runner = ModelRunner(self.model, self.kv_caches, self.backend, ecfg.block_size, self.job.sampling)
        return Engine(scheduler, runner, self.stopper), pool


class LocalExecutor:
    """Units one after another on an engine in this process: the ``--workers 1`` run."""

    workers = 1
    retries = 0

    def __init__(self, runner: UnitRunner, progress: RowProgress) -> None:
        self.runner = runner
        self.progress = progress
        self.device = str(runner.place.device)
        self.dtype = str(runner.place.dtype).removeprefix("torch.")

    def run(self, units: list[WorkUnit], calls: UnitCalls, on_done: Callable[[UnitStats], None]) -> None:
        calls = UnitCalls(calls.should_stop, self.progress.advance, calls.on_commit)
        for unit in units:
            on_done(self.runner.run(unit, calls))

    def close(self) -> None:
        pass


class EngineWorker:
    """The body of a Ray actor: one engine, its model loaded once; units run one at a time."""

    def __init__(self, job: JobSpec, name: str, threads: int | None, owner: str) -> None:
        if threads:
            torch.set_num_threads(threads)
        self._fence = Fence(job.run_dir, owner)
        # A writer tag of its own: shard names never collide with other workers or attempts.
        run_dir = RunDir(job.run_dir, writer=secrets.token_hex(4))
        self.runner = UnitRunner.open(job, run_dir, name)
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def ready(self) -> tuple[str, str]:
        """(device, dtype), once the model is loaded."""
        place = self.runner.place
        return str(place.device), str(place.dtype).removeprefix("torch.")

    def run(self, unit: WorkUnit) -> UnitStats:
        with self._lock:
            if self._stop.is_set():
                raise Interrupted
            fence = self._fence
            stop = UnitCalls(lambda: self._stop.is_set() or fence.lost(), may_commit=fence.holds)
            return self.runner.run(unit, stop)

    def stop(self) -> None:
        """Finish the current step, commit, and refuse further units."""
        self._stop.set()
