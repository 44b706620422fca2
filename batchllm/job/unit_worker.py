"""Runs work units on one model and commits their rows as shards.

``UnitWorker`` is the same code in the single-process run (``LocalExecutor``) and in every Ray actor
(``distributed.worker.EngineWorker``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

from batchllm.config import JobSpec
from batchllm.engine.constraints import GrammarCache
from batchllm.engine.grammar_spec import GrammarSpec
from batchllm.engine.loop import Engine, EngineStats
from batchllm.engine.model_host import ModelHost
from batchllm.io.faults import crash_point
from batchllm.io.writer import RunDir
from batchllm.job.counters import RowCounts
from batchllm.job.grammars import grammar_cache, is_constrained
from batchllm.job.live_prefixes import LivePrefixes
from batchllm.job.results import UnitResults
from batchllm.job.sample_results import SampleGather, gathering_finisher
from batchllm.job.scored_rows import ScoredRows
from batchllm.job.scoring import score_schema
from batchllm.job.units import WorkUnit, unit_sequences
from batchllm.model.config import ModelConfig, load_model_config, resolve_model_path
from batchllm.model.loader import load_model
from batchllm.model.tokenizer import load_tokenizer
from batchllm.scheduler.seq import Seq, SeqKind


@dataclass(frozen=True)
class UnitCalls:
    """How a running unit talks to whoever runs it."""

    should_stop: Callable[[], bool] = lambda: False
    on_rows: Callable[[RowCounts], None] = lambda counts: None  # rows finished (not yet committed)
    # after each shard: what it committed, and prefill tokens computed so far in the running unit
    on_commit: Callable[[RowCounts, int], None] = lambda counts, unit_prefill: None
    may_commit: Callable[[], bool] = lambda: True  # before each shard


@dataclass(frozen=True)
class UnitStats:
    """What one work unit did on one worker."""

    unit_id: str
    worker: str
    counts: RowCounts  # the rows it committed, duplicates included
    engine: EngineStats
    preemptions: int
    peak_kv_blocks: int
    kv_blocks: int  # the worker's KV pool size
    seconds: float  # wall time of the unit on its worker
    prefixes: tuple[tuple[int, int], ...] = ()  # (key, own tokens) of each prefix this unit prefilled


class UnitWorker:
    """Runs units one after another on one engine that outlives them: prefixes a later unit needs
    (``keep``) stay prefilled in its KV pool between units (see ``LivePrefixes``)."""

    def __init__(self, job: JobSpec, run_dir: RunDir, name: str, host: ModelHost) -> None:
        self.job, self.run_dir, self.name, self.host = job, run_dir, name, host
        self.live = LivePrefixes()
        self._engine: Engine | None = None

    @classmethod
    def open(
        cls, job: JobSpec, run_dir: RunDir, name: str, model_path: Path | None = None,
        mcfg: ModelConfig | None = None, tokenizer=None, loader: Callable = load_model,
        grammars: GrammarCache | None = None,
    ) -> UnitWorker:  # fmt: skip
        """Load the job's model (config and tokenizer too, unless the caller has them already), and
        for structured output a grammar cache (``grammars``, or a new one)."""
        model_path = model_path or resolve_model_path(job.model)
        mcfg = mcfg or load_model_config(model_path)
        tokenizer = tokenizer or load_tokenizer(model_path)
        host = ModelHost(model_path, mcfg, tokenizer, job.engine, job.sampling, loader)
        if is_constrained(job):
            host.grammars = grammars or grammar_cache(tokenizer, mcfg)
        return cls(job, run_dir, name, host)

    def run(
        self, unit: WorkUnit, calls: UnitCalls, keep: Collection[int] = (), kv_blocks: int = 0
    ) -> UnitStats:
        """Generate every row of ``unit``; finished rows are committed even when this raises. Prefixes
        whose key is in ``keep`` stay prefilled for later units; ``kv_blocks`` sizes the pool for the
        largest unit still to come, so that keeping them never needs a new pool."""
        t0 = time.perf_counter()
        engine = self._engine_for(unit, kv_blocks)
        engine.stats = EngineStats()
        preemptions = engine.scheduler.num_preemptions
        seqs = list(unit_sequences(unit, self.live.seqs))
        self._constrain(unit, seqs)
        self.live.update(unit, seqs, keep, engine.scheduler)
        results, finisher = self._results(unit, calls, engine)
        try:
            stats = engine.run(seqs, finisher, calls.should_stop)
        except BaseException:
            self._engine = None  # rows left mid-flight: the next unit starts on a fresh engine
            self.live.clear()
            raise
        finally:
            results.commit()
        self.live.check_invariants(engine.scheduler)
        return UnitStats(
            unit.unit_id, self.name, results.committed, stats, engine.scheduler.num_preemptions - preemptions,
            engine.scheduler.pool.peak_used, self.host.kv_blocks, time.perf_counter() - t0,
            _prefilled_prefixes(unit, seqs),
        )  # fmt: skip

    def _constrain(self, unit: WorkUnit, seqs: list[Seq]) -> None:
        """Each row's matcher: the job's grammar, or the row's own schema (checked by the driver)."""
        job, cache, schemas = self.job, self.host.grammars, unit.rows.schemas
        if cache is None:
            return
        for seq in seqs:
            if seq.is_row:
                own = None if schemas is None else schemas[seq.index]
                spec = job.grammar if own is None else GrammarSpec("json_schema", own)
                seq.constraint = None if spec is None else cache.new_row(spec)

    def _engine_for(self, unit: WorkUnit, kv_blocks: int) -> Engine:
        """The worker's engine, unless its pool is smaller than this unit should get (then a new one,
        and the held prefixes are given up)."""
        needed, least = unit.kv_blocks(self.job.engine.block_size, self.job.sampling.max_new_tokens)
        needed = max(needed, kv_blocks)
        engine = self._engine
        if engine is None or engine.scheduler.pool.num_blocks < max(self.host.pool_blocks(needed), least):
            self._engine = None
            self.live.clear()
            engine = self._engine = self.host.engine(needed, least)
        return engine

    def _results(
        self, unit: WorkUnit, calls: UnitCalls, engine: Engine
    ) -> tuple[UnitResults, Callable[[Seq], None]]:
        """Where the unit's finished rows go, and what to call as each sequence finishes (samples and
        logprobs are gathered per row when ``--n`` or ``--logprobs`` asks for them)."""
        sampling = self.job.sampling
        gather = None
        if sampling.n > 1 or sampling.logprobs:
            gather = SampleGather(unit.rows, sampling, self.host.stopper.tokenizer)
        results = UnitResults(
            gather.rows if gather else unit.rows, self.run_dir, self.job.checkpoint_rows,
            self.job.checkpoint_seconds, lambda counts: calls.on_commit(counts, engine.stats.prefill_tokens),
            calls.may_commit, gather.columns if gather else None, score_schema(self.job.scoring),
        )  # fmt: skip
        if gather is None:
            return results, self._finisher(unit, results, calls)
        stopper = self.host.stopper
        return results, gathering_finisher(gather, results, unit.duplicates(), stopper, calls.on_rows)

    def _finisher(self, unit: WorkUnit, results: UnitResults, calls: UnitCalls) -> Callable[[Seq], None]:
        """What happens when a row finishes: its text (and its duplicates') recorded, maybe committed."""
        dups = unit.duplicates()
        stopper = self.host.stopper
        if unit.continuations is not None:
            return _scored_finisher(unit, ScoredRows(unit, self.job.scoring), results, calls)

        def on_finish(seq: Seq) -> None:
            text, n_out, reason = stopper.text(seq.output_ids, seq.params), seq.num_output, seq.finish_reason
            counts = results.finish(seq.index, text, n_out, seq.cached_tokens, reason, seq.error)
            for dup in dups.get(seq.index, ()):
                cached = int(unit.rows.prompt_tokens[dup])
                counts.add(results.finish(dup, text, n_out, cached, reason, seq.error))
            results.maybe_commit()
            calls.on_rows(counts)
            crash_point("row")

        return on_finish


def _scored_finisher(
    unit: WorkUnit, scored: ScoredRows, results: UnitResults, calls: UnitCalls
) -> Callable[[Seq], None]:
    """``_finisher`` of a scoring unit: a row is recorded once all its SCORE sequences are done."""
    dups = unit.duplicates()

    def on_finish(seq: Seq) -> None:
        if not scored.add(seq):
            return  # the row's other continuations are still running
        counts = scored.finish(seq.index, results, dups.get(seq.index, ()))
        results.maybe_commit()
        calls.on_rows(counts)
        crash_point("row")

    return on_finish


def _prefilled_prefixes(unit: WorkUnit, seqs: list[Seq]) -> tuple[tuple[int, int], ...]:
    """(key, own tokens) of the prefixes ``seqs`` prefilled (the unit's prefixes not found live)."""
    return tuple(
        (unit.node_keys[s.index], s.prompt_len - (s.parent.prompt_len if s.parent is not None else 0))
        for s in seqs
        if s.kind is SeqKind.PREFIX and not s.of_row
    )
