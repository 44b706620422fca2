"""One compressed radix tree over every prompt's token ids, built without a Python loop per token.

Rows are sorted lexicographically by iterative refinement: rows that agree so far form a "group";
each round compares a window of tokens of every member against its group's first member (one
vectorised gather), and either moves the whole group's agreed depth forward by the window or,
where some member differs, sorts the group by its token at the first difference.  Each such
split is a radix node, so the tree falls out of the sort: a round is a few numpy calls over the
still-undecided rows, and the number of rounds is about (longest shared run / window + nesting).

    order:   r7 r2 r9 r4 ...   rows in lexicographic order (any prefix's rows are contiguous)
    node v:  [lo, hi)          the positions in `order` of the rows that start with v's prefix
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from batchllm.prefix_tree.seqs import TokenSeqs, TokenSpans, ragged_arange, ragged_equal, require

_WINDOW = 32  # tokens compared per row per round
_CHUNK_ROWS = 1 << 16  # rows per gather, so a round's temporaries stay around 10 MB
_WINDOW_TYPE = np.dtype((np.void, 4 * _WINDOW))  # _WINDOW int32 tokens as one item


@dataclass(frozen=True, eq=False)
class PrefixTree:
    """Compressed radix tree of `seqs`; nodes are in DFS preorder, node 0 is the root (length 0).

    A node exists for every branching point and for every distinct row's end. The prefix of
    node v is `seqs.row(node_row[v])[:node_length[v]]`. Rows with the same leaf are duplicates.
    """

    seqs: TokenSeqs | TokenSpans  # the rows it was built over (spans: rows less their tails, uncopied)
    order: np.ndarray  # int64 [num_rows]: rows in lexicographic order
    node_length: np.ndarray  # int64 [num_nodes]: tokens from the prompt start to the node
    node_parent: np.ndarray  # int64 [num_nodes]: parent node; -1 only at the root
    node_level: np.ndarray  # int64 [num_nodes]: nesting depth, root 0
    node_lo: np.ndarray  # int64 [num_nodes]: first position in `order` of the node's rows
    node_hi: np.ndarray  # int64 [num_nodes]: one past the last such position
    row_leaf: np.ndarray  # int64 [num_rows]: the node where each row ends

    @classmethod
    def build(cls, seqs: TokenSeqs | TokenSpans) -> PrefixTree:
        """The tree of ``seqs``; empty rows end at the root."""
        return _Builder(seqs).run()

    @property
    def num_nodes(self) -> int:
        return int(self.node_length.size)

    @property
    def num_rows(self) -> int:
        return int(self.order.size)

    @property
    def node_num_rows(self) -> np.ndarray:
        """int64 [num_nodes]: rows (duplicates included) whose prompt starts with the node's prefix."""
        return self.node_hi - self.node_lo

    @property
    def node_row(self) -> np.ndarray:
        """int64 [num_nodes]: a representative row whose first node_length tokens are the prefix."""
        if self.num_rows == 0:
            return np.zeros(self.num_nodes, dtype=np.int64)
        return self.order[np.minimum(self.node_lo, self.num_rows - 1)]

    @property
    def node_terminal_rows(self) -> np.ndarray:
        """int64 [num_nodes]: rows whose whole prompt ends exactly at the node."""
        return np.bincount(self.row_leaf, minlength=self.num_nodes).astype(np.int64)

    @property
    def unique_prompt_tokens(self) -> int:
        """Distinct non-empty prefixes of all prompts: the fewest tokens any engine must prefill."""
        return int((self.node_length[1:] - self.node_length[self.node_parent[1:]]).sum())

    def duplicate_of(self) -> np.ndarray:
        """int64 [num_rows]: for each row the smallest row index with the identical prompt."""
        first = np.full(self.num_nodes, self.num_rows, dtype=np.int64)
        np.minimum.at(first, self.row_leaf, np.arange(self.num_rows, dtype=np.int64))
        return first[self.row_leaf]

    def check_invariants(self) -> None:
        """Raise InvariantError unless the tree is a compressed trie of exactly `seqs`' rows."""
        n, lengths = self.num_rows, self.seqs.lengths
        length, parent, lo, hi = self.node_length, self.node_parent, self.node_lo, self.node_hi
        require(self.num_nodes >= 1 and parent[0] == -1 and length[0] == 0, "root must come first")
        require(lo[0] == 0 and hi[0] == n and self.node_level[0] == 0, "root must span every row")
        require(np.array_equal(np.sort(self.order), np.arange(n)), "order must be a permutation")
        beneath = np.bincount(parent[1:], weights=(hi - lo)[1:], minlength=self.num_nodes)
        require(bool(np.all(hi - lo == beneath + self.node_terminal_rows)), "row counts must add up")
        require(bool(np.all((lo[parent[1:]] <= lo[1:]) & (hi[1:] <= hi[parent[1:]]))), "nesting is off")
        p = parent[1:]
        require(bool(np.all(length[p] < length[1:])), "a child must be longer than its parent")
        require(bool(np.all(self.node_level[1:] == self.node_level[p] + 1)), "node levels are off")
        require(bool(np.all(np.diff(lo) >= 0)), "nodes must be in DFS preorder")
        leaf = self.row_leaf
        require(bool(np.all(length[leaf] == lengths)), "a row's leaf must be as long as the row")
        pos = np.empty(n, dtype=np.int64)
        pos[self.order] = np.arange(n)
        require(bool(np.all((lo[leaf] <= pos) & (pos < hi[leaf]))), "a row lies outside its leaf")
        self._check_compressed()
        self._check_tokens()

    def _check_compressed(self) -> None:
        children = np.bincount(self.node_parent[1:], minlength=self.num_nodes)
        lonely = (children[1:] < 2) & (self.node_terminal_rows[1:] == 0)
        require(not lonely.any(), "a node with one child and no row ending there must be merged")
        starts, rows = self.seqs.starts, self.node_row
        first = self.seqs.tokens[starts[rows[1:]] + self.node_length[self.node_parent[1:]]]
        pairs = np.stack([self.node_parent[1:], first.astype(np.int64)], axis=1)
        require(np.unique(pairs, axis=0).shape[0] == pairs.shape[0], "sibling edges must differ")

    def _check_tokens(self) -> None:
        starts, rows = self.seqs.starts, self.node_row
        p = self.node_parent[1:]
        same = ragged_equal(self.seqs.tokens, starts[rows[1:]], starts[rows[p]], self.node_length[p])
        require(same, "a node's prefix must extend its parent's prefix")
        leaf_rows = rows[self.row_leaf]
        same = ragged_equal(self.seqs.tokens, starts, starts[leaf_rows], self.seqs.lengths)
        require(same, "a row must equal the prefix of its leaf")


