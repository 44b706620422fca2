"""What a tree over rows less their tails says about the whole rows: which rows are duplicates, and
how many distinct prefixes the whole rows have (the least any engine must prefill).

With one-token tails (every generation job) both follow from that tree and each row's last token,
with no second build: two rows are identical iff they end at the same leaf and share their last
token, and the whole rows' prefixes are the tailed rows' prefixes plus each distinct whole row that
no tailed row extends, i.e. whose leaf has no child edge starting with the row's last token.

    row  a b c | d      leaf(abc) has a child edge "d..."  ->  abcd is a prefix of a tailed row
               ^ tail

Longer tails (scoring jobs) build a second tree over the whole rows.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from batchllm.prefix_tree.seqs import TokenSeqs, TokenSpans
from batchllm.prefix_tree.tree import PrefixTree

_TOKEN_BITS = np.int64(31)  # token ids lie in [0, 2**31): (node << 31) | token is a unique int64


class WholeRows(NamedTuple):
    duplicate_of: np.ndarray  # int64 [num_rows]: the smallest row index with the identical prompt
    unique_prompt_tokens: int  # distinct non-empty prefixes of the whole rows


def whole_rows(tree: PrefixTree, seqs: TokenSeqs | TokenSpans) -> WholeRows:
    """Duplicates and distinct prefixes of ``seqs``, given ``tree`` built over them less their tails."""
    n = len(seqs)
    if n == 0:
        return WholeRows(np.zeros(0, dtype=np.int64), 0)
    if np.any(seqs.lengths - tree.seqs.lengths != 1):
        full = PrefixTree.build(seqs)
        return WholeRows(full.duplicate_of(), full.unique_prompt_tokens)
    last = seqs.tokens[seqs.starts + seqs.lengths - 1].astype(np.int64)
    key = (tree.row_leaf << _TOKEN_BITS) | last  # equal keys: identical rows
    perm = np.argsort(key, kind="stable")
    key = key[perm]
    first = np.concatenate([[True], key[1:] != key[:-1]])
    duplicate_of = np.empty(n, dtype=np.int64)
    duplicate_of[perm] = perm[first][np.cumsum(first) - 1]  # stable: a run starts at its least row
    edges = np.sort(_child_edges(tree))  # np.isin would hash: ~10x slower on a million keys
    at = np.minimum(np.searchsorted(edges, key[first]), max(edges.size - 1, 0))
    extended = edges[at] == key[first] if edges.size else np.zeros(at.size, dtype=bool)
    return WholeRows(duplicate_of, tree.unique_prompt_tokens + int((~extended).sum()))


def _child_edges(tree: PrefixTree) -> np.ndarray:
    """int64 [num_nodes - 1]: (parent << 31) | first token of the edge, for every non-root node."""
    parent = tree.node_parent[1:]
    rows = tree.node_row[1:]
    token = tree.seqs.tokens[tree.seqs.starts[rows] + tree.node_length[parent]]
    return (parent << _TOKEN_BITS) | token.astype(np.int64)
