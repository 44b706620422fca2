"""Choose the shared prefixes worth computing once, and the order the rows run in.

The tree is built over each row less its *tail*: the trailing tokens the row must compute itself (one,
to get the logits of its next token; a scored continuation's tokens plus one). So a row may attach to
any prefix that leaves its tail to it, and identical prompts (sampled N ways, or duplicates under
sampling) share everything but their last token.

Selection, bottom-up over that tree (deepest nodes first, one vectorised step per level):

    units(v)  = rows ending at v + sum over children c of (1 if c is chosen else units(c))
    saving(v) = (units(v) - 1) * (length(v) - length(parent(v)))
    chosen(v) = saving(v) > min_saving_tokens

A unit is something that would compute v's edge tokens by itself: a row, or a chosen child
(which computes them once for all its rows; so a 1-token "The" shared by two chosen system
prompts saves one token, not one per row). Like BatchLLM's rule, a prefix is kept where sharing
saves more than it costs; here the cost is a fixed per-node overhead, `min_saving_tokens`
(default 32 ~ two 16-token KV blocks: a partial block copied per child and one extra prefill
sequence), so two rows sharing a few accidental tokens never make a node. The saving counts only
the node's own edge; where the parent is dropped the true saving is larger, by less than
`min_saving_tokens` (the parent fell below it), so the rule errs towards fewer, safer nodes.

A row attaches to its deepest chosen prefix that leaves its tail to it. Rows run depth first: every
chosen prefix's rows are contiguous in `row_order`, so its KV is live only while its subtree runs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from batchllm.prefix_tree.nodes import by_level, node_levels, subtree_reduce
from batchllm.prefix_tree.seqs import TokenSeqs, TokenSpans, ragged_equal, require
from batchllm.prefix_tree.tree import PrefixTree
from batchllm.prefix_tree.whole_rows import whole_rows

DEFAULT_MIN_SAVING_TOKENS = 32


@dataclass(frozen=True)
class PlanStats:
    rows: int
    prompt_tokens: int  # all rows' lengths, duplicates included
    unique_prompt_tokens: int  # distinct non-empty prefixes: the least any engine must prefill
    prefill_tokens_planned: int  # chosen nodes' own tokens + each representative's distinct tokens
    saving_ratio: float  # 1 - planned / prompt_tokens
    groups: int  # chosen non-root nodes
    avg_sharing_degree: float  # mean num_rows of the groups
    avg_prefix_tokens: float  # mean length of the groups
    avg_distinct_tokens: float  # mean over representative rows of len - node length
    duplicate_rows: int  # rows that are not their own representative
    max_tree_depth: int  # nesting depth of the groups (0: no groups)

    def to_dict(self) -> dict[str, int | float]:
        return asdict(self)

    @staticmethod
    def combine(stats: list[PlanStats]) -> PlanStats:
        """Several plans (one per window) as one: sums, and means weighted by groups or representatives."""
        groups = sum(s.groups for s in stats)
        reps = sum(s.rows - s.duplicate_rows for s in stats)
        prompt = sum(s.prompt_tokens for s in stats)
        planned = sum(s.prefill_tokens_planned for s in stats)

        def mean(name: str, weight: str) -> float:
            total = groups if weight == "groups" else reps
            weights = [s.groups if weight == "groups" else s.rows - s.duplicate_rows for s in stats]
            return sum(getattr(s, name) * w for s, w in zip(stats, weights)) / total if total else 0.0

        return PlanStats(
            rows=sum(s.rows for s in stats),
            prompt_tokens=prompt,
            unique_prompt_tokens=sum(s.unique_prompt_tokens for s in stats),
            prefill_tokens_planned=planned,
            saving_ratio=1.0 - planned / prompt if prompt else 0.0,
            groups=groups,
            avg_sharing_degree=mean("avg_sharing_degree", "groups"),
            avg_prefix_tokens=mean("avg_prefix_tokens", "groups"),
            avg_distinct_tokens=mean("avg_distinct_tokens", "reps"),
            duplicate_rows=sum(s.duplicate_rows for s in stats),
            max_tree_depth=max((s.max_tree_depth for s in stats), default=0),
        )


@dataclass(frozen=True, eq=False)
class Plan:
    """Chosen prefix nodes (DFS preorder, node 0 = root, parents first) and the rows' schedule."""

    seqs: TokenSeqs | TokenSpans  # the rows planned (spans: samples of a prompt share its tokens)
    node_length: np.ndarray  # int64 [num_nodes]
    node_parent: np.ndarray  # int64 [num_nodes]; -1 only at the root
    node_source_row: np.ndarray  # int64 [num_nodes]
    node_num_rows: np.ndarray  # int64 [num_nodes]
    row_order: np.ndarray  # int64 [num_representatives]: execution order, depth first
    row_node: np.ndarray  # int64 [num_rows]: deepest chosen prefix of each row (0: none)
    duplicate_of: np.ndarray  # int64 [num_rows]: representative row (itself if unique)
    stats: PlanStats

    @property
    def num_nodes(self) -> int:
        return int(self.node_length.size)

    def check_invariants(self) -> None:
        """Raise InvariantError unless the plan is consistent with itself and with `seqs`."""
        n, lengths, length, parent = len(self.seqs), self.seqs.lengths, self.node_length, self.node_parent
        require(self.num_nodes >= 1 and parent[0] == -1 and length[0] == 0, "node 0 must be the root")
        p = parent[1:]
        require(bool(np.all((p >= 0) & (p < np.arange(1, self.num_nodes)))), "parents must come first")
        require(bool(np.all(length[p] < length[1:])), "a group must be longer than its parent")
        require(bool(np.all(length[self.row_node] < lengths)), "a row must compute >= 1 token itself")
        dup = self.duplicate_of
        require(bool(np.all(dup[dup] == dup)), "a representative must represent itself")
        require(bool(np.all(lengths[dup] == lengths)), "a duplicate must be as long as its original")
        require(bool(np.all(self.row_node[dup] == self.row_node)), "duplicates must share a node")
        reps = np.flatnonzero(dup == np.arange(n))
        require(np.array_equal(np.sort(self.row_order), reps), "row_order must list each rep once")
        self._check_contiguous()
        self._check_tokens(reps)
        require(_planned_tokens(self, reps) == self.stats.prefill_tokens_planned, "stats are stale")

    def _check_contiguous(self) -> None:
        rows = self.row_order
        parent, level = self.node_parent, node_levels(self.node_parent)
        pos = np.arange(rows.size)
        count = subtree_reduce(
            parent, np.bincount(self.row_node[rows], minlength=self.num_nodes), level=level
        )
        big = np.iinfo(np.int64).max
        first = np.full(self.num_nodes, big)
        last = np.full(self.num_nodes, -1)
        np.minimum.at(first, self.row_node[rows], pos)
        np.maximum.at(last, self.row_node[rows], pos)
        first = subtree_reduce(parent, first, np.minimum, level)
        last = subtree_reduce(parent, last, np.maximum, level)
        require(np.array_equal(count, self.node_num_rows), "num_rows must count the rows beneath")
        has = count > 0
        require(bool(np.all(last[has] - first[has] + 1 == count[has])), "a group's rows must be contiguous")

    def _check_tokens(self, reps: np.ndarray) -> None:
        starts, tokens, src = self.seqs.starts, self.seqs.tokens, self.node_source_row
        p = self.node_parent[1:]
        require(
            ragged_equal(tokens, starts[src[1:]], starts[src[p]], self.node_length[p]),
            "a group must extend its parent's prefix",
        )
        node_src = starts[src[self.row_node]]
        require(
            ragged_equal(tokens, starts, node_src, self.node_length[self.row_node]),
            "a row must start with its group's prefix",
        )
        dup = self.duplicate_of
        require(ragged_equal(tokens, starts, starts[dup], self.seqs.lengths), "duplicates must be equal")


