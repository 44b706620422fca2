"""The step loop: schedule -> launch the model -> (next step) -> retire: sampled tokens join their
rows, rows that stop are finished, until the work is done.

With ``overlap`` (the default on CUDA) step n+1 is scheduled, prepared and launched while the device
still runs step n; only then does the loop read step n's sampled tokens, its one device->host sync.
A row that stops at step n has then run one more token in step n+1; that token is dropped. Without
overlap (the CPU) the same code retires each step right after launching it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from batchllm.engine.model_runner import ModelRunner, StepOutput
from batchllm.engine.stopping import StopChecker
from batchllm.errors import Interrupted
from batchllm.scheduler.scheduler import Scheduler, Step
from batchllm.scheduler.seq import Seq


@dataclass
class EngineStats:
    steps: int = 0
    prefill_tokens: int = 0  # tokens run through the model for prompts, recomputation included
    decode_tokens: int = 0
    scored_tokens: int = 0  # continuation tokens whose log-prob was read (--choices, --score-column)
    prompt_step_seconds: float = 0.0  # wall time of steps that carried prompt tokens (mixed ones too)
    decode_step_seconds: float = 0.0  # wall time of steps of decode tokens only
    kv_samples: list[tuple[float, int]] = field(default_factory=list)  # (time, blocks in use)

    def add(self, other: EngineStats) -> None:
        self.steps += other.steps
        self.prefill_tokens += other.prefill_tokens
        self.decode_tokens += other.decode_tokens
        self.scored_tokens += other.scored_tokens
        self.prompt_step_seconds += other.prompt_step_seconds
        self.decode_step_seconds += other.decode_step_seconds
        self.kv_samples.extend(other.kv_samples)

    def count(self, step: Step, seconds: float, kv_blocks_used: int) -> None:
        self.steps += 1
        self.prefill_tokens += step.prefill_tokens
        self.decode_tokens += step.num_tokens - step.prefill_tokens
        if step.prefill_tokens:
            self.prompt_step_seconds += seconds
        else:
            self.decode_step_seconds += seconds
        now = time.time()
        if not self.kv_samples or now - self.kv_samples[-1][0] >= 0.5:
            self.kv_samples.append((now, kv_blocks_used))


@dataclass(frozen=True)
class Launched:
    """A step under way on the device, and its sampled tokens once they are read."""

    step: Step
    sampled: torch.Tensor  # int64 [rows sampled], on the device
    epoch: int  # the batch state's epoch after the step was launched: its slots are valid while equal
    finished: int  # rows finished before the step was launched
    output: StepOutput | None = None  # the step's scored log-probs, if it scores anything


class Engine:
    def __init__(
        self, scheduler: Scheduler, runner: ModelRunner, stopper: StopChecker, overlap: bool | None = None
    ) -> None:
        self.scheduler = scheduler
        self.runner = runner
        self.stopper = stopper
        self.overlap = runner.device.type == "cuda" if overlap is None else overlap
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
        pending: Launched | None = None
        while sched.has_work():
            if should_stop():
                if pending is not None:
                    self._retire(pending, on_finish)
                raise Interrupted
            t0 = time.perf_counter()
            step = sched.schedule()
            if step is None:  # every running row waits for the tokens still on the device
                if pending is None:
                    raise RuntimeError("scheduler holds rows back but no step is under way")
                self._retire(pending, on_finish)
                pending = None
                continue
            output = self.runner.launch_step(step, pending.sampled if pending else None)
            sched.after_step(step)
            launched = Launched(step, output.sampled, sched.batch.epoch, sched.num_finished, output)
            if pending is not None:
                self._retire(pending, on_finish)
            pending = launched
            if not self.overlap:
                self._retire(launched, on_finish)
                pending = None
            self.stats.count(step, time.perf_counter() - t0, sched.pool.num_used)
        if pending is not None:
            self._retire(pending, on_finish)
        return self.stats

    def _retire(self, launched: Launched, on_finish: Callable[[Seq], None]) -> None:
        """Each sampled token joins its row (rows finished meanwhile drop theirs); rows that now stop
        are finished."""
        tokens = launched.sampled.tolist()  # the step's one device->host sync
        step, sched = launched.step, self.scheduler
        seqs = step.sampled_seqs
        if sched.num_finished == launched.finished and sched.batch.epoch == launched.epoch:
            for seq, token in zip(seqs, tokens):  # no row left meanwhile: the step's slots still hold
                seq.token_ids.append(token)
            tokens_array = np.asarray(tokens, dtype=np.int64)
            sched.batch.last_token[step.slots[step.sample]] = tokens_array
            num_output = step.num_output + 1
        else:
            seqs, tokens_array, num_output = self._append_to_live(seqs, tokens, step.num_output)
        lists = [seq.token_ids for seq in seqs] if self.stopper.params.stop else []
        for i, reason in self.stopper.check_batch(tokens_array, num_output, lists).items():
            sched.finish(seqs[i], reason)
            on_finish(seqs[i])
        if launched.step.scoring is not None:
            self._retire_scored(launched, on_finish)

    def _retire_scored(self, launched: Launched, on_finish: Callable[[Seq], None]) -> None:
        """Scored log-probs join their SCORE sequences; one whose chunk reached its end is finished
        ("scored"): it never decodes."""
        step, output = launched.step, launched.output
        spans = output.spans if output is not None else None
        if spans is not None:
            values = output.scored.tolist()
            self.stats.scored_tokens += len(values)
            offset = 0
            for row, first, count in zip(spans.rows.tolist(), spans.first.tolist(), spans.counts.tolist()):
                seq = step.seqs[row]
                lo = first - (seq.score_start - 1)
                seq.scored[lo : lo + count] = values[offset : offset + count]
                offset += count
        for row in np.flatnonzero(step.scoring & step.tail).tolist():
            seq = step.seqs[row]
            if seq.finish_reason is None:
                self.scheduler.finish(seq, "scored")
                on_finish(seq)

    def _append_to_live(
        self, seqs: list[Seq], tokens: list[int], num_output: np.ndarray
    ) -> tuple[list[Seq], np.ndarray, np.ndarray]:
        """The slow path of ``_retire``: rows finished since the launch drop their token, and each
        row's slot is looked up again. Returns the live rows, their tokens and output counts."""
        live = [i for i, seq in enumerate(seqs) if seq.finish_reason is None]
        batch = self.scheduler.batch
        for i in live:
            seq = seqs[i]
            seq.token_ids.append(tokens[i])
            if seq.slot is not None:  # a preempted row has none
                batch.last_token[seq.slot] = tokens[i]
        return [seqs[i] for i in live], np.asarray(tokens, dtype=np.int64)[live], num_output[live] + 1
