"""Token-budgeted continuous batching over paged KV with shared prefixes and preemption.

Each step the scheduler hands out at most ``token_budget`` new tokens: first one chunk to every
running sequence (decode tokens, or the next chunk of a prefill), then it admits waiting sequences in
plan order. A sequence under a shared prefix is admitted only once that prefix is prefilled; it then
borrows the prefix's full KV blocks and gets a private copy of the prefix's last, partial block, so it
computes exactly the tokens after the prefix. When the pool runs dry, the newest running sequence is
preempted: its blocks are released and it is recomputed later (its generated tokens are kept).

A prefilled prefix cannot be preempted (its rows would all have to be), so a new shared prefix is
admitted only when the pool, after it, still holds the worst-case growth of every running row
(each up to ``max_new_tokens``): an idle prefix can then never starve the rows ahead of it.

Running sequences live in a ``BatchState`` (arrays, one slot each, in step order): a step's chunk
sizes, block growth and sample flags come from vectorised arithmetic over the slots, and Python
touches only the rows that change (a new block, an admission, a preemption, a finish).

A sampled token counts as soon as its step is launched (``after_step``), before its value reaches the
host: the engine may schedule the next step while the device still runs this one. ``finish`` comes
once the value is known; a row that has generated ``max_new_tokens`` is not scheduled again meanwhile.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from batchllm.scheduler.batch_state import BatchState
from batchllm.scheduler.block_pool import BlockPool, blocks_for
from batchllm.scheduler.seq import Seq, SeqKind
from batchllm.scheduler.step import Chunk, Step

__all__ = ["Chunk", "Scheduler", "Step"]


class Scheduler:
    def __init__(
        self, pool: BlockPool, block_size: int, token_budget: int, max_running: int, max_new_tokens: int
    ) -> None:
        self.pool = pool
        self.max_new_tokens = max_new_tokens
        self.block_size = block_size
        self.token_budget = token_budget
        self.max_running = max_running
        self.waiting: deque[Seq] = deque()
        self.batch = BatchState()
        self.live_prefixes: set[Seq] = set()  # prefilled prefixes whose rows are not all done
        self.num_preemptions = 0
        self.num_finished = 0

    @property
    def running(self) -> list[Seq]:
        self.batch.compact()
        return self.batch.seqs

    def add(self, seq: Seq) -> None:
        """Queue work in execution order (a prefix before the sequences beneath it)."""
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Step | None:
        """The next step: running sequences first, then waiting ones admitted in order. None: no
        sequence can run before the tokens of the step under way are known (see ``finish``)."""
        batch = self.batch
        batch.compact()
        query_lens = self._running_chunks()
        preempted = self._grow_running(query_lens)
        query_lens = query_lens[: len(batch)]
        budget = self.token_budget - int(query_lens.sum())
        copies: list[tuple[int, int]] = []
        admitted: list[int] = []
        while budget > 0 and not preempted and self.waiting and len(batch) < self.max_running:
            seq = self.waiting[0]
            if seq.parent is not None and not seq.parent.prefilled:
                break  # its prefix is still being prefilled; the next step admits it
            n = self._admit(seq, budget, copies)
            if n is None:
                break
            self.waiting.popleft()
            batch.add(seq)
            admitted.append(n)
            budget -= n
        query_lens = np.concatenate([query_lens, np.asarray(admitted, dtype=np.int64)])
        if query_lens.any():
            return self._step(query_lens, tuple(copies))
        if len(batch):
            return None  # every running row is on hold until its last sampled token comes back
        raise RuntimeError("scheduler made no progress: the KV pool is too small for one sequence")

    def after_step(self, step: Step) -> None:
        """The step is under way: its tokens count as computed and its sampled tokens as the rows'
        next ones; prefixes that are now whole become lendable."""
        batch, slots = self.batch, step.slots
        batch.num_computed[slots] = step.starts + step.query_lens
        batch.num_tokens[slots] += step.sample
        batch.from_prev[: len(batch)] = False
        batch.from_prev[slots] = step.sample
        batch.prev_index[slots[step.sample]] = np.arange(int(step.sample.sum()))
        done = ~(batch.is_row[slots] | batch.scores[slots])
        done &= batch.num_computed[slots] == batch.num_tokens[slots]
        for slot in slots[done]:
            seq = batch.seqs[slot]
            batch.remove(seq)
            seq.prefilled = True
            self.live_prefixes.add(seq)

    def finish(self, seq: Seq, reason: str) -> None:
        """A row is done: free its blocks and the prefixes no other row still needs."""
        seq.finish_reason = reason
        self.num_finished += 1
        if seq.slot is not None:
            self.batch.remove(seq)
        else:
            self.waiting.remove(seq)  # preempted while its last token was on its way
        self._release(seq)
        node = seq.parent
        while node is not None:
            self.release_prefix(node)
            node = node.parent

    def release_prefix(self, prefix: Seq) -> None:
        """One holder of ``prefix`` fewer (a row beneath it finished, or a worker that kept it for its
        later units no longer needs it); its blocks are freed when no holder is left."""
        prefix.pending_rows -= 1
        if prefix.pending_rows == 0:
            self.live_prefixes.discard(prefix)
            self._release(prefix)

    # -- internals -------------------------------------------------------------------------

    def _running_chunks(self) -> np.ndarray:
        """int64 [running]: each running sequence's chunk under the budget, in slot order."""
        b, n = self.batch, len(self.batch)
        need = b.num_tokens[:n] - b.num_computed[:n]
        need[b.is_row[:n] & (b.num_tokens[:n] - b.prompt_len[:n] >= self.max_new_tokens)] = 0
        before = np.cumsum(need) - need
        return np.clip(self.token_budget - before, 0, need)

    def _grow_running(self, query_lens: np.ndarray) -> bool:
        """Blocks for every running chunk, preempting the newest rows when the pool runs dry.
        True when something was preempted (the batch is then shorter than ``query_lens``)."""
        b, bs = self.batch, self.block_size
        n = len(b)
        wanted = -(-(b.num_computed[:n] + query_lens) // bs)
        short = np.flatnonzero(wanted > b.num_blocks[:n])
        counts = wanted[short] - b.num_blocks[short]
        blocks = self.pool.allocate(int(counts.sum()))
        if blocks is not None:  # the usual case: one allocation for every row that crossed a block
            b.append_block_runs(short, counts, blocks)
            return False
        preempted = False
        for slot in short:
            if slot >= len(b):
                break
            while (blocks := self.pool.allocate(int(wanted[slot] - b.num_blocks[slot]))) is None:
                preempted = True
                self._preempt(b.seqs[-1])
                if slot >= len(b):
                    break
            if blocks is not None:
                b.append_blocks(slot, blocks)
        return preempted

    def _step(self, query_lens: np.ndarray, copies: tuple[tuple[int, int], ...]) -> Step:
        b = self.batch
        n = int(np.count_nonzero(query_lens))
        whole = bool(query_lens[:n].all())  # the chunks are slots 0..n-1 unless a row is on hold
        slots = np.arange(n) if whole else np.flatnonzero(query_lens)
        take = slice(0, n) if whole else slots
        starts, query_lens = b.num_computed[take].copy(), query_lens[take]
        ends = starts + query_lens
        tail = ends == b.num_tokens[take]
        sample = b.is_row[take] & tail
        from_prev = b.from_prev[take]
        prefill = int(query_lens.sum()) - int((sample & (ends > b.prompt_len[take])).sum())
        groups = b.group_starts(take)
        shared = b.num_borrowed[take][groups]
        return Step(
            tuple(b.seqs[i] for i in slots) if not whole else tuple(b.seqs[:n]), slots, starts,
            query_lens, tail, sample, b.block_tables[take], b.last_token[take].copy(),
            (ends - b.prompt_len[take])[sample], np.flatnonzero(from_prev), b.prev_index[take][from_prev],
            groups, shared, copies, prefill, b.scores[take].copy() if b.scores[take].any() else None,
            bool(b.own_params[take][sample].any()),
        )  # fmt: skip

    def _preempt(self, seq: Seq) -> None:
        self.batch.remove(seq)
        self._release(seq)
        seq.num_computed = 0
        seq.preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _admit(self, seq: Seq, budget: int, copies: list[tuple[int, int]]) -> int | None:
        """Attach ``seq`` to its prefix and give it blocks for its first chunk; None if they don't fit."""
        start = seq.cached_tokens
        n = min(seq.num_tokens - start, budget)
        parent = seq.parent
        borrowed = parent.block_table[: start // self.block_size] if parent is not None else []
        own = blocks_for(start + n, self.block_size) - len(borrowed)
        if seq.kind is SeqKind.PREFIX:
            whole = blocks_for(seq.num_tokens, self.block_size) - len(borrowed)
            if self.pool.num_free - whole < self._running_growth():
                return None
        blocks = self.pool.allocate(own)
        if blocks is None:
            return None
        self.pool.retain(borrowed)
        seq.block_table = list(borrowed) + blocks
        seq.num_borrowed_blocks = len(borrowed)
        seq.num_computed = start
        if parent is not None and start % self.block_size:
            copies.append((parent.block_table[len(borrowed)], blocks[0]))
        return n

    def _running_growth(self) -> int:
        """Blocks the running sequences may still need: prefixes to their end, rows to max_new_tokens."""
        b, n = self.batch, len(self.batch)
        final = b.prompt_len[:n] + np.where(b.is_row[:n], self.max_new_tokens, 0)
        return int((-(-final // self.block_size) - b.num_blocks[:n])[b.alive[:n]].sum())

    def _release(self, seq: Seq) -> None:
        self.pool.release(seq.block_table)
        seq.block_table = []
        seq.num_borrowed_blocks = 0

    def check_invariants(self) -> None:
        """Reference counts equal the block-table entries of every live sequence."""
        self.pool.check_invariants()
        self.batch.check_invariants()
        expected = np.zeros(self.pool.num_blocks, dtype=np.int64)
        for seq in [*self.running, *self.live_prefixes]:
            table = self.batch.block_table(seq.slot) if seq.slot is not None else seq.block_table
            np.add.at(expected, table, 1)
            computed = self.batch.num_computed[seq.slot] if seq.slot is not None else seq.num_computed
            if len(table) < blocks_for(int(computed), self.block_size):
                raise AssertionError(f"sequence {seq.index} has fewer blocks than computed tokens")
        for seq in self.waiting:
            if seq.block_table:
                raise AssertionError(f"waiting sequence {seq.index} holds blocks")
        if not np.array_equal(expected, self.pool._refs):
            raise AssertionError("block reference counts disagree with the live block tables")
        if len(self.running) > self.max_running:
            raise AssertionError("more running sequences than max_running")