def make_plan(
    seqs: TokenSeqs | TokenSpans,
    *,
    tails: np.ndarray | None = None,
    sharing: bool = True,
    min_saving_tokens: int = DEFAULT_MIN_SAVING_TOKENS,
    dedup: bool = True,
) -> Plan:
    """Plan `seqs` (rows must not be empty): build the global prefix tree over the rows less their
    tails (``tails[i]`` >= 1 tokens of row i it computes itself; default 1), then `plan_tree`."""
    _check_options(min_saving_tokens)  # before the build, which is the slow part
    tails = np.ones(len(seqs), dtype=np.int64) if tails is None else np.asarray(tails, dtype=np.int64)
    tree = PrefixTree.build(seqs.heads(tails))  # spans over seqs' own buffer: no token copied
    return plan_tree(tree, seqs, sharing=sharing, min_saving_tokens=min_saving_tokens, dedup=dedup)


def plan_tree(
    tree: PrefixTree,
    seqs: TokenSeqs | TokenSpans,
    *,
    sharing: bool = True,
    min_saving_tokens: int = DEFAULT_MIN_SAVING_TOKENS,
    dedup: bool = True,
) -> Plan:
    """Choose groups on a tree already built over ``seqs`` less each row's tail (see the module
    docstring for the rule); rows run in the tree's lexicographic order, which is depth first."""
    _check_options(min_saving_tokens)
    n = tree.num_rows
    whole = whole_rows(tree, seqs)  # duplicates and distinct tokens of the whole rows
    dup = whole.duplicate_of if dedup else np.arange(n, dtype=np.int64)
    is_rep = dup == np.arange(n)
    ending = np.bincount(tree.row_leaf, weights=is_rep, minlength=tree.num_nodes).astype(np.int64)
    chosen = _choose(tree, ending, min_saving_tokens) if sharing else np.zeros(tree.num_nodes, bool)
    chosen[0] = True
    above = _chosen_above(tree, chosen)
    plan_id = np.cumsum(chosen) - 1
    idx = np.flatnonzero(chosen)
    below = np.concatenate([[0], np.cumsum(is_rep[tree.order])])
    num_rows = (below[tree.node_hi] - below[tree.node_lo])[idx]
    parent = np.where(idx > 0, plan_id[np.maximum(above[idx], 0)], -1)
    leaf = tree.row_leaf
    row_node = plan_id[np.where(chosen[leaf], leaf, above[leaf])]
    length = tree.node_length[idx]
    row_order = tree.order[is_rep[tree.order]]
    stats = _stats(seqs, whole.unique_prompt_tokens, length, parent, num_rows, row_node, dup)
    return Plan(seqs, length, parent, tree.node_row[idx], num_rows, row_order, row_node, dup, stats)


