"""A pool of fixed-size KV blocks with reference counts, so shared prefixes are stored once."""

from __future__ import annotations

from collections import deque

import numpy as np


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks that hold ``num_tokens`` tokens."""
    return -(-num_tokens // block_size)


class BlockPool:
    """Hands out block ids; a block returns to the free list when its last reference is released."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._refs = np.zeros(num_blocks, dtype=np.int32)
        self.peak_used = 0

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self, n: int) -> list[int] | None:
        """``n`` fresh blocks with one reference each, or None when fewer than ``n`` are free."""
        if n > len(self._free):
            return None
        blocks = [self._free.popleft() for _ in range(n)]
        self._refs[blocks] = 1
        self.peak_used = max(self.peak_used, self.num_used)
        return blocks

    def retain(self, blocks: list[int]) -> None:
        """One more reference to blocks that are already in use (sharing a prefix)."""
        if blocks and (self._refs[blocks] <= 0).any():
            raise RuntimeError("retain() of a free block")
        np.add.at(self._refs, blocks, 1)

    def release(self, blocks: list[int]) -> None:
        for b in blocks:
            self._refs[b] -= 1
            if self._refs[b] == 0:
                self._free.append(b)
            elif self._refs[b] < 0:
                raise RuntimeError(f"block {b} released more often than referenced")

    def check_invariants(self) -> None:
        free = np.zeros(self.num_blocks, dtype=bool)
        free[list(self._free)] = True
        if len(set(self._free)) != len(self._free):
            raise AssertionError("a block is on the free list twice")
        if (self._refs < 0).any():
            raise AssertionError("negative reference count")
        if not np.array_equal(free, self._refs == 0):
            raise AssertionError("free list disagrees with reference counts")
