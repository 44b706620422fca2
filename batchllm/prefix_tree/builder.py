"""The prefix tree's build: rows sorted by their token ids, and the tree's nodes as the sort finds them,
without a Python loop per token.

Rows are sorted lexicographically by iterative refinement: rows that agree so far form a "group";
each round compares a window of tokens of every member against its group's first member (one
gather and one compare per row; the first difference is looked for only where there is one), and
either moves the whole group's agreed depth forward by the window or, where some member differs,
sorts the group by its token at the first difference.  Each such split is a radix node, so the tree
falls out of the sort: a round is a few numpy calls over the still-undecided rows, and the number
of rounds is about (longest shared run / window + nesting). Nothing is copied per token: rows may
be spans of one buffer.

    order:   r7 r2 r9 r4 ...   rows in lexicographic order (any prefix's rows are contiguous)
    node v:  [lo, hi)          the positions in `order` of the rows that start with v's prefix
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from batchllm.prefix_tree.seqs import TokenSeqs, TokenSpans, ragged_arange

_WINDOW = 32  # tokens compared per row per round
_CHUNK_ROWS = 1 << 16  # rows per gather, so a round's temporaries stay around 10 MB
_WINDOW_TYPE = np.dtype((np.void, 4 * _WINDOW))  # _WINDOW int32 tokens as one item


class SortedRows(NamedTuple):
    """The rows' order and the tree's nodes in DFS preorder: `PrefixTree`'s fields after `seqs`."""

    order: np.ndarray
    node_length: np.ndarray
    node_parent: np.ndarray
    node_level: np.ndarray
    node_lo: np.ndarray
    node_hi: np.ndarray
    row_leaf: np.ndarray


def sort_rows(seqs: TokenSeqs | TokenSpans) -> SortedRows:
    """``seqs`` in lexicographic order and its compressed radix tree; empty rows end at the root."""
    return _Builder(seqs).run()


def _tokens(windows: np.ndarray) -> np.ndarray:
    """int32 [N, W]: the tokens of N windows (a view)."""
    return windows.view(np.int32).reshape(-1, _WINDOW)


def _first_difference(eq: np.ndarray, common: np.ndarray):
    """Per row of ``eq`` (bool [N, W]: a row's window token by token against its leader's): the
    first token that differs (only the first ``common`` count), or the window if none does; and
    whether that is ``common`` itself."""
    m = eq.argmin(axis=1)
    m[eq[np.arange(m.size), m]] = _WINDOW  # argmin of an all-true row is 0
    m = np.minimum(m, common)  # tokens past either row's end are junk
    return m, m == common


class _Groups(NamedTuple):
    """Rows that agree on their first `depth` tokens: positions [lo, hi) of the order."""

    lo: np.ndarray  # int64 [G]
    hi: np.ndarray  # int64 [G]
    depth: np.ndarray  # int64 [G]
    parent: np.ndarray  # int64 [G]: node the group hangs under
    parent_depth: np.ndarray  # int64 [G]
    parent_level: np.ndarray  # int64 [G]

    def take(self, mask: np.ndarray) -> _Groups:
        return _Groups(*(a[mask] for a in self))