def _check_options(min_saving_tokens: int) -> None:
    if min_saving_tokens < 0:
        raise ValueError(f"min_saving_tokens must be >= 0, got {min_saving_tokens}")


def _choose(tree: PrefixTree, ending: np.ndarray, min_saving: int) -> np.ndarray:
    """bool [num_nodes]: nodes whose sharing saves more than `min_saving` tokens (bottom-up)."""
    parent, length = tree.node_parent, tree.node_length
    edge = length - length[np.maximum(parent, 0)]
    units = np.zeros(tree.num_nodes, dtype=np.int64)
    chosen = np.zeros(tree.num_nodes, dtype=bool)
    for v in reversed(by_level(tree.node_level)[1:]):
        units[v] += ending[v]
        take = (units[v] - 1) * edge[v] > min_saving
        chosen[v] = take
        np.add.at(units, parent[v], np.where(take, 1, units[v]))
    return chosen


def _chosen_above(tree: PrefixTree, chosen: np.ndarray) -> np.ndarray:
    """int64 [num_nodes]: nearest chosen proper ancestor of each node (-1 for the root)."""
    above = np.full(tree.num_nodes, -1, dtype=np.int64)
    for v in by_level(tree.node_level)[1:]:
        p = tree.node_parent[v]
        above[v] = np.where(chosen[p], p, above[p])
    return above


def _stats(seqs: TokenSeqs | TokenSpans, unique: int, length, parent, num_rows, row_node, dup) -> PlanStats:
    lengths = seqs.lengths
    reps = np.flatnonzero(dup == np.arange(dup.size))
    own = length[1:] - length[parent[1:]]
    distinct = lengths[reps] - length[row_node[reps]]
    planned = int(own.sum() + distinct.sum())
    prompt = int(lengths.sum())
    groups = int(length.size - 1)
    return PlanStats(
        rows=int(dup.size),
        prompt_tokens=prompt,
        unique_prompt_tokens=unique,
        prefill_tokens_planned=planned,
        saving_ratio=1.0 - planned / prompt if prompt else 0.0,
        groups=groups,
        avg_sharing_degree=float(num_rows[1:].mean()) if groups else 0.0,
        avg_prefix_tokens=float(length[1:].mean()) if groups else 0.0,
        avg_distinct_tokens=float(distinct.mean()) if reps.size else 0.0,
        duplicate_rows=int(dup.size - reps.size),
        max_tree_depth=int(node_levels(parent).max()),
    )


def _planned_tokens(plan: Plan, reps: np.ndarray) -> int:
    length, parent = plan.node_length, plan.node_parent
    distinct = plan.seqs.lengths[reps] - length[plan.row_node[reps]]
    return int((length[1:] - length[parent[1:]]).sum() + distinct.sum())
