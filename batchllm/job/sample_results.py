"""A unit's finished sequences gathered into rows when ``--n`` or ``--logprobs`` asks for more than the
usual columns: a row's N samples finish it together, and its extra columns are built at commit."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa

from batchllm.config import SamplingParams
from batchllm.engine.sampled import LogprobLog
from batchllm.io.faults import crash_point
from batchllm.io.sample_columns import extra_fields, logprobs_array, nested
from batchllm.job.counters import RowCounts
from batchllm.job.results import UnitResults
from batchllm.job.rows import RowBlock
from batchllm.scheduler.seq import Seq


class SampleGather:
    """Per output row of a unit: the text, finish reason, token count and logprobs of each sample."""

    def __init__(self, unit_rows: RowBlock, sampling: SamplingParams, tokenizer) -> None:
        self.n, self.k = sampling.n, sampling.logprobs
        self.fields = extra_fields(sampling)
        if unit_rows.sample is None:
            self.rows, self.row_of = unit_rows, np.arange(len(unit_rows))
        else:
            firsts = np.flatnonzero(unit_rows.sample == 0)
            self.rows = unit_rows.take(firsts)
            position = {r: i for i, r in enumerate(unit_rows.row_index[firsts].tolist())}
            self.row_of = np.asarray([position[r] for r in unit_rows.row_index.tolist()], dtype=np.int64)
        # each output row's own sample count (OpenAI requests: up to the job's n; --n: n for all)
        self.count = np.bincount(self.row_of, minlength=len(self.rows)).astype(np.int64)
        size = len(self.rows) * self.n
        self.text: list[str | None] = [None] * size
        self.reason: list[str] = ["error"] * size
        self.tokens = np.zeros(size, dtype=np.int32)
        self.logs: list[LogprobLog | None] = [None] * size
        self.errors: list[str | None] = [None] * size  # what is wrong with a sample's output (grammar)
        self.done = np.zeros(len(self.rows), dtype=np.int32)
        self._sample = unit_rows.sample  # each unit row's sample index (None: one sample per row)
        self._tokenizer, self._texts = tokenizer, {}

    def finish(
        self, unit_row: int, text: str, n_out: int, reason: str, log, error: str | None = None
    ) -> int | None:
        """Record one sample; returns its output row once all its samples are in, else None."""
        row = int(self.row_of[unit_row])
        slot = row * self.n + (0 if self._sample is None else int(self._sample[unit_row]))
        self.text[slot], self.reason[slot], self.tokens[slot], self.logs[slot] = text, reason, n_out, log
        self.errors[slot] = error
        self.done[row] += 1
        return row if self.done[row] == self.count[row] else None

    def copy(self, dup: int, rep: int) -> None:
        """A duplicate row (greedy, one sample) gets its representative's outputs."""
        for name in ("text", "reason", "logs", "errors"):
            getattr(self, name)[dup] = getattr(self, name)[rep]
        self.tokens[dup] = self.tokens[rep]

    def columns(self, rows: np.ndarray) -> dict[str, pa.Array]:
        """The extra columns of output ``rows`` (in that order), typed as ``extra_fields`` says."""
        counts = self.count[rows]
        within = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
        slots = np.repeat(np.asarray(rows, dtype=np.int64) * self.n, counts) + within
        out: dict[str, pa.Array] = {}
        if self.n > 1:
            out["outputs"] = self._nest(pa.array([self.text[s] for s in slots], pa.string()), counts)
            reasons = pa.array([self.reason[s] for s in slots], pa.string())
            out["finish_reasons"] = self._nest(reasons, counts)
            out["sample_output_tokens"] = self._nest(pa.array(self.tokens[slots]), counts)
        if self.k:
            logs = [self.logs[s] or LogprobLog(self.k, 1) for s in slots.tolist()]
            per_token = logprobs_array(logs, self._decode)
            totals = pa.array([log.total() for log in logs], pa.float64())
            many = self.n > 1
            out["output_logprobs"] = self._nest(per_token, counts) if many else per_token
            out["output_logprob"] = self._nest(totals, counts) if many else totals
        return out

    def summary(self, row: int) -> tuple[str | None, int, str]:
        """The row's usual columns: sample 0's text and finish reason, every sample's tokens."""
        first = row * self.n
        return self.text[first], int(self.tokens[first : first + self.count[row]].sum()), self.reason[first]

    def error(self, row: int) -> str | None:
        """The row's error: its first sample's that has one (named by its index when N > 1)."""
        for s in range(self.count[row]):
            error = self.errors[row * self.n + s]
            if error is not None:
                return error if self.count[row] == 1 else f"sample {s}: {error}"
        return None

    def _nest(self, values: pa.Array, counts: np.ndarray) -> pa.Array:
        return nested(values, counts, pa.list_(values.type))

    def _decode(self, ids: np.ndarray) -> list[str]:
        """Each id's text: the tokenizer's decoding of that single token (cached per id)."""
        texts = self._texts
        for i in set(ids.tolist()) - texts.keys():
            texts[i] = self._tokenizer.decode([i])
        return [texts[i] for i in ids.tolist()]


def gathering_finisher(
    gather: SampleGather,
    results: UnitResults,
    dups: dict[int, list[int]],
    stopper,
    on_rows: Callable[[RowCounts], None],
) -> Callable[[Seq], None]:
    """``UnitWorker``'s row finisher when samples or logprobs are gathered: a row finishes (and may
    commit) once its last sample does."""

    def on_finish(seq: Seq) -> None:
        text, reason = stopper.text(seq.output_ids, seq.params), seq.finish_reason
        row = gather.finish(seq.index, text, seq.num_output, reason, seq.logprobs, seq.error)
        if row is None:
            return
        text, n_out, reason = gather.summary(row)
        error = gather.error(row)
        counts = results.finish(row, text, n_out, seq.cached_tokens, reason, error)
        for dup in dups.get(row, ()):
            gather.copy(dup, row)
            cached = int(gather.rows.prompt_tokens[dup])
            counts.add(results.finish(dup, text, n_out, cached, reason, error))
        results.maybe_commit()
        on_rows(counts)
        crash_point("row")

    return on_finish
