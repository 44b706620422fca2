"""Prompts tokenized piece by piece: each distinct piece once, every row's ids packed in one int32 buffer.

A piece is a whole prompt, or, where ``io.line_split`` proves the tokenizer splits there, one line of it
(a shared instruction's lines, a group text's lines, a row's own text). A batch of prompts becomes one Arrow
string array; its cuts are found in its bytes (``line_cuts``) and its pieces are the byte ranges between
them, deduplicated by Arrow's hash (``dictionary_encode``), so no Python code runs per row or per line.
A line never seen before is cut again before its words (``word_cuts``), where that is proven too, and only
words never seen before reach the Rust tokenizer (its batch encoder, on every core). A row's ids are its
pieces' ids end to end, gathered with numpy, never as Python lists.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from batchllm.io.line_split import line_cuts, word_cuts
from batchllm.prefix_tree.seqs import TokenSeqs, ragged_arange

GATHER_PIECES = 1 << 18  # piece occurrences gathered at a time (bounds the int64 index array)
ENCODE_CHARS = 1 << 22  # characters tokenized per call (bounds the Python id lists, ~36 bytes an id)

Ids = tuple[np.ndarray, np.ndarray]  # int32 ids of strings end to end, int64 each string's count


class Distinct:
    """Distinct strings, each tokenized once (by ``tokenize``), numbered in the order they were first seen;
    pieces without a string (ids found another way) are numbered among them. The strings seen are kept as
    Arrow arrays and looked up by Arrow's hash (``index_in``): only new ones become Python strings."""

    def __init__(self, tokenize: Callable[[list[str]], Ids]) -> None:
        self.tokenize = tokenize
        self.known: list[pa.Array] = []  # the strings seen, in chunks
        self.known_numbers: list[np.ndarray] = []  # int64, each known string's number
        self.ids: list[np.ndarray] = []  # int32, one array per batch of new pieces
        self.lengths: list[np.ndarray] = []  # int64
        self.count = 0
        self._flat: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def numbers(self, strings: pa.Array) -> np.ndarray:
        """int64 [len(strings)]: each string's number; strings not seen before are tokenized, all at once.
        Nothing is recorded when tokenizing raises."""
        codes = strings.dictionary_encode()
        distinct = codes.dictionary
        found = np.full(len(distinct), -1, np.int64)
        if self.known:  # the known strings probe a hash of this batch's (not the other way: ~5x dearer)
            at = pc.index_in(pa.chunked_array(self.known), value_set=distinct).fill_null(-1).to_numpy()
            numbers = np.concatenate(self.known_numbers)
            self.known_numbers = [numbers]
            hit = np.flatnonzero(at >= 0)
            found[at[hit]] = numbers[hit]
        new = np.flatnonzero(found < 0)
        if new.size:
            fresh = distinct.take(pa.array(new))
            self._append(*self.tokenize(fresh.to_pylist()))
            found[new] = self.count - new.size + np.arange(new.size)
            self.known.append(fresh)
            self.known_numbers.append(found[new])
        return found[np.asarray(codes.indices)]

    def add(self, ids: np.ndarray | list[int]) -> int:
        """A piece without a string (BOS/EOS, a row tokenized another way); its number."""
        self._append(np.asarray(ids, dtype=np.int32), np.array([len(ids)], np.int64))
        return self.count - 1

    def _append(self, ids: np.ndarray, lengths: np.ndarray) -> None:
        self.ids.append(ids)
        self.lengths.append(lengths)
        self.count += lengths.size
        self._flat = None

    def flat(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(every piece's ids end to end, each piece's start in them, each piece's length)."""
        if self._flat is None:
            tokens = np.concatenate(self.ids) if self.ids else np.zeros(0, np.int32)
            lengths = np.concatenate(self.lengths) if self.lengths else np.zeros(0, np.int64)
            self.ids, self.lengths = [tokens], [lengths]
            self._flat = (tokens, np.cumsum(lengths) - lengths, lengths)
        return self._flat

    def forget_strings(self) -> None:
        self.known, self.known_numbers = [], []


class PieceEncoder:
    """Rows are added in order (``add``, ``add_ids``, ``add_failed``); ``pack`` gives them as CSR.

    ``specials``: the ids put before and after every row (BOS/EOS), pieces then encoded without them;
    None: each piece is encoded with the tokenizer's own special tokens (``add_special``). ``words``: new
    lines are cut before words (only with ``cut``). ``backend`` None: rows come only through ``add_ids``."""

    def __init__(
        self,
        backend: Any,
        cut: bool,
        add_special: bool,
        specials: tuple[list[int], list[int]] | None,
        words: bool = False,
    ) -> None:
        if cut and add_special and specials is None:
            raise ValueError("cutting prompts into lines needs the tokenizer's special ids")
        self.backend = backend
        self.cut = cut
        self.encode_special = add_special and specials is None
        self.words = Distinct(self._tokenize) if cut and words else None
        self.pieces = Distinct(self._by_words if self.words is not None else self._tokenize)
        self.rows: list[np.ndarray] = []  # int32 piece numbers of each batch's rows, end to end
        self.row_pieces: list[int] = []  # how many pieces each row has
        self.around: list[int] = []  # the pieces put before and after every row (BOS/EOS)
        if add_special and specials is not None:
            pre, post = specials
            self.around = [self.pieces.add(pre) if pre else -1, self.pieces.add(post) if post else -1]

    def add(self, prompts: list[str | None]) -> None:
        """Tokenize the pieces of ``prompts`` not seen before and record the rows' pieces (a None
        prompt: a failed row). Nothing is recorded when the tokenizer (or the UTF-8 encoding) raises."""
        strings = pa.array(prompts, pa.large_string())  # raises on a lone surrogate
        valid = np.asarray(strings.is_valid())
        if self.cut:
            pieces, counts = _split(strings, line_cuts)
        else:  # a piece per row that has a prompt, even an empty one
            pieces, counts = strings.drop_null(), valid.astype(np.int64)
        occurrences = self.pieces.numbers(pieces).astype(np.int32)
        occurrences, counts = self._with_around(occurrences, counts, valid)
        self.rows.append(occurrences)
        self.row_pieces.extend(counts.tolist())

    def _tokenize(self, strings: list[str]) -> Ids:
        """The tokenizer's ids of ``strings`` (a few million characters a call)."""
        encode = getattr(self.backend, "encode_batch_fast", None) or self.backend.encode_batch
        sizes = np.cumsum([len(p) for p in strings])
        cuts = np.searchsorted(sizes, np.arange(ENCODE_CHARS, int(sizes[-1]), ENCODE_CHARS)).tolist()
        lists: list[list[int]] = []
        for lo, hi in zip([0, *cuts], [*cuts, len(strings)]):
            lists += [e.ids for e in encode(strings[lo:hi], add_special_tokens=self.encode_special)]
        lengths = np.fromiter(map(len, lists), np.int64, len(lists))
        return np.fromiter(itertools.chain.from_iterable(lists), np.int32, int(lengths.sum())), lengths

    def _by_words(self, lines: list[str]) -> Ids:
        """New lines' ids: their words' ids end to end (each distinct word tokenized once)."""
        assert self.words is not None
        words, counts = _split(pa.array(lines, pa.large_string()), word_cuts)
        numbers = self.words.numbers(words)
        tokens, starts, lengths = self.words.flat()
        ids = np.empty(int(lengths[numbers].sum()), np.int32)
        at = 0
        for lo in range(0, numbers.size, GATHER_PIECES):
            part = numbers[lo : lo + GATHER_PIECES]
            gathered = tokens[ragged_arange(starts[part], lengths[part])]
            ids[at : at + gathered.size] = gathered
            at += gathered.size
        line = np.repeat(np.arange(len(lines)), counts)
        return ids, np.bincount(line, weights=lengths[numbers], minlength=len(lines)).astype(np.int64)

    def _with_around(
        self, occurrences: np.ndarray, counts: np.ndarray, valid: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Each row that has a prompt gets the pieces put before and after it (BOS/EOS), if any."""
        pre, post = self.around or (-1, -1)
        if pre < 0 and post < 0:
            return occurrences, counts
        counts = counts + valid * ((pre >= 0) + (post >= 0))
        ends = np.cumsum(counts)
        starts, ends = (ends - counts)[valid], ends[valid]
        out = np.empty(int(counts.sum()), np.int32)
        body = np.ones(out.size, bool)
        for at, piece in ((starts, pre), (ends - 1, post)):
            if piece >= 0:
                out[at], body[at] = piece, False
        out[body] = occurrences
        return out, counts

    def add_ids(self, ids: np.ndarray) -> None:
        """A row whose ids were found another way (one piece of its own)."""
        self.rows.append(np.asarray([self.pieces.add(ids)], dtype=np.int32))
        self.row_pieces.append(1)

    def add_failed(self) -> None:
        """A row without ids (it gets an error, not a prompt)."""
        self.row_pieces.append(0)

    def pack(self, rows: int | None = None) -> TokenSeqs:
        """The first ``rows`` rows added (default: all), in order, as CSR (a failed row is empty). Packing
        them all lets go of the pieces' strings first, and of the pieces after."""
        counts = np.asarray(self.row_pieces[:rows], dtype=np.int64)
        if rows is None:
            self.pieces.forget_strings()
            self.words = None
        piece_tokens, piece_starts, lengths = self.pieces.flat()
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
            self.pieces, self.rows = Distinct(self._tokenize), []  # packed once: not needed again
        return TokenSeqs(tokens, offsets)


def _split(strings: pa.LargeStringArray, cuts: Callable[[np.ndarray, np.ndarray], np.ndarray]):
    """The strings' pieces (between ``cuts``), in order, as one string array over the strings' own bytes
    (no copy), and each string's count of pieces; an empty or null string has none."""
    n = len(strings)
    offsets = np.frombuffer(strings.buffers()[1], np.int64, n + 1)
    data = strings.buffers()[2]
    raw = np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8)
    nonempty = np.flatnonzero(offsets[1:] > offsets[:-1])  # a null holds no bytes
    # Cuts lie inside strings, never at their starts; np.unique would cost ~50x this sort (numpy 2.4).
    starts = np.sort(np.concatenate([offsets[nonempty], cuts(raw, offsets)]))
    counts = np.bincount(np.searchsorted(offsets, starts, side="right") - 1, minlength=n).astype(np.int64)
    bounds = np.append(starts, offsets[-1]) if starts.size else np.zeros(1, np.int64)
    return pa.LargeStringArray.from_buffers(starts.size, pa.py_buffer(bounds), data), counts


def row_views(seqs: TokenSeqs) -> list[np.ndarray]:
    """Each row of ``seqs`` as a view of its one buffer (no copy)."""
    tokens, bounds = seqs.tokens, seqs.offsets.tolist()
    return [tokens[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
