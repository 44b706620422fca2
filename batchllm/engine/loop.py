"""The step loop: schedule -> run the model -> sample -> stop rows, until the work is done."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from batchllm.engine.model_runner import ModelRunner
from batchllm.engine.stopping import StopChecker
from batchllm.job.interrupt import Interrupted
from batchllm.scheduler.scheduler import Scheduler
from batchllm.scheduler.seq import Sequence


@dataclass
class EngineStats:
    steps: int = 0
    prefill_tokens: int = 0  # tokens run through the model for prompts, recomputation included
    decode_tokens: int = 0
    prefill_seconds: float = 0.0  # wall time of steps that carried prompt tokens
    decode_seconds: float = 0.0  # wall time of pure decode steps
    kv_samples: list[tuple[float, int]] = field(default_factory=list)  # (time, blocks in use)

    def add(self, other: EngineStats) -> None:
        self.steps += other.steps
        self.prefill_tokens += other.prefill_tokens
        self.decode_tokens += other.decode_tokens
        self.prefill_seconds += other.prefill_seconds
        self.decode_seconds += other.decode_seconds
        self.kv_samples.extend(other.kv_samples)


class Engine:
    def __init__(self, scheduler: Scheduler, runner: ModelRunner, stopper: StopChecker) -> None:
        self.scheduler = scheduler
        self.runner = runner
        self.stopper = stopper
        self.stats = EngineStats()  # grows during run(), so commits can report live figures

    def run(
        self,
        work: Iterable[Sequence],
        on_finish: Callable[[Sequence], None],
        should_stop: Callable[[], bool] = lambda: False,
    ) -> EngineStats:
        """Runs every sequence of ``work`` (in execution order); calls ``on_finish`` for each row.
        Raises Interrupted between steps once ``should_stop()`` says so."""
        sched = self.scheduler
        for seq in work:
            sched.add(seq)
        stats = self.stats
        while sched.has_work():
            if should_stop():
                raise Interrupted
            t0 = time.perf_counter()
            plan = sched.schedule()
            sampled = self.runner.execute(plan)
            sched.after_step(plan)
            rows = [c.seq for c in plan.chunks if c.sample]
            for seq, token in zip(rows, sampled):
                seq.token_ids.append(token)
                reason = self.stopper.check(seq.output_ids)
                if reason is not None:
                    sched.finish(seq, reason)
                    on_finish(seq)
            elapsed = time.perf_counter() - t0
            stats.steps += 1
            stats.prefill_tokens += plan.prefill_tokens
            stats.decode_tokens += sum(c.num_tokens for c in plan.chunks) - plan.prefill_tokens
            if plan.prefill_tokens:
                stats.prefill_seconds += elapsed
            else:
                stats.decode_seconds += elapsed
            now = time.time()
            if not stats.kv_samples or now - stats.kv_samples[-1][0] >= 0.5:
                stats.kv_samples.append((now, sched.pool.num_used))
        return stats
