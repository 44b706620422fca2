"""The step loop: schedule -> run the model -> sample -> stop rows, until the work is done."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from batchllm.engine.model_runner import ModelRunner
from batchllm.engine.stopping import StopChecker
from batchllm.errors import Interrupted
from batchllm.scheduler.scheduler import Scheduler, Step
from batchllm.scheduler.seq import Seq


@dataclass
class EngineStats:
    steps: int = 0
    prefill_tokens: int = 0  # tokens run through the model for prompts, recomputation included
    decode_tokens: int = 0
    prompt_step_seconds: float = 0.0  # wall time of steps that carried prompt tokens (mixed ones too)
    decode_step_seconds: float = 0.0  # wall time of steps of decode tokens only
    kv_samples: list[tuple[float, int]] = field(default_factory=list)  # (time, blocks in use)

    def add(self, other: EngineStats) -> None:
        self.steps += other.steps
        self.prefill_tokens += other.prefill_tokens
        self.decode_tokens += other.decode_tokens
        self.prompt_step_seconds += other.prompt_step_seconds
        self.decode_step_seconds += other.decode_step_seconds
        self.kv_samples.extend(other.kv_samples)

    def count(self, step: Step, seconds: float, kv_blocks_used: int) -> None:
        self.steps += 1
        self.prefill_tokens += step.prefill_tokens
        self.decode_tokens += sum(c.num_tokens for c in step.chunks) - step.prefill_tokens
        if step.prefill_tokens:
            self.prompt_step_seconds += seconds
        else:
            self.decode_step_seconds += seconds
        now = time.time()
        if not self.kv_samples or now - self.kv_samples[-1][0] >= 0.5:
            self.kv_samples.append((now, kv_blocks_used))


class Engine:
    def __init__(self, scheduler: Scheduler, runner: ModelRunner, stopper: StopChecker) -> None:
        self.scheduler = scheduler
        self.runner = runner
        self.stopper = stopper
        self.stats = EngineStats()  # grows during run(), so commits can report live figures

    def run(
        self,
        work: Iterable[Seq],
        on_finish: Callable[[Seq], None],
        should_stop: Callable[[], bool] = lambda: False,
    ) -> EngineStats:
        """Runs every sequence of ``work`` (in execution order); calls ``on_finish`` for each row.
        Raises Interrupted between steps once ``should_stop()`` says so."""
        sched = self.scheduler
        for seq in work:
            sched.add(seq)
        while sched.has_work():
            if should_stop():
                raise Interrupted
            t0 = time.perf_counter()
            step = sched.schedule()
            sampled = self.runner.execute(step)
            sched.after_step(step)
            self._append(step, sampled, on_finish)
            self.stats.count(step, time.perf_counter() - t0, sched.pool.num_used)
        return self.stats

    def _append(self, step: Step, sampled: list[int], on_finish: Callable[[Seq], None]) -> None:
        """Each sampled token joins its row; rows that now stop are finished."""
        rows = [c.seq for c in step.chunks if c.sample]
        for seq, token in zip(rows, sampled):
            seq.token_ids.append(token)
            reason = self.stopper.check(seq.token_ids, seq.prompt_len)
            if reason is not None:
                self.scheduler.finish(seq, reason)
                on_finish(seq)