def _first_difference(win: np.ndarray, lead: np.ndarray, common: np.ndarray):
    """Per row: the first of its window's tokens (only the first ``common`` count) that differs
    from the leader's, or the window if none does; and whether that is ``common`` itself."""
    eq = win.view(np.int32).reshape(-1, _WINDOW) == lead.view(np.int32).reshape(-1, _WINDOW)
    eq &= np.arange(_WINDOW) < common[:, None]
    m = eq.argmin(axis=1)
    m[eq[np.arange(m.size), m]] = _WINDOW  # argmin of an all-true row is 0
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
        # void [T - W + 1]: item i is tokens[i : i + W], so one row's window is one gather and one memcmp
        self.windows = np.ndarray((tokens.size - _WINDOW + 1,), _WINDOW_TYPE, tokens, strides=(4,))
        self.order = np.arange(len(seqs), dtype=np.int64)
        self.nodes: list[tuple[np.ndarray, ...]] = []  # (length, parent, level, lo, hi) batches
        self.num_nodes = 0
        self.ends: list[tuple[np.ndarray, ...]] = []  # (node, lo, hi): rows ending at node

    def run(self) -> PrefixTree:
        n = len(self.seqs)
        zero, one = np.zeros(1, np.int64), np.ones(1, np.int64)
        self._add_nodes(zero, -one, zero, zero, n * one)
        empty = self.lengths == 0  # they end at the root and sort first
        self.order = np.concatenate([np.flatnonzero(empty), np.flatnonzero(~empty)])
        first = int(empty.sum())
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
        rows = self.order[pos]
        mismatch, same = self._compare_to_leader(rows, gidx, g)
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
        new = self._split(
            g.take(split), (g.depth + m_group)[split], pos[members], rows[members], rank[gidx[members]]
        )
        merged = _Groups(*(np.concatenate([a, b]) for a, b in zip(moved, new)))
        return merged.take(np.argsort(merged.lo, kind="stable"))  # keeps gathers local

    def _compare_to_leader(self, rows: np.ndarray, gidx: np.ndarray, g: _Groups):
        """Per row: tokens after the group depth that agree with the group's first row (capped at
        the window), and whether the row is identical to that first row. A row with more than a
        window left that matches the leader's whole window (one memcmp) is the common case."""
        leader = self.order[g.lo]
        lead, lead_len = self._window(self.starts[leader] + g.depth), self.lengths[leader]
        mismatch = np.full(rows.size, _WINDOW, dtype=np.int64)
        same = np.zeros(rows.size, dtype=bool)
        for a in range(0, rows.size, _CHUNK_ROWS):
            r, gi = rows[a : a + _CHUNK_ROWS], gidx[a : a + _CHUNK_ROWS]
            len_r, len_l = self.lengths[r], lead_len[gi]
            common = np.minimum(len_r, len_l) - g.depth[gi]  # tokens both rows still have
            win = self._window(self.starts[r] + g.depth[gi])
            hard = np.flatnonzero((common <= _WINDOW) | (win != lead[gi]))
            m, ident = _first_difference(win[hard], lead[gi[hard]], common[hard])
            ident &= len_r[hard] == len_l[hard]
            mismatch[a + hard] = np.where(ident, _WINDOW, m)
            same[a + hard] = ident
        return mismatch, same

    def _window(self, base: np.ndarray) -> np.ndarray:
        """void [len(base)]: tokens[base : base + W] as one item; past the end they hold junk (masked)."""
        last = self.windows.size - 1
        win = self.windows[np.minimum(base, last)]
        late = np.flatnonzero(base > last)
        if late.size:
            idx = np.minimum(base[late, None] + np.arange(_WINDOW), self.tokens.size - 1)
            win[late] = np.ascontiguousarray(self.tokens[idx]).view(_WINDOW_TYPE).reshape(-1)
        return win

    def _finish_duplicates(self, g: _Groups) -> None:
        if g.lo.size:
            length = self.lengths[self.order[g.lo]]
            ids = self._add_nodes(length, g.parent, g.parent_level + 1, g.lo, g.hi)
            self.ends.append((ids, g.lo, g.hi))

    def _split(self, g: _Groups, depth: np.ndarray, pos, rows, gidx) -> _Groups:
        """Sort each group by its token at `depth` (the first one where members differ)."""
        if not g.lo.size:
            return g
        reuse = depth == g.parent_depth  # only the first group can branch at the root itself
        node = g.parent.copy()
        node[~reuse] = self._add_nodes(
            depth[~reuse], g.parent[~reuse], g.parent_level[~reuse] + 1, g.lo[~reuse], g.hi[~reuse]
        )
        level = np.where(reuse, g.parent_level, g.parent_level + 1)
        d = depth[gidx]
        has = self.lengths[rows] > d
        tok = self.tokens[np.where(has, self.starts[rows] + d, 0)].astype(np.uint64) + np.uint64(1)
        key = (gidx.astype(np.uint64) << np.uint64(32)) | np.where(has, tok, np.uint64(0))
        perm = np.argsort(key)
        key, rows = key[perm], rows[perm]
        self.order[pos] = rows
        first = np.flatnonzero(np.concatenate([[True], key[1:] != key[:-1]]))
        size = np.diff(np.append(first, key.size))
        sub = (key[first] >> np.uint64(32)).astype(np.int64)
        ended = (key[first] & np.uint64(0xFFFFFFFF)) == 0
        lo = pos[first]
        self.ends.append((node[sub[ended]], lo[ended], lo[ended] + size[ended]))
        single = ~ended & (size == 1)
        leaf_lo = lo[single]
        leaves = self._add_nodes(
            self.lengths[rows[first[single]]], node[sub[single]], level[sub[single]] + 1, leaf_lo, leaf_lo + 1
        )
        self.ends.append((leaves, leaf_lo, leaf_lo + 1))
        keep = ~ended & (size > 1)
        s = sub[keep]
        return _Groups(lo[keep], lo[keep] + size[keep], depth[s] + 1, node[s], depth[s], level[s])

    def _finish(self) -> PrefixTree:
        length, parent, level, lo, hi = (np.concatenate(c) for c in zip(*self.nodes))
        pre = np.lexsort((length, lo))  # DFS preorder: by first row, ancestors (shorter) first
        new_id = np.empty(pre.size, dtype=np.int64)
        new_id[pre] = np.arange(pre.size)
        parent = parent[pre]
        parent = np.where(parent >= 0, new_id[np.maximum(parent, 0)], -1)
        n = self.order.size
        row_leaf = np.empty(n, dtype=np.int64)
        if n:
            node, e_lo, e_hi = (np.concatenate(c) for c in zip(*self.ends))
            by_lo = np.argsort(e_lo)
            row_leaf[self.order] = np.repeat(new_id[node[by_lo]], (e_hi - e_lo)[by_lo])
        return PrefixTree(self.seqs, self.order, length[pre], parent, level[pre], lo[pre], hi[pre], row_leaf)
