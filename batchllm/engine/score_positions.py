"""Where a step reads log-probs for SCORE sequences (``--choices``, ``--score-column``).

A SCORE sequence holds ``prompt + continuation[:-1]`` (``score_start`` = len(prompt)); the last
continuation token is kept aside (``score_last``): nothing reads its KV, so it is never computed.
The logits at position ``p`` give the log-prob of continuation token ``p + 1``::

    token_ids:  [ prompt ......................... | continuation less its last token ]
    scored positions:            score_start-1 ... num_tokens-1   (one per continuation token)

A chunk ``[start, start + query_len)`` scores the positions it shares with that range (a long
continuation may be split over several steps by the token budget; recomputation after preemption
writes the same values again). Everything here is host arithmetic over the step's arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from batchllm.scheduler.step import Step


@dataclass(frozen=True)
class ScoreSpans:
    """Per scored chunk of a step: its step row, first scored position and how many it scores."""

    rows: np.ndarray  # int64 [k] index among the step's sequences
    first: np.ndarray  # int64 [k] first position scored in this chunk
    counts: np.ndarray  # int64 [k] positions scored in this chunk (>= 1)

    def token_rows(self, query_start_loc: np.ndarray, starts: np.ndarray) -> np.ndarray:
        """int64 [sum counts]: each scored position's index among the step's flattened tokens."""
        base = query_start_loc[self.rows].astype(np.int64) + self.first - starts[self.rows]
        return _ragged_arange(base, self.counts)

    def targets(self, step: Step) -> np.ndarray:
        """int64 [sum counts]: the token each scored position's logits are scored against."""
        out = np.empty(int(self.counts.sum()), dtype=np.int64)
        offset = 0
        for row, first, count in zip(self.rows.tolist(), self.first.tolist(), self.counts.tolist()):
            seq = step.seqs[row]
            known = seq.token_ids[first + 1 : first + 1 + count]  # short by one at the sequence's end
            out[offset : offset + len(known)] = known
            if len(known) < count:
                out[offset + count - 1] = seq.score_last
            offset += count
        return out


def score_spans(step: Step) -> ScoreSpans | None:
    """The step's scored chunks; None when it has none."""
    if step.scoring is None:
        return None
    rows = np.flatnonzero(step.scoring)
    score_start = np.asarray([step.seqs[i].score_start for i in rows.tolist()], dtype=np.int64)
    num_tokens = np.asarray([step.seqs[i].num_tokens for i in rows.tolist()], dtype=np.int64)
    starts = step.starts[rows]
    first = np.maximum(starts, score_start - 1)
    end = np.minimum(starts + step.query_lens[rows], num_tokens)
    keep = end > first
    if not keep.any():
        return None
    return ScoreSpans(rows[keep], first[keep], (end - first)[keep])


def _ragged_arange(starts: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    ends = np.cumsum(sizes)
    return np.repeat(starts - (ends - sizes), sizes) + np.arange(int(ends[-1]), dtype=np.int64)
