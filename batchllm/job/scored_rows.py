"""A scoring unit's rows, put together as their SCORE sequences finish (one per continuation)."""

from __future__ import annotations

import math
from collections.abc import Iterable

from batchllm.config import ScoringParams
from batchllm.job.counters import RowCounts
from batchllm.job.results import UnitResults
from batchllm.job.scoring import row_score
from batchllm.job.units import WorkUnit
from batchllm.scheduler.seq import Seq


class ScoredRows:
    """Token log-probs per row and continuation; a row is finished once all of them are in."""

    def __init__(self, unit: WorkUnit, params: ScoringParams) -> None:
        self.unit, self.params = unit, params
        self._logprobs: dict[int, list[list[float] | None]] = {}

    def add(self, seq: Seq) -> bool:
        """Record a finished SCORE sequence; True when its row has every continuation scored."""
        got = self._logprobs.setdefault(seq.index, [None] * len(self.unit.continuations[seq.index]))
        if any(math.isnan(v) for v in seq.scored):
            raise RuntimeError(f"row {seq.index}: a continuation token was never scored")
        got[seq.choice] = seq.scored
        return all(g is not None for g in got)

    def finish(self, row: int, results: UnitResults, dups: Iterable[int]) -> RowCounts:
        """Record the row (and the rows that copy it) in ``results``; returns their counts."""
        text, columns = row_score(self.params, self.unit.continuations[row].texts, self._logprobs.pop(row))
        unit = self.unit
        cached = len(unit.node_tokens[int(unit.row_node[row])])  # borrowed from the plan's prefixes
        counts = results.finish(row, text, 0, cached, "scored")
        results.extra[row] = columns
        for dup in dups:
            counts.add(results.finish(dup, text, 0, int(unit.rows.prompt_tokens[dup]), "scored"))
            results.extra[dup] = columns
        return counts
