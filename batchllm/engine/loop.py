"""The step loop: schedule -> launch the model -> (next step) -> retire: sampled tokens join their
rows, rows that stop are finished, until the work is done.

With ``overlap`` (the default on CUDA) step n+1 is scheduled, prepared and launched while the device
still runs step n; only then does the loop read step n's sampled tokens, its one device->host sync.
A row that stops at step n has then run one more token in step n+1; that token is dropped. Without
overlap (the CPU) the same code retires each step right after launching it.

Structured output (a ``Guide``): a constrained row's mask for step n+1 needs step n's token, so a run
whose work holds any constrained row runs without overlap; its forced tokens (jump-forward) join the
row at retire and are computed in the next step.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from batchllm.engine.guide import Guide
from batchllm.engine.model_runner import ModelRunner, StepOutput
from batchllm.engine.sampled import LogprobLog, Sampled, StepLogprobs
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
    constrained_rows: int = 0  # rows with an output grammar
    masked_steps: int = 0  # steps that applied a grammar mask
    forced_tokens: int = 0  # tokens a grammar forced (jump-forward), appended without sampling

    def add(self, other: EngineStats) -> None:
        self.steps += other.steps
        self.prefill_tokens += other.prefill_tokens
        self.decode_tokens += other.decode_tokens
        self.scored_tokens += other.scored_tokens
        self.prompt_step_seconds += other.prompt_step_seconds
        self.decode_step_seconds += other.decode_step_seconds
        self.kv_samples.extend(other.kv_samples)
        self.constrained_rows += other.constrained_rows
        self.masked_steps += other.masked_steps
        self.forced_tokens += other.forced_tokens

    def count_forced(self, tokens: int) -> None:
        """``tokens`` of a counted step were output a grammar forced, not prompt: count them as decode."""
        self.prefill_tokens -= tokens
        self.decode_tokens += tokens

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
    sampled: Sampled  # its tokens (int64 [rows sampled]) on the device, and logprobs if asked for
    epoch: int  # the batch state's epoch after the step was launched: its slots are valid while equal
    finished: int  # rows finished before the step was launched
    output: StepOutput | None = None  # the step's scored log-probs, if it scores anything


class Engine:
    def __init__(
        self,
        scheduler: Scheduler,
        runner: ModelRunner,
        stopper: StopChecker,
        overlap: bool | None = None,
        guide: Guide | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.runner = runner
        self.stopper = stopper
        self.guide = guide
        self.overlap = runner.device.type == "cuda" if overlap is None else overlap
        # Nothing reads a running row's token list (no stop strings or grammars): sampled tokens may
        # wait in the batch state and join the lists a few dozen at a time (``BatchState.defer_tokens``).
        self._lists_unread = guide is None and not stopper.params.stop
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
        overlap = self.overlap
        for seq in work:
            if seq.constraint is not None:
                self.guide.start(seq)
                overlap = False
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
            mask = self.guide.mask(step) if self.guide is not None else None
            output = self.runner.launch_step(step, pending.sampled.tokens if pending else None, mask)
            sched.after_step(step)
            launched = Launched(step, output.sampled, sched.batch.epoch, sched.num_finished, output)
            if pending is not None:
                self._retire(pending, on_finish)
            pending = launched
            if not overlap:
                self._retire(launched, on_finish)
                pending = None
            self.stats.count(step, time.perf_counter() - t0, sched.pool.num_used)
            if self.guide is not None:
                self.stats.count_forced(self.guide.forced_in_step(step))
        if pending is not None:
            self._retire(pending, on_finish)
        self._count_guide()
        return self.stats

    def _count_guide(self) -> None:
        """Add what the guide counted during this run to the run's stats."""
        if self.guide is not None:
            rows, masked, forced = self.guide.take_counts()
            self.stats.constrained_rows += rows
            self.stats.masked_steps += masked
            self.stats.forced_tokens += forced

    def _retire(self, launched: Launched, on_finish: Callable[[Seq], None]) -> None:
        """Each sampled token joins its row (rows finished meanwhile drop theirs); rows that now stop
        are finished."""
        host = launched.sampled.read_all()  # the step's one device->host sync (scored log-probs too)
        tokens, logprobs = host.tokens, host.logprobs
        step, sched = launched.step, self.scheduler
        seqs = step.sampled_seqs
        if sched.num_finished == launched.finished and sched.batch.epoch == launched.epoch:
            # No row left meanwhile: the step's slots still hold.
            tokens_array = np.asarray(tokens, dtype=np.int64)
            slots = step.slots[step.sample]
            if self._lists_unread and logprobs is None and not step.own_params:
                sched.batch.defer_tokens(slots, tokens_array)
            else:
                for seq, token in zip(seqs, tokens):
                    seq.token_ids.append(token)
            sched.batch.last_token[slots] = tokens_array
            num_output = step.num_output + 1
            live = range(len(seqs))
        else:
            live = [i for i, seq in enumerate(seqs) if seq.finish_reason is None]
            seqs, tokens_array, num_output = self._append_to_live(seqs, tokens, step.num_output, live)
        if logprobs is not None:
            _record_logprobs(seqs, [tokens[i] for i in live], logprobs, live)
        if self.guide is not None:
            num_output = self.guide.advance(seqs, tokens_array, sched.batch)
        reasons = self.stopper.check_seqs(tokens_array, num_output, seqs, step.own_params)
        if self.guide is not None:
            self.guide.settle(seqs, reasons)
        for i, reason in reasons.items():
            sched.finish(seqs[i], reason)
            on_finish(seqs[i])
        if launched.step.scoring is not None:
            self._retire_scored(launched, host.scored, on_finish)

    def _retire_scored(
        self, launched: Launched, values: list[float] | None, on_finish: Callable[[Seq], None]
    ) -> None:
        """Scored log-probs join their SCORE sequences; one whose chunk reached its end is finished
        ("scored"): it never decodes."""
        step, output = launched.step, launched.output
        spans = output.spans if output is not None else None
        if spans is not None:
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
        self, seqs: list[Seq], tokens: list[int], num_output: np.ndarray, live: list[int]
    ) -> tuple[list[Seq], np.ndarray, np.ndarray]:
        """The slow path of ``_retire``: rows finished since the launch (all but ``live``) drop their
        token, and each row's slot is looked up again. Returns the live rows, their tokens and counts."""
        batch = self.scheduler.batch
        slots = [seqs[i].slot for i in live if seqs[i].slot is not None]
        batch.flush_tokens(np.asarray(slots, dtype=np.int64))  # a row's held tokens come before this one
        for i in live:
            seq = seqs[i]
            seq.token_ids.append(tokens[i])
            if seq.slot is not None:  # a preempted row has none
                batch.last_token[seq.slot] = tokens[i]
        return [seqs[i] for i in live], np.asarray(tokens, dtype=np.int64)[live], num_output[live] + 1


def _record_logprobs(seqs: list[Seq], tokens: list[int], step: StepLogprobs, index) -> None:
    """Each live row keeps its new token's logprobs (``index``: their positions among the step's rows)."""
    k = step.top_ids.shape[1]
    for seq, token, i in zip(seqs, tokens, index):
        if seq.logprobs is None:
            seq.logprobs = LogprobLog(k)
        seq.logprobs.append(token, step, i)