class _Builder:
    """Working state of one build: the order being refined and the nodes found so far."""

    def __init__(self, seqs: TokenSeqs | TokenSpans) -> None:
        self.seqs = seqs
        self.starts, self.lengths = seqs.starts, seqs.lengths
        tokens = seqs.tokens
        # The window view needs _WINDOW tokens past every start; pad only tiny inputs (a copy).
        if tokens.size < 2 * _WINDOW:
            tokens = np.concatenate([tokens, np.zeros(2 * _WINDOW, dtype=np.int32)])
        self.tokens = tokens
        # void [T - W + 1]: item i is tokens[i : i + W]. numpy gathers such an item faster than W int32s
        # (a sliding_window_view); it compares them faster as int32s (void items go byte by byte).
        self.windows = np.ndarray((tokens.size - _WINDOW + 1,), _WINDOW_TYPE, tokens, strides=(4,))
        empty = self.lengths == 0  # they end at the root and sort first
        self.order = np.concatenate([np.flatnonzero(empty), np.flatnonzero(~empty)])
        # start and length of row order[i], kept in step: a round reads them in order, not at random
        self.start_at, self.length_at = self.starts[self.order], self.lengths[self.order]
        self.nodes: list[tuple[np.ndarray, ...]] = []  # (length, parent, level, lo, hi) batches
        self.num_nodes = 0
        self.ends: list[tuple[np.ndarray, ...]] = []  # (node, lo, hi): rows ending at node

    def run(self) -> SortedRows:
        n = len(self.seqs)
        zero, one = np.zeros(1, np.int64), np.ones(1, np.int64)
        self._add_nodes(zero, -one, zero, zero, n * one)
        first = int((self.lengths == 0).sum())
        if first:
            self.ends.append((zero, zero, first * one))
        groups = _Groups(first * one, n * one, zero, zero, zero, zero)
        if first == n:
            groups = groups.take(np.zeros(1, dtype=bool))
        while groups.lo.size:
            groups = self._round(groups)
        return self._finish()

    def _add_nodes(self, length, parent, level, lo, hi) -> np.ndarray:
        ids = self.num_nodes + np.arange(length.size, dtype=np.int64)
        self.nodes.append((length, parent, level, lo, hi))
        self.num_nodes += length.size
        return ids

    def _round(self, g: _Groups) -> _Groups:
        sizes = g.hi - g.lo
        pos = ragged_arange(g.lo, sizes)
        gidx = np.repeat(np.arange(sizes.size), sizes)
        mismatch, same = self._compare_to_leader(pos, gidx, g)
        first = np.cumsum(sizes) - sizes
        m_group = np.minimum.reduceat(mismatch, first)
        all_same = np.logical_and.reduceat(same, first)
        full = m_group == _WINDOW
        self._finish_duplicates(g.take(full & all_same))
        moved = g.take(full & ~all_same)
        moved = moved._replace(depth=moved.depth + _WINDOW)
        split = ~full
        members = split[gidx]
        rank = np.cumsum(split) - 1
        new = self._split(g.take(split), (g.depth + m_group)[split], pos[members], rank[gidx[members]])
        merged = _Groups(*(np.concatenate([a, b]) for a, b in zip(moved, new)))
        return merged.take(np.argsort(merged.lo, kind="stable"))  # keeps gathers local

    def _compare_to_leader(self, pos: np.ndarray, gidx: np.ndarray, g: _Groups):
        """Per row: tokens after the group depth that agree with the group's first row (capped at
        the window), and whether the row is identical to that first row. A row with more than a
        window left that matches the leader's whole window is the common case."""
        lead, lead_len = self._window(self.start_at[g.lo] + g.depth), self.length_at[g.lo]
        mismatch = np.full(pos.size, _WINDOW, dtype=np.int64)
        same = np.zeros(pos.size, dtype=bool)
        for a in range(0, pos.size, _CHUNK_ROWS):
            p, gi = pos[a : a + _CHUNK_ROWS], gidx[a : a + _CHUNK_ROWS]
            len_r, len_l, depth = self.length_at[p], lead_len[gi], g.depth[gi]
            common = np.minimum(len_r, len_l) - depth  # tokens both rows still have
            eq = _tokens(self._window(self.start_at[p] + depth)) == _tokens(lead[gi])  # bool [C, W]
            hard = np.flatnonzero((common <= _WINDOW) | ~eq.all(axis=1))
            m, ident = _first_difference(eq[hard], common[hard])
            ident &= len_r[hard] == len_l[hard]
            mismatch[a + hard] = np.where(ident, _WINDOW, m)
            same[a + hard] = ident
        return mismatch, same

    def _window(self, base: np.ndarray) -> np.ndarray:
        """void [len(base)]: tokens[base : base + W] as one item; past the end they hold junk (masked)."""
        last = self.windows.size - 1
        if not base.size or base.max() <= last:  # all but the buffer's last W tokens
            return self.windows[base]
        win = self.windows[np.minimum(base, last)]
        late = np.flatnonzero(base > last)
        if late.size:
            idx = np.minimum(base[late, None] + np.arange(_WINDOW), self.tokens.size - 1)
            win[late] = np.ascontiguousarray(self.tokens[idx]).view(_WINDOW_TYPE).reshape(-1)
        return win

    def _finish_duplicates(self, g: _Groups) -> None:
        if g.lo.size:
            length = self.length_at[g.lo]
            ids = self._add_nodes(length, g.parent, g.parent_level + 1, g.lo, g.hi)
            self.ends.append((ids, g.lo, g.hi))

    def _split(self, g: _Groups, depth: np.ndarray, pos: np.ndarray, gidx: np.ndarray) -> _Groups:
        """Sort each group by its token at `depth` (the first one where members differ)."""
        if not g.lo.size:
            return g
        reuse = depth == g.parent_depth  # only the first group can branch at the root itself
        node = g.parent.copy()
        node[~reuse] = self._add_nodes(
            depth[~reuse], g.parent[~reuse], g.parent_level[~reuse] + 1, g.lo[~reuse], g.hi[~reuse]
        )
        level = np.where(reuse, g.parent_level, g.parent_level + 1)
        d, start, length = depth[gidx], self.start_at[pos], self.length_at[pos]
        has = length > d
        tok = self.tokens[np.where(has, start + d, 0)].astype(np.uint64) + np.uint64(1)
        key = (gidx.astype(np.uint64) << np.uint64(32)) | np.where(has, tok, np.uint64(0))
        perm = np.argsort(key)
        key, length = key[perm], length[perm]
        self.order[pos], self.start_at[pos], self.length_at[pos] = self.order[pos][perm], start[perm], length
        first = np.flatnonzero(np.concatenate([[True], key[1:] != key[:-1]]))
        size = np.diff(np.append(first, key.size))
        sub = (key[first] >> np.uint64(32)).astype(np.int64)
        ended = (key[first] & np.uint64(0xFFFFFFFF)) == 0
        lo = pos[first]
        self.ends.append((node[sub[ended]], lo[ended], lo[ended] + size[ended]))
        single = ~ended & (size == 1)
        leaf_lo = lo[single]
        leaves = self._add_nodes(
            length[first[single]], node[sub[single]], level[sub[single]] + 1, leaf_lo, leaf_lo + 1
        )
        self.ends.append((leaves, leaf_lo, leaf_lo + 1))
        keep = ~ended & (size > 1)
        s = sub[keep]
        return _Groups(lo[keep], lo[keep] + size[keep], depth[s] + 1, node[s], depth[s], level[s])

    def _finish(self) -> SortedRows:
        """Nodes in DFS preorder (by first row; ancestors, being shorter, first) and each row's leaf,
        each column replaced one at a time so the peak stays near one copy of the nodes."""
        columns = [np.concatenate(c) for c in zip(*self.nodes)]  # length, parent, level, lo, hi
        self.nodes.clear()
        pre = np.lexsort((columns[0], columns[3]))
        for i in range(len(columns)):
            columns[i] = columns[i][pre]
        new_id = np.empty(pre.size, dtype=np.int64)
        new_id[pre] = np.arange(pre.size)
        del pre
        root = columns[1] < 0
        columns[1] = new_id[np.maximum(columns[1], 0)]
        columns[1][root] = -1
        length, parent, level, lo, hi = columns
        return SortedRows(self.order, length, parent, level, lo, hi, self._row_leaf(new_id))

    def _row_leaf(self, new_id: np.ndarray) -> np.ndarray:
        row_leaf = np.empty(self.order.size, dtype=np.int64)
        if self.ends:
            node, e_lo, e_hi = (np.concatenate(c) for c in zip(*self.ends))
            self.ends.clear()
            by_lo = np.argsort(e_lo)
            row_leaf[self.order] = np.repeat(new_id[node[by_lo]], (e_hi - e_lo)[by_lo])
        return row_leaf
