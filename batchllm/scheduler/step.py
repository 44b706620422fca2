"""What one engine step computes, as arrays over the step's sequences (slots ``0..n-1`` in order)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from batchllm.scheduler.seq import Seq


@dataclass(frozen=True)
class Chunk:
    seq: Seq
    start: int  # first position computed in this step (== seq.num_computed at schedule time)
    num_tokens: int
    sample: bool  # a row reaches its last known token: sample the next one

    @property
    def end(self) -> int:
        return self.start + self.num_tokens


@dataclass(frozen=True, eq=False)
class Step:
    """Sequence ``i`` computes positions ``starts[i] .. starts[i] + query_lens[i] - 1``::

        seqs:        the step's sequences, in batch-slot order
        slots:       int64 [n]  their batch slots at schedule time (0..n-1 unless a row is on hold)
        starts:      int64 [n]  tokens already in the KV cache
        query_lens:  int64 [n]  new tokens this step (>= 1)
        tail:        bool  [n]  the chunk ends at the sequence's last token
        sample:      bool  [n]  tail, and a row: sample the next token
        tables:      int32 [n, width]  block tables (a view of the batch state at schedule time)

    ``chunks`` gives the same as objects, for tests and debugging; the engine reads the arrays.
    """

    seqs: tuple[Seq, ...]
    slots: np.ndarray
    starts: np.ndarray
    query_lens: np.ndarray
    tail: np.ndarray
    sample: np.ndarray
    tables: np.ndarray
    last_tokens: np.ndarray  # int64 [n], the token at position num_tokens - 1 where the host knows it
    num_output: np.ndarray  # int64 [num sampled], tokens a sampled row has generated before this step
    prev_rows: np.ndarray  # int64, rows whose input is a token the previous step sampled ...
    prev_index: np.ndarray  # int64, ... at these indices among that step's sampled tokens
    group_starts: np.ndarray  # int32, step rows starting a run of rows under one parent
    shared_blocks: np.ndarray  # int32, borrowed blocks of each such run
    block_copies: tuple[tuple[int, int], ...]  # (src, dst): partial prefix blocks copied before the step
    prefill_tokens: int  # tokens computed for prompts (or recomputed after preemption), not decode
    scoring: np.ndarray | None = None  # bool [n]: SCORE sequences (see engine.score_positions); None: none
    own_params: bool = False  # some sampled row has settings of its own (Seq.params)

    @property
    def num_seqs(self) -> int:
        return len(self.seqs)

    @property
    def num_tokens(self) -> int:
        return int(self.query_lens.sum())

    @property
    def one_token_each(self) -> bool:
        return bool((self.query_lens == 1).all())

    @property
    def sampled_seqs(self) -> list[Seq]:
        if self.sample.all():
            return list(self.seqs)
        return [self.seqs[i] for i in np.flatnonzero(self.sample)]

    @property
    def chunks(self) -> tuple[Chunk, ...]:
        return tuple(
            Chunk(seq, int(s), int(q), bool(x))
            for seq, s, q, x in zip(self.seqs, self.starts, self.query_lens, self.sample)
        )
