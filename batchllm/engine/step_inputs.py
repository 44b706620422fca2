"""A step's model inputs as host arrays, by vectorised arithmetic over the step's rows.

Only rows whose chunk is more than the one token at their tail (prefill chunks) read Python token
lists; a decode row's input is its last token, kept in the batch state (or, while it is still on the
device, patched in there by the model runner)::

    query_start_loc:  0, q0, q0+q1, ...           row i's tokens are [qsl[i], qsl[i+1])
    positions:        starts[i] .. starts[i]+q[i]-1 for each row, flattened
    slot_mapping:     tables[i, pos // block_size] * block_size + pos % block_size
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from batchllm.engine.score_positions import ScoreSpans
from batchllm.scheduler.step import Step


@dataclass(frozen=True)
class StepInputs:
    input_ids: np.ndarray  # int64 [T]
    positions: np.ndarray  # int64 [T]
    slot_mapping: np.ndarray  # int64 [T]
    query_start_loc: np.ndarray  # int32 [n + 1]
    seq_lens: np.ndarray  # int32 [n]
    block_tables: np.ndarray  # int32 [n, width]
    logit_rows: np.ndarray  # int64 [num sampled], the token whose hidden state gives each row's logits
    group_start_loc: np.ndarray | None  # int32 [groups + 1], decode steps only
    shared_blocks: np.ndarray | None  # int32 [groups]
    score_rows: np.ndarray | None = None  # int64 [scored], tokens whose logits score the next token
    score_targets: np.ndarray | None = None  # int64 [scored], the token each of them scores

    def host_arrays(self) -> dict[str, np.ndarray]:
        """Every array that goes to the device, by field name."""
        return {k: v for k, v in vars(self).items() if v is not None}


def step_inputs(step: Step, block_size: int, spans: ScoreSpans | None = None) -> StepInputs:
    q, starts = step.query_lens, step.starts
    n = len(q)
    qsl = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(q, out=qsl[1:])
    total = int(qsl[-1])
    if total == n:  # one token each: no repeats needed
        rows, positions = np.arange(n), starts
    else:
        rows = np.repeat(np.arange(n), q)
        positions = np.arange(total, dtype=np.int64) + np.repeat(starts - qsl[:-1], q)
    tables = np.ascontiguousarray(step.tables)
    slots = tables[rows, positions // block_size].astype(np.int64) * block_size + positions % block_size
    ends = qsl[1:].astype(np.int64) - 1
    groups = shared = None
    # Decode groups: the kernels' cascade path runs in one-token steps. Not for a step that scores
    # (one-token choices): its groups are a row's few choices, too small for the cascade to pay.
    if total == n and step.scoring is None:
        groups = np.append(step.group_starts, np.int32(n)).astype(np.int32)
        shared = step.shared_blocks.astype(np.int32)
    score_rows = spans.token_rows(qsl, starts) if spans is not None else None
    return StepInputs(
        _input_ids(step, qsl, total), positions, slots, qsl, (starts + q).astype(np.int32), tables,
        ends[step.sample], groups, shared, score_rows, spans.targets(step) if spans is not None else None,
    )  # fmt: skip


def _input_ids(step: Step, qsl: np.ndarray, total: int) -> np.ndarray:
    ids = np.empty(total, dtype=np.int64)
    tail_only = step.tail & (step.query_lens == 1)
    ids[qsl[1:][tail_only] - 1] = step.last_tokens[tail_only]
    for i in np.flatnonzero(~tail_only):  # prefill chunks: their tokens are all on the host
        start = int(step.starts[i])
        ids[qsl[i] : qsl[i + 1]] = step.seqs[i].token_ids[start : start + int(step.query_lens[i])]
    return ids
