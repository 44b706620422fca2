"""Vectorised walks over a forest given as parent pointers (the tree's nodes, a plan's groups, a unit's
prefixes): nesting levels, nodes by level, and reductions of a value over each node's subtree."""

from __future__ import annotations

import numpy as np


def node_levels(parent: np.ndarray) -> np.ndarray:
    """int64 [num_nodes]: nesting depth of each node (roots, parent -1, are 0), by pointer jumping."""
    up = np.where(parent < 0, np.arange(parent.size), parent)
    level = (parent >= 0).astype(np.int64)
    while np.any(up[up] != up):
        level = level + level[up]  # a root's own level is 0, so roots add nothing
        up = up[up]
    return level


def by_level(level: np.ndarray) -> list[np.ndarray]:
    """Node ids grouped by level: element l holds the nodes at nesting depth l."""
    if level.size == 0:
        return []
    ids = np.argsort(level, kind="stable")
    bounds = np.searchsorted(level[ids], np.arange(int(level.max()) + 2))
    return [ids[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def subtree_reduce(
    parent: np.ndarray, values: np.ndarray, ufunc: np.ufunc = np.add, level: np.ndarray | None = None
) -> np.ndarray:
    """``values`` reduced over each node's subtree with ``ufunc`` (children folded into their parents,
    deepest level first); ``level`` may be passed when it is known already."""
    out = values.copy()
    levels = by_level(node_levels(parent) if level is None else level)
    for v in reversed(levels[1:]):
        ufunc.at(out, parent[v], out[v])
    return out
