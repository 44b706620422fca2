"""The running sequences as arrays, one slot each, in step order: a step reads them by slicing.

Slot ``i`` holds ``seqs[i]``. Rows are added at the end (admission), appended to (a KV block, a
token), and removed (finished, preempted, a prefix prefilled); a removal only marks the slot, and the
next ``compact()`` closes the holes in one vectorised move that keeps the order. So per-step work is
proportional to the rows that changed, never a rebuild of every row from Python lists::

    slot:          0      1      2     ...  n-1   | spare capacity
    block_tables:  [own row of block ids, 0-padded to the table width]
    num_tokens:    tokens the row has, counting a sampled token still on its way to the host
    num_computed:  tokens whose KV is in the cache
    pending:       sampled tokens not yet appended to the row's ``token_ids`` (``defer_tokens``)
"""

from __future__ import annotations

import numpy as np

from batchllm.scheduler.seq import Seq, SeqKind

_COLUMNS = {  # per-slot arrays: name -> dtype
    "num_blocks": np.int32,  # entries of the slot's block-table row in use
    "num_borrowed": np.int32,  # leading blocks retained from the parent prefix
    "num_computed": np.int64,
    "num_tokens": np.int64,
    "prompt_len": np.int64,
    "last_token": np.int64,  # token_ids[num_tokens - 1] once the host knows it
    "parent_key": np.int64,  # rows of one parent share it; 0: no parent
    "is_row": np.bool_,
    "scores": np.bool_,  # a SCORE sequence: its tail is computed for log-probs, never sampled
    "own_params": np.bool_,  # the row has sampling settings of its own (Seq.params)
    "alive": np.bool_,
    "from_prev": np.bool_,  # its next input is a token the previous step sampled (maybe still on device)
    "prev_index": np.int64,  # that token's index among the previous step's sampled tokens
    "num_pending": np.int32,  # tokens of the slot waiting in ``pending``
}
# Sampled tokens a row holds back before they join its token list: one Python append per row every
# this many steps instead of every step.
DEFER_TOKENS = 32


