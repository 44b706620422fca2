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
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from batchllm.scheduler.block_pool import BlockPool, blocks_for
from batchllm.scheduler.seq import Seq, SeqKind


@dataclass(frozen=True)
class Chunk:
    seq: Seq
    start: int  # first position computed in this step (== seq.num_computed at schedule time)
    num_tokens: int
    sample: bool  # a row reaches its last known token: sample the next one

    @property
    def end(self) -> int:
        return self.start + self.num_tokens


@dataclass(frozen=True)
class Step:
    """What one engine step computes: a chunk of new tokens for each of its sequences."""

    chunks: tuple[Chunk, ...]
    block_copies: tuple[tuple[int, int], ...]  # (src, dst): partial prefix blocks copied before the step
    prefill_tokens: int  # tokens computed for prompts (or recomputed after preemption), not decode


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
        self.running: list[Seq] = []
        self.live_prefixes: set[Seq] = set()  # prefilled prefixes whose rows are not all done
        self.num_preemptions = 0

    def add(self, seq: Seq) -> None:
        """Queue work in execution order (a prefix before the sequences beneath it)."""
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Step:
        """The next step: running sequences first, then waiting ones admitted in order."""
        budget = self.token_budget
        chunks: list[Chunk] = []
        copies: list[tuple[int, int]] = []
        preemptions_before = self.num_preemptions
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed, budget)
            if self._grow_or_preempt(seq, seq.num_computed + n):  # victims come from the end
                chunks.append(self._chunk(seq, n))
                budget -= n
                i += 1
        preempted = self.num_preemptions > preemptions_before
        while budget > 0 and not preempted and self.waiting and len(self.running) < self.max_running:
            seq = self.waiting[0]
            if seq.parent is not None and not seq.parent.prefilled:
                break  # its prefix is still being prefilled; the next step admits it
            n = self._admit(seq, budget, copies)
            if n is None:
                break
            self.waiting.popleft()
            self.running.append(seq)
            chunks.append(self._chunk(seq, n))
            budget -= n
        if not chunks and self.has_work():
            raise RuntimeError("scheduler made no progress: the KV pool is too small for one sequence")
        prefill = sum(c.num_tokens - (1 if c.sample and c.end > c.seq.prompt_len else 0) for c in chunks)
        return Step(tuple(chunks), tuple(copies), prefill)

    def after_step(self, step: Step) -> None:
        """Mark the step's tokens as computed; prefixes that are now whole become lendable."""
        for chunk in step.chunks:
            seq = chunk.seq
            seq.num_computed = chunk.end
            if seq.kind is SeqKind.PREFIX and seq.num_computed == seq.num_tokens:
                seq.prefilled = True
                self.running.remove(seq)
                self.live_prefixes.add(seq)

    def finish(self, seq: Seq, reason: str) -> None:
        """A row is done: free its blocks and the prefixes no other row still needs."""
        seq.finish_reason = reason
        self.running.remove(seq)
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

    def _chunk(self, seq: Seq, n: int) -> Chunk:
        end = seq.num_computed + n
        return Chunk(seq, seq.num_computed, n, sample=seq.is_row and end == seq.num_tokens)

    def _blocks_for(self, num_tokens: int) -> int:
        return blocks_for(num_tokens, self.block_size)

    def _grow(self, seq: Seq, num_tokens: int) -> bool:
        extra = self._blocks_for(num_tokens) - len(seq.block_table)
        if extra <= 0:
            return True
        blocks = self.pool.allocate(extra)
        if blocks is None:
            return False
        seq.block_table.extend(blocks)
        return True

    def _grow_or_preempt(self, seq: Seq, num_tokens: int) -> bool:
        """Grow ``seq`` to hold ``num_tokens``, preempting newer sequences as needed. False: ``seq``
        itself had to be preempted."""
        while not self._grow(seq, num_tokens):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Seq) -> None:
        self.running.remove(seq)
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
        own = self._blocks_for(start + n) - len(borrowed)
        if seq.kind is SeqKind.PREFIX:
            whole = self._blocks_for(seq.num_tokens) - len(borrowed)
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
        return sum(
            self._blocks_for(seq.prompt_len + (self.max_new_tokens if seq.is_row else 0))
            - len(seq.block_table)
            for seq in self.running
        )

    def _release(self, seq: Seq) -> None:
        self.pool.release(seq.block_table)
        seq.block_table = []
        seq.num_borrowed_blocks = 0

    def check_invariants(self) -> None:
        """Reference counts equal the block-table entries of every live sequence."""
        self.pool.check_invariants()
        expected = [0] * self.pool.num_blocks
        for seq in [*self.running, *self.live_prefixes]:
            for b in seq.block_table:
                expected[b] += 1
            if len(seq.block_table) < self._blocks_for(seq.num_computed):
                raise AssertionError(f"sequence {seq.index} has fewer blocks than computed tokens")
        for seq in self.waiting:
            if seq.block_table:
                raise AssertionError(f"waiting sequence {seq.index} holds blocks")
        if expected != self.pool._refs.tolist():
            raise AssertionError("block reference counts disagree with the live block tables")
        if len(self.running) > self.max_running:
            raise AssertionError("more running sequences than max_running")
