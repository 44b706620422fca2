"""Prompts tokenized piece by piece: each distinct piece once, every row's ids packed in one int32 buffer.

A piece is a whole prompt, or, where ``io.line_split`` proves the tokenizer splits there, one line of it
(a shared instruction's lines, a group text's lines, a row's own text). Identical pieces (and so identical
prompts) are tokenized once; the Rust tokenizer's ``encode_batch`` runs over all new pieces of a chunk on
every core; a row's ids are its pieces' ids end to end, gathered with numpy, never as Python lists.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

from batchllm.io.line_split import cut_lines
from batchllm.prefix_tree.seqs import TokenSeqs, ragged_arange

GATHER_PIECES = 1 << 18  # piece occurrences gathered at a time (bounds the int64 index array)


class PieceEncoder:
    """Rows are added in order (``add``, ``add_ids``, ``add_failed``); ``pack`` gives them as CSR.

    ``specials``: the ids put before and after every row (BOS/EOS), pieces then encoded without them;
    None: each piece is encoded with the tokenizer's own special tokens (``add_special``)."""

    def __init__(
        self, backend: Any, cut: bool, add_special: bool, specials: tuple[list[int], list[int]] | None
    ) -> None:
        if cut and add_special and specials is None:
            raise ValueError("cutting prompts into lines needs the tokenizer's special ids")
        self.backend = backend
        self.cut = cut
        self.encode_special = add_special and specials is None
        self.index: dict[str, int] = {}
        self.piece_ids: list[np.ndarray] = []  # int32 ids of pieces, in piece order, one array per chunk
        self.piece_lengths: list[int] = []
        self.rows: list[np.ndarray] = []  # int32 piece indices of each chunk's rows, end to end
        self.row_pieces: list[int] = []  # how many pieces each row has
        self.around = (None, None)
        if add_special and specials is not None:
            pre, post = specials
            self.around = (self._new_piece(pre) if pre else None, self._new_piece(post) if post else None)

    def add(self, prompts: list[str | None]) -> None:
        """Tokenize the pieces of ``prompts`` not seen before and record the rows' pieces (a None
        prompt: a failed row). Nothing is recorded when the tokenizer raises."""
        new: dict[str, int] = {}
        occurrences: list[int] = []
        counts: list[int] = []
        first, (pre, post) = len(self.piece_lengths), self.around
        for prompt in prompts:
            if prompt is None:
                counts.append(0)
                continue
            row = self._pieces(cut_lines(prompt) if self.cut else [prompt], new, first)
            row = ([] if pre is None else [pre]) + row + ([] if post is None else [post])
            occurrences.extend(row)
            counts.append(len(row))
        if new:
            encoded = self.backend.encode_batch(list(new), add_special_tokens=self.encode_special)
            lists = [e.ids for e in encoded]
            lengths = [len(ids) for ids in lists]
            self.piece_ids.append(np.fromiter(itertools.chain.from_iterable(lists), np.int32, sum(lengths)))
            self.piece_lengths.extend(lengths)
            self.index.update(new)
        self.rows.append(np.asarray(occurrences, dtype=np.int32))
        self.row_pieces.extend(counts)

    def _pieces(self, pieces: list[str], new: dict[str, int], first: int) -> list[int]:
        """Each piece's index; a piece seen nowhere yet gets the next index in ``new``."""
        index, row = self.index, []
        for piece in pieces:
            k = index.get(piece)
            if k is None:
                k = new.get(piece)
                if k is None:
                    k = new[piece] = first + len(new)
            row.append(k)
        return row

    def add_ids(self, ids: np.ndarray) -> None:
        """A row whose ids were found another way (one piece of its own)."""
        self.rows.append(np.asarray([self._new_piece(ids)], dtype=np.int32))
        self.row_pieces.append(1)

    def add_failed(self) -> None:
        """A row without ids (it gets an error, not a prompt)."""
        self.row_pieces.append(0)

    def _new_piece(self, ids: np.ndarray | list[int]) -> int:
        self.piece_ids.append(np.asarray(ids, dtype=np.int32))
        self.piece_lengths.append(len(ids))
        return len(self.piece_lengths) - 1

    def pack(self, rows: int | None = None) -> TokenSeqs:
        """The first ``rows`` rows added (default: all), in order, as CSR (a failed row is empty). Packing
        them all lets go of the piece index (its texts) first."""
        counts = np.asarray(self.row_pieces[:rows], dtype=np.int64)
        if rows is None:
            self.index = {}
        piece_tokens = np.concatenate(self.piece_ids) if self.piece_ids else np.zeros(0, np.int32)
        lengths = np.asarray(self.piece_lengths, dtype=np.int64)
        piece_starts = np.cumsum(lengths) - lengths
        occ = np.concatenate(self.rows)[: int(counts.sum())] if self.rows else np.zeros(0, np.int32)
        occ_ends = np.cumsum(lengths[occ])
        row_ends = np.cumsum(counts)
        ends = occ_ends[np.maximum(row_ends - 1, 0)] if occ.size else np.zeros_like(row_ends)
        offsets = np.concatenate([[0], np.where(row_ends > 0, ends, 0)]).astype(np.int64)
        tokens = np.empty(int(offsets[-1]), dtype=np.int32)
        for lo in range(0, occ.size, GATHER_PIECES):
            part = occ[lo : lo + GATHER_PIECES]
            at = int(occ_ends[lo - 1]) if lo else 0
            gathered = piece_tokens[ragged_arange(piece_starts[part], lengths[part])]
            tokens[at : at + gathered.size] = gathered
        if rows is None:
            self.piece_ids, self.rows = [], []  # packed once; the pieces are not needed again
        return TokenSeqs(tokens, offsets)


def row_views(seqs: TokenSeqs) -> list[np.ndarray]:
    """Each row of ``seqs`` as a view of its one buffer (no copy)."""
    tokens, bounds = seqs.tokens, seqs.offsets.tolist()
    return [tokens[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def packed_views(rows: list[np.ndarray]) -> TokenSeqs | None:
    """``rows`` as CSR without copying, when they are consecutive views of one int32 buffer (what
    ``row_views`` gives, less empty rows); None otherwise."""
    if not rows or not all(isinstance(r, np.ndarray) for r in rows):
        return None
    base = rows[0].base
    if base is None or base.dtype != np.int32 or base.ndim != 1 or not base.flags.c_contiguous:
        return None
    if any(r.base is not base or r.dtype != np.int32 for r in rows):
        return None
    origin = base.__array_interface__["data"][0]
    starts = np.fromiter((r.__array_interface__["data"][0] for r in rows), np.int64, count=len(rows))
    starts = (starts - origin) // 4
    lengths = np.fromiter((r.size for r in rows), np.int64, count=len(rows))
    if np.any(starts[1:] != starts[:-1] + lengths[:-1]):
        return None
    first = int(starts[0])
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return TokenSeqs(base[first : first + int(offsets[-1])], offsets)
