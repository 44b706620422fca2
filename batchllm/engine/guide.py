"""Structured output in the step loop: each constrained row's mask before sampling, its matcher
advanced at retire, and jump-forward.

    launch step n:   mask(step)       one packed bitmask [sampled rows, words] built on the host for
                                      the step's rows (all bits set for unconstrained ones), applied
                                      on the device in the sampler with one op
    retire step n:   advance(...)     each constrained row's matcher takes its sampled token; then the
                                      tokens the grammar forces (llguidance's fast-forward tokens) are
                                      appended without sampling: the next step computes them, with
                                      the sampled token, as one prefill chunk of the row
                     settle(...)      a row whose grammar is complete ends ("stop"); one whose budget
                                      ran out first ends "length" with an error: its output is cut

A row's mask for step n+1 needs step n's token, so the engine runs without overlap while any
constrained row is in its work (see ``engine.loop``): simple, and correct by construction.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from batchllm.engine.constraints import GrammarCache, RowConstraint, fill_mask
from batchllm.scheduler.batch_state import BatchState
from batchllm.scheduler.seq import Seq
from batchllm.scheduler.step import Step


class Guide:
    """The constrained rows' side of the loop, and its counts (rows, masked steps, forced tokens)."""

    def __init__(self, cache: GrammarCache, max_new_tokens: int, jump_forward: bool = True) -> None:
        self.cache = cache
        self.max_new_tokens = max_new_tokens
        # Off (tests, benchmarks): each forced token is decoded in a step of its own, its mask allowing
        # only it, so the output is the same token for token, in more steps.
        self.jump_forward = jump_forward
        self._bitmask = cache.allocate_bitmask(64)
        self.constrained_rows = 0
        self.masked_steps = 0
        self.forced_tokens = 0

    def start(self, seq: Seq) -> None:
        """A new row: the tokens its grammar forces before anything is sampled join its output (they
        are prefilled with its prompt). At least one token is left to sample."""
        self.constrained_rows += 1
        if self.jump_forward:
            self._append_forced(seq, self.max_new_tokens - 1)

    def mask(self, step: Step) -> torch.Tensor | None:
        """The allowed tokens of the step's sampled rows (CPU int32 [rows, words]), or None when none
        of them is constrained."""
        constraints = [seq.constraint for seq in step.sampled_seqs]
        if not any(c is not None for c in constraints):
            return None
        if self._bitmask.shape[0] < len(constraints):
            self._bitmask = self.cache.allocate_bitmask(2 * len(constraints))
        rows = self._bitmask[: len(constraints)]
        fill_mask(constraints, rows)
        if not self.jump_forward:
            _only_forced(constraints, rows)
        self.masked_steps += 1
        return rows

    def forced_in_step(self, step: Step) -> int:
        """Forced tokens that ``step`` computes (the scheduler counts them as prefill): in each sampled
        row's chunk, the tokens after the prompt beyond the one sampled before (rows recomputed after
        a preemption aside)."""
        ends = step.starts + step.query_lens
        forced = 0
        for i in np.flatnonzero(step.sample).tolist():
            seq = step.seqs[i]
            if seq.constraint is not None and not seq.preemptions:
                forced += max(0, int(ends[i]) - max(int(step.starts[i]), seq.prompt_len) - 1)
        return forced

    def advance(self, seqs: Sequence[Seq], tokens: np.ndarray, batch: BatchState) -> np.ndarray:
        """Constrained rows take their sampled token (already appended to ``seqs``), then their forced
        tokens. Returns int64 [rows]: tokens each row has generated now."""
        for seq, token in zip(seqs, tokens.tolist()):
            constraint: RowConstraint | None = seq.constraint
            if constraint is None:
                continue
            if not constraint.accept(token):
                seq.error = f"structured output: {constraint.error or 'the grammar rejected a token'}"
                continue
            added = self._append_forced(seq, self.max_new_tokens - seq.num_output) if self.jump_forward else 0
            if added and seq.slot is not None:
                batch.num_tokens[seq.slot] += added
                batch.last_token[seq.slot] = seq.token_ids[-1]
        return np.fromiter((seq.num_output for seq in seqs), dtype=np.int64, count=len(seqs))

    def settle(self, seqs: Sequence[Seq], reasons: dict[int, str]) -> None:
        """Finish reasons of the constrained rows, in place: "stop" once the grammar is complete,
        "error" for a rejected token, and an error on a row cut by ``max_new_tokens``."""
        for i, seq in enumerate(seqs):
            constraint: RowConstraint | None = seq.constraint
            if constraint is None:
                continue
            if seq.error is not None:
                reasons[i] = "error"
            elif i not in reasons and constraint.is_done():
                reasons[i] = "stop"
            elif reasons.get(i) == "length" and not constraint.can_stop():
                limit = seq.params.max_new_tokens if seq.params is not None else self.max_new_tokens
                seq.error = (
                    f"output incomplete: {constraint.spec.kind} not complete within max_new_tokens={limit}"
                )

    def take_counts(self) -> tuple[int, int, int]:
        """(constrained rows, masked steps, forced tokens) since the last call; the counts restart."""
        counts = (self.constrained_rows, self.masked_steps, self.forced_tokens)
        self.constrained_rows = self.masked_steps = self.forced_tokens = 0
        return counts

    def _append_forced(self, seq: Seq, room: int) -> int:
        """Append up to ``room`` tokens the grammar forces next; returns how many."""
        constraint: RowConstraint = seq.constraint
        if room <= 0 or constraint.is_done():
            return 0
        forced = constraint.forced_tokens()[:room]
        for token in forced:
            constraint.accept(token)
        seq.token_ids.extend(forced)
        self.forced_tokens += len(forced)
        return len(forced)


def _only_forced(constraints: Sequence[RowConstraint | None], rows: torch.Tensor) -> None:
    """Where a row's grammar forces its next tokens, allow only the first of them."""
    for i, constraint in enumerate(constraints):
        forced = constraint.forced_tokens() if constraint is not None else []
        if forced:
            rows[i] = 0
            word, bit = divmod(forced[0], 32)
            rows[i, word] = (1 << bit) if bit < 31 else -(1 << 31)  # int32: bit 31 is the sign