class BatchState:
    def __init__(self, capacity: int = 64, width: int = 8) -> None:
        self.seqs: list[Seq] = []
        self.block_tables = np.zeros((capacity, width), dtype=np.int32)
        self.pending = np.zeros((capacity, DEFER_TOKENS), dtype=np.int64)
        for name, dtype in _COLUMNS.items():
            setattr(self, name, np.zeros(capacity, dtype=dtype))
        self._holes = False
        self.epoch = 0  # counts compactions: slots taken before and after one differ
        self._parent_keys: dict[int, int] = {}  # id(parent) -> a small key, stable while it lives

    def __len__(self) -> int:
        return len(self.seqs)

    # -- rows in and out -------------------------------------------------------------------

    def add(self, seq: Seq) -> int:
        """``seq`` (its block table already set) takes the next slot; returns the slot."""
        slot = len(self.seqs)
        self._reserve(slot + 1, len(seq.block_table))
        self.seqs.append(seq)
        seq.slot = slot
        self.block_tables[slot, : len(seq.block_table)] = seq.block_table
        self.num_blocks[slot] = len(seq.block_table)
        self.num_borrowed[slot] = seq.num_borrowed_blocks
        self.num_computed[slot] = seq.num_computed
        self.num_tokens[slot] = seq.num_tokens
        self.prompt_len[slot] = seq.prompt_len
        self.last_token[slot] = seq.token_ids[-1]
        self.parent_key[slot] = self._parent_key(seq.parent)
        self.is_row[slot] = seq.is_row
        self.scores[slot] = seq.kind is SeqKind.SCORE
        self.own_params[slot] = seq.params is not None
        self.alive[slot] = True
        self.from_prev[slot] = False
        self.num_pending[slot] = 0
        return slot

    def append_blocks(self, slot: int, blocks: list[int]) -> None:
        have = int(self.num_blocks[slot])
        self._reserve(len(self.seqs), have + len(blocks))
        self.block_tables[slot, have : have + len(blocks)] = blocks
        self.num_blocks[slot] = have + len(blocks)

    def append_block_runs(self, slots: np.ndarray, counts: np.ndarray, blocks: list[int]) -> None:
        """``append_blocks`` for many slots at once: slot ``slots[i]`` gets the next ``counts[i]`` of
        ``blocks``, in order."""
        have = self.num_blocks[slots].astype(np.int64)
        self._reserve(len(self.seqs), int((have + counts).max(initial=0)))
        rows = np.repeat(slots, counts)
        firsts = np.cumsum(counts) - counts
        cols = np.repeat(have - firsts, counts) + np.arange(len(rows))
        self.block_tables[rows, cols] = blocks
        self.num_blocks[slots] = have + counts

    def defer_tokens(self, slots: np.ndarray, tokens: np.ndarray) -> None:
        """Each slot's newly sampled token, held in ``pending`` instead of its row's ``token_ids`` until
        ``DEFER_TOKENS`` have gathered or the row leaves. Only for rows whose token lists nobody reads
        while they run (no stop strings, grammar or logprobs: the engine decides)."""
        held = self.num_pending[slots]
        self.pending[slots, held] = tokens
        self.num_pending[slots] = held + 1
        full = slots[held + 1 == DEFER_TOKENS]
        if len(full):
            self.flush_tokens(full)

    def flush_tokens(self, slots: np.ndarray) -> None:
        """The pending tokens of ``slots`` join their rows' token lists."""
        held = self.num_pending[slots]
        for slot, count, ids in zip(slots.tolist(), held.tolist(), self.pending[slots].tolist()):
            if count:
                self.seqs[slot].token_ids.extend(ids[:count])
        self.num_pending[slots] = 0

    def remove(self, seq: Seq) -> None:
        """Take ``seq`` out; its slot becomes a hole until ``compact()``. Writes its counts (and its
        pending tokens) back."""
        slot = seq.slot
        self.flush_tokens(np.array([slot]))
        seq.num_computed = int(self.num_computed[slot])
        seq.block_table = self.block_table(slot)
        seq.slot = None
        self.alive[slot] = False
        if slot == len(self.seqs) - 1:
            self.seqs.pop()  # the newest row (a preemption victim): no hole
        else:
            self._holes = True

    def compact(self) -> None:
        """Close the holes left by removals, keeping the order of the rows that remain."""
        if not self._holes:
            return
        n = len(self.seqs)
        keep = np.flatnonzero(self.alive[:n])
        first = int(np.argmin(self.alive[:n])) if len(keep) < n else n
        for name in (*_COLUMNS, "block_tables", "pending"):
            array = getattr(self, name)
            array[: len(keep)] = array[keep]
        self.alive[len(keep) : n] = False
        self.seqs = [self.seqs[i] for i in keep]
        for slot in range(first, len(self.seqs)):
            self.seqs[slot].slot = slot
        self._holes = False
        self.epoch += 1

    # -- reading -----------------------------------------------------------------------------

    def block_table(self, slot: int) -> list[int]:
        return self.block_tables[slot, : self.num_blocks[slot]].tolist()

    def group_starts(self, slots: slice | np.ndarray) -> np.ndarray:
        """int32: positions among ``slots`` that start a run of rows under the same parent."""
        keys = self.parent_key[slots]
        new = np.ones(len(keys), dtype=bool)
        new[1:] = (keys[1:] == 0) | (keys[1:] != keys[:-1])
        return np.flatnonzero(new).astype(np.int32)

    def check_invariants(self) -> None:
        n = len(self.seqs)
        for slot, seq in enumerate(self.seqs):
            if not self.alive[slot]:
                continue
            if seq.slot != slot:
                raise AssertionError(f"sequence {seq.index} thinks it is in slot {seq.slot}, not {slot}")
            if self.num_computed[slot] > self.num_tokens[slot]:
                raise AssertionError(f"slot {slot} computed more tokens than it has")
            if not 0 <= self.num_pending[slot] < DEFER_TOKENS:
                raise AssertionError(f"slot {slot} holds {self.num_pending[slot]} pending tokens")
        if self.alive[n:].any():
            raise AssertionError("a slot past the running rows is marked alive")

    # -- internals ---------------------------------------------------------------------------

    def _reserve(self, rows: int, width: int) -> None:
        """Grow the arrays (doubling) so ``rows`` slots of ``width`` blocks fit."""
        capacity, have_width = self.block_tables.shape
        if rows <= capacity and width <= have_width:
            return
        capacity, new_width = max(capacity, 1), max(have_width, 1)
        while capacity < rows:
            capacity *= 2
        while new_width < width:
            new_width *= 2
        tables = np.zeros((capacity, new_width), dtype=np.int32)
        tables[: len(self.block_tables), :have_width] = self.block_tables
        self.block_tables = tables
        pending = np.zeros((capacity, DEFER_TOKENS), dtype=np.int64)
        pending[: len(self.pending)] = self.pending
        self.pending = pending
        for name, dtype in _COLUMNS.items():
            column = np.zeros(capacity, dtype=dtype)
            old = getattr(self, name)
            column[: len(old)] = old
            setattr(self, name, column)

    def _parent_key(self, parent: Seq | None) -> int:
        if parent is None:
            return 0
        return self._parent_keys.setdefault(id(parent), len(self._parent_keys) + 1)
