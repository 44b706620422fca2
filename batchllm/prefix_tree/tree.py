"""One compressed radix tree over every prompt's token ids: its nodes, the queries the planner asks of
it, and its invariant check. `builder.py` builds it (a vectorised sort, no Python loop per token).

    order:   r7 r2 r9 r4 ...   rows in lexicographic order (any prefix's rows are contiguous)
    node v:  [lo, hi)          the positions in `order` of the rows that start with v's prefix
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from batchllm.prefix_tree.builder import sort_rows
from batchllm.prefix_tree.seqs import TokenSeqs, TokenSpans, ragged_equal, require


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
        return cls(seqs, *sort_rows(seqs))

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
