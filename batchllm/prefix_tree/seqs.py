"""Token rows packed as CSR, the ragged-array helpers the planner vectorises with, and its
invariant check."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


class InvariantError(AssertionError):
    """A planner structure broke one of its own rules: a bug in batchllm, not in the input."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise InvariantError(message)


@dataclass(frozen=True, eq=False)
class TokenSeqs:
    """Variable-length token rows packed as CSR: row i is tokens[offsets[i]:offsets[i + 1]]."""

    tokens: np.ndarray  # int32 [total_tokens], every id in [0, 2**31)
    offsets: np.ndarray  # int64 [num_rows + 1], offsets[0] == 0, non-decreasing

    def __post_init__(self) -> None:
        tokens, offsets = np.asarray(self.tokens), np.asarray(self.offsets)
        if tokens.ndim != 1 or offsets.ndim != 1 or offsets.size == 0:
            raise ValueError("TokenSeqs needs 1-d tokens and 1-d offsets with num_rows + 1 entries")
        for name, a in (("tokens", tokens), ("offsets", offsets)):
            if a.size and a.dtype.kind not in "iu":
                raise ValueError(f"{name} must hold integers, got dtype {a.dtype}")
        if offsets[0] != 0 or offsets[-1] != tokens.size or np.any(np.diff(offsets) < 0):
            raise ValueError("offsets must start at 0, never decrease and end at len(tokens)")
        if tokens.size and (tokens.min() < 0 or (tokens.dtype != np.int32 and tokens.max() >= 2**31)):
            raise ValueError("token ids must lie in [0, 2**31)")
        object.__setattr__(self, "tokens", np.ascontiguousarray(tokens, dtype=np.int32))
        object.__setattr__(self, "offsets", np.ascontiguousarray(offsets, dtype=np.int64))

    @classmethod
    def from_lists(cls, rows: Sequence[np.ndarray | Sequence[int]]) -> TokenSeqs:
        """Pack rows of token ids: integer arrays (fast) or lists of ints (~1 s per 30M ids)."""
        offsets = np.cumsum([0] + [len(r) for r in rows], dtype=np.int64)
        if all(isinstance(r, np.ndarray) for r in rows):
            return cls(
                np.concatenate([r.reshape(-1) for r in rows]) if rows else np.zeros(0, np.int32), offsets
            )
        try:  # one C loop over all ids; a list of per-row arrays would cost ~30 us a row
            tokens = np.fromiter(itertools.chain.from_iterable(rows), np.int32, count=int(offsets[-1]))
        except (OverflowError, TypeError, ValueError) as e:
            raise ValueError(f"token ids must be integers in [0, 2**31): {e}") from None
        return cls(tokens, offsets)

    def __len__(self) -> int:
        return int(self.offsets.size - 1)

    @property
    def lengths(self) -> np.ndarray:
        """int64 [num_rows]"""
        return np.diff(self.offsets)

    @property
    def starts(self) -> np.ndarray:
        """int64 [num_rows]: where each row starts in ``tokens`` (a view of ``offsets``)."""
        return self.offsets[:-1]

    def row(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]

    def heads(self, tails: np.ndarray) -> TokenSpans:
        """Every row less its last ``tails[i]`` tokens (1 <= tails[i] <= its length), as spans over
        this same token buffer: no token is copied."""
        return _heads(self.tokens, self.starts, self.lengths, tails)

    def without_tails(self, tails: np.ndarray) -> TokenSeqs:
        """Every row less its last ``tails[i]`` tokens, copied into a buffer of their own (`heads`
        makes the same rows without the copy)."""
        keep = self.heads(tails).lengths
        offsets = np.concatenate([[0], np.cumsum(keep)]).astype(np.int64)
        return TokenSeqs(self.tokens[ragged_arange(self.offsets[:-1], keep)], offsets)


@dataclass(frozen=True, eq=False)
class TokenSpans:
    """Rows as spans of one token buffer, which they need not cover nor tile: row i is
    tokens[starts[i] : starts[i] + lengths[i]] (e.g. `TokenSeqs.heads`, rows less their tails)."""

    tokens: np.ndarray  # int32 [total_tokens]
    starts: np.ndarray  # int64 [num_rows]
    lengths: np.ndarray  # int64 [num_rows], every span inside tokens

    def __post_init__(self) -> None:
        starts, lengths = self.starts, self.lengths
        if self.tokens.dtype != np.int32 or self.tokens.ndim != 1 or not self.tokens.flags.c_contiguous:
            raise ValueError("TokenSpans needs one contiguous buffer of int32 tokens")
        if starts.shape != lengths.shape or starts.ndim != 1:
            raise ValueError("TokenSpans needs 1-d starts and lengths of one size")
        inside = not starts.size or (
            starts.min() >= 0 and lengths.min() >= 0 and (starts + lengths).max() <= self.tokens.size
        )
        if not inside:
            raise ValueError("every span must lie inside the token buffer")

    def __len__(self) -> int:
        return int(self.starts.size)

    def row(self, i: int) -> np.ndarray:
        return self.tokens[self.starts[i] : self.starts[i] + self.lengths[i]]

    def heads(self, tails: np.ndarray) -> TokenSpans:
        """As ``TokenSeqs.heads``."""
        return _heads(self.tokens, self.starts, self.lengths, tails)

    def take(self, rows: np.ndarray) -> TokenSpans:
        """These rows (any may repeat: ``--n`` samples of one prompt), still over the same buffer."""
        return TokenSpans(self.tokens, self.starts[rows], self.lengths[rows])


def _heads(tokens: np.ndarray, starts: np.ndarray, lengths: np.ndarray, tails: np.ndarray) -> TokenSpans:
    if tails.shape != lengths.shape or (lengths.size and (tails.min() < 1 or np.any(tails > lengths))):
        raise ValueError("each row's tail must hold between 1 token and the whole row")
    return TokenSpans(tokens, starts, lengths - tails)


def ragged_arange(starts: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s + n) for each (s, n), without a Python loop."""
    ends = np.cumsum(sizes)
    total = int(ends[-1]) if ends.size else 0
    return np.repeat(starts - (ends - sizes), sizes) + np.arange(total, dtype=np.int64)


def ragged_equal(tokens: np.ndarray, a: np.ndarray, b: np.ndarray, lengths: np.ndarray) -> bool:
    """Whether tokens[a[i] : a[i] + lengths[i]] == tokens[b[i] : ...] for every i (in ~16M-token chunks)."""
    ends = np.cumsum(lengths)
    cuts = np.searchsorted(ends, np.arange(1 << 24, int(ends[-1]) if ends.size else 0, 1 << 24))
    bounds = np.concatenate([[0], cuts, [lengths.size]])
    return all(
        np.array_equal(
            tokens[ragged_arange(a[i:j], lengths[i:j])], tokens[ragged_arange(b[i:j], lengths[i:j])]
        )
        for i, j in zip(bounds[:-1], bounds[1:])
    )
