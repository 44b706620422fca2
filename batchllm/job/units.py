"""A window's plan cut into work units: each runs on one engine, with every prefix its rows share.

A unit is a contiguous run of the plan's row order (its representative rows, with their duplicates)
plus every chosen prefix on their paths from the root. The cut works top-down: the root is cut into
its child groups and batches of the rows attached to it, packed in plan order into pieces of at most
``target`` work (~1/(4 * workers) of the window). A group holding at most ``2 * target`` stays whole,
in one piece. A bigger one is cut the same way one level down, and every piece carries the group's
prefix. A worker keeps a prefix between consecutive units that need it (``job.live_prefixes``) and the
units of a window are assigned in runs of this order (``job.assignment``), so the prefix is prefilled
once per worker that runs pieces of it, not once per piece. So with one system prompt shared by every
row, the groups beneath it, a few to a unit, become the units.

Predicted work = planned prefill tokens (repeated prefixes included) + representatives * max_new_tokens.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace

import numpy as np

from batchllm.config import SamplingParams
from batchllm.job.rows import RowBlock
from batchllm.job.samples import align_pieces
from batchllm.job.score_sequences import score_sequences
from batchllm.job.scoring import Continuations
from batchllm.prefix_tree.nodes import node_levels, subtree_reduce
from batchllm.prefix_tree.plan import Plan
from batchllm.scheduler.block_pool import blocks_for
from batchllm.scheduler.seq import Seq

UNITS_PER_WORKER = 4  # enough pieces that handing out the biggest first balances the workers


@dataclass(frozen=True, eq=False)
class WorkUnit:
    """Rows that run together on one engine; indices below are unit-local (row 0 .. len - 1)."""

    unit_id: str
    rows: RowBlock  # [rows] representatives and their duplicates
    token_ids: list[np.ndarray]  # [rows] each row's prompt
    keys: list[int]  # [rows] each row's sampling key
    rep: np.ndarray  # int64 [rows]: the row whose output this row copies (itself when unique)
    order: np.ndarray  # int64 [reps]: representative rows in execution order (depth first)
    row_node: np.ndarray  # int64 [rows]: the deepest shared prefix each row starts from (0: none)
    node_parent: np.ndarray  # int64 [nodes]: -1 at the root (node 0); parents come first
    node_tokens: list[np.ndarray]  # [nodes] each prefix's tokens, from the start of the prompt
    node_keys: tuple[int, ...]  # [nodes] each prefix's content key (see prefix_key), the same on any unit
    work: int  # predicted, see the module docstring
    params: list[SamplingParams | None] | None = None  # [rows] a row's own settings (None: the job's)
    continuations: list[Continuations] | None = None  # [rows] what each row scores (scoring jobs)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def num_groups(self) -> int:
        return len(self.node_tokens) - 1

    @property
    def depth(self) -> int:
        return int(node_levels(self.node_parent).max())

    def kv_blocks(self, block_size: int, max_new_tokens: int) -> tuple[int, int]:
        """(blocks to hold all the unit at once, blocks the longest row needs beside its prefixes)."""
        rows = [blocks_for(len(p) + max_new_tokens, block_size) for p in self.token_ids]
        if self.continuations is not None:  # a row prefix, and per continuation a copied block and its own
            rows = [
                blocks_for(len(p), block_size) + sum(blocks_for(len(c), block_size) + 1 for c in cont.ids)
                for p, cont in zip(self.token_ids, self.continuations)
            ]
        needed = sum(rows) + 2 * self.num_groups + 1
        least = max(rows, default=0) + self.depth + 1
        return needed, least

    def prefix_edges(self) -> dict[int, int]:
        """Prefix key -> the tokens that prefix computes itself (beyond its parent), root excluded."""
        lengths = [len(t) for t in self.node_tokens]
        parents = self.node_parent.tolist()
        return {self.node_keys[v]: lengths[v] - lengths[p] for v, p in enumerate(parents) if p >= 0}

    def row_prefill(self) -> int:
        """Tokens the representative rows compute beyond their prefixes."""
        starts = [len(t) for t in self.node_tokens]
        return sum(len(self.token_ids[r]) - starts[self.row_node[r]] for r in self.order.tolist())

    def duplicates(self) -> dict[int, list[int]]:
        """Representative -> the rows that copy its output."""
        dups: dict[int, list[int]] = {}
        for row in np.flatnonzero(self.rep != np.arange(len(self.rep))).tolist():
            dups.setdefault(int(self.rep[row]), []).append(row)
        return dups

    def without(self, committed: np.ndarray) -> WorkUnit | None:
        """The unit less the rows whose input row index is in ``committed``; None when nothing is left.

        A committed representative with uncommitted duplicates hands its place to the first of them."""
        keep = ~np.isin(self.rows.row_index, committed)
        if keep.all():
            return self
        if not keep.any():
            return None
        kept = np.flatnonzero(keep)
        heir = {}  # old representative -> first kept row copying it
        for row in kept.tolist():
            heir.setdefault(int(self.rep[row]), row)
        new_index = np.full(len(self), -1, dtype=np.int64)
        new_index[kept] = np.arange(kept.size)
        order = [new_index[heir[r]] for r in self.order.tolist() if r in heir]
        rep = new_index[[heir[int(r)] for r in self.rep[kept].tolist()]]
        return replace(
            self,
            rows=self.rows.take(kept),
            token_ids=[self.token_ids[i] for i in kept.tolist()],
            keys=[self.keys[i] for i in kept.tolist()],
            params=None if self.params is None else [self.params[i] for i in kept.tolist()],
            rep=rep,
            order=np.asarray(order, dtype=np.int64),
            row_node=self.row_node[kept],
            continuations=None
            if self.continuations is None
            else [self.continuations[i] for i in kept.tolist()],
            work=max(1, self.work * len(order) // max(1, len(self.order))),
        )


def largest_kv_blocks(units: list[WorkUnit], block_size: int, max_new_tokens: int) -> int:
    """KV blocks the largest unit needs all at once: a worker's pool that size keeps its prefixes
    for later units without ever being replaced by a larger one."""
    return max((u.kv_blocks(block_size, max_new_tokens)[0] for u in units), default=0)


def prefix_key(tokens: np.ndarray) -> int:
    """A prefix's content key: equal token ids give equal keys in every process (unlike ``hash``)."""
    data = np.ascontiguousarray(tokens, dtype=np.int64).tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def unit_sequences(unit: WorkUnit, live: Mapping[int, Seq] | None = None) -> Iterator[Seq]:
    """Engine work in execution order: each shared prefix just before the first row beneath it.

    A row's ``index`` is its unit-local row, a prefix's its unit node id. A prefix found in ``live``
    (by key: prefilled by an earlier unit and kept, under the same parent) is not yielded again: the
    unit's rows beneath it are added to its pending rows and borrow its KV."""
    weights = None  # a scoring row is one sequence per continuation, each holding its prefixes
    if unit.continuations is not None:
        weights = np.asarray([len(unit.continuations[r]) for r in unit.order.tolist()], dtype=np.int64)
    direct = np.bincount(unit.row_node[unit.order], weights, len(unit.node_parent)).astype(np.int64)
    pending = subtree_reduce(unit.node_parent, direct)
    nodes: dict[int, Seq] = {}

    def node_seq(node_id: int) -> Iterator[Seq]:
        if node_id == 0 or node_id in nodes:
            return
        parent = int(unit.node_parent[node_id])
        yield from node_seq(parent)
        tokens = unit.node_tokens[node_id].tolist()
        kept = live.get(unit.node_keys[node_id]) if live else None
        if kept is not None and kept.parent is nodes.get(parent) and kept.token_ids == tokens:
            kept.pending_rows += int(pending[node_id])
            nodes[node_id] = kept
            return
        seq = Seq.prefix(node_id, tokens, nodes.get(parent), int(pending[node_id]))
        nodes[node_id] = seq
        yield seq

    if unit.continuations is not None:
        yield from score_sequences(unit, node_seq, nodes)
        return
    for row in unit.order.tolist():
        node_id = int(unit.row_node[row])
        yield from node_seq(node_id)
        params = unit.params[row] if unit.params is not None else None
        yield Seq.row(row, unit.token_ids[row].tolist(), nodes.get(node_id), unit.keys[row], params)


@dataclass(frozen=True, eq=False)
class PlannedRows:
    """What the cut needs besides the plan: the planned rows (index i = the plan's row i)."""

    rows: RowBlock
    token_ids: list[np.ndarray]
    keys: list[int]
    max_new_tokens: int
    params: list[SamplingParams | None] | None = None
    continuations: list[Continuations] | None = None  # scoring jobs: what each row scores


def split_plan(plan: Plan, planned: PlannedRows, workers: int, prefix: str = "u") -> list[WorkUnit]:
    """The plan as work units: the whole plan for one worker, else cut as the module docstring says."""
    n = len(plan.row_order)
    if n == 0:
        return []
    if workers <= 1:
        return [_unit(plan, planned, f"{prefix}0", 0, n)]
    cut = _Cut(plan, planned.max_new_tokens)
    cut.target = max(1, cut.total // (UNITS_PER_WORKER * workers))
    pieces = [(s, e) for s, e, _ in cut.pieces(0)]
    if planned.rows.sample is not None:  # a row's samples commit together: never split them
        pieces = align_pieces(pieces, planned.rows.row_index[plan.row_order])
    return [_unit(plan, planned, f"{prefix}{i}", s, e) for i, (s, e) in enumerate(pieces)]


class _Cut:
    """Per-node sums over the plan, and the recursive cut (pieces are [start, end) of row_order)."""

    def __init__(self, plan: Plan, max_new: int) -> None:
        self.plan = plan
        length, parent = plan.node_length, plan.node_parent
        self.edge = length - length[np.maximum(parent, 0)]
        self.edge[0] = 0
        pos_node = plan.row_node[plan.row_order]
        self.row_work = plan.seqs.lengths[plan.row_order] - length[pos_node] + max_new
        # below[v]: the work beneath v's own prefix: its rows, and its descendants' edges
        direct = np.bincount(pos_node, weights=self.row_work, minlength=plan.num_nodes).astype(np.int64)
        self.below = subtree_reduce(parent, direct + self.edge) - self.edge
        first = np.full(plan.num_nodes, len(pos_node), dtype=np.int64)
        np.minimum.at(first, pos_node, np.arange(len(pos_node)))
        self.first = subtree_reduce(parent, first, np.minimum)
        self.children: list[list[int]] = [[] for _ in range(plan.num_nodes)]
        for v in range(plan.num_nodes - 1, 0, -1):  # preorder: children after parents
            self.children[int(parent[v])].append(v)
        counts = np.bincount(pos_node, minlength=plan.num_nodes)
        self.direct = np.split(np.argsort(pos_node, kind="stable"), np.cumsum(counts)[:-1])
        self.total = int(self.below[0])
        self.target = self.total

    def pieces(self, v: int) -> list[tuple[int, int, int]]:
        """(start, end, work beneath v's prefix) per piece of v's subtree."""
        plan, lv = self.plan, int(self.plan.node_length[v])
        whole = [(int(self.first[v]), int(self.first[v] + plan.node_num_rows[v]), int(self.below[v]))]
        if v != 0 and lv + self.below[v] <= 2 * self.target:
            return whole
        items = [(p, p + 1, int(self.row_work[p])) for p in self.direct[v].tolist()]
        for c in self.children[v]:
            items += [(s, e, w + int(self.edge[c])) for s, e, w in self.pieces(c)]
        items.sort()
        if v == 0:
            return _pack(items, self.target)
        packed = _pack(items, self.target)  # every piece carries v's prefix, prefilled once per worker
        return packed if len(packed) > 1 else whole


def _pack(items: list[tuple[int, int, int]], budget: int) -> list[tuple[int, int, int]]:
    """Neighbouring items (consecutive ranges) joined while their work fits ``budget``."""
    out: list[tuple[int, int, int]] = []
    for s, e, w in items:
        if out and out[-1][2] + w <= budget:
            out[-1] = (out[-1][0], e, out[-1][2] + w)
        else:
            out.append((s, e, w))
    return out


def _unit(plan: Plan, planned: PlannedRows, unit_id: str, start: int, end: int) -> WorkUnit:
    reps = plan.row_order[start:end]
    dup_of = plan.duplicate_of
    dups = np.flatnonzero(np.isin(dup_of, reps) & (dup_of != np.arange(dup_of.size)))
    members = np.concatenate([reps, dups])
    nodes = _with_ancestors(plan, np.unique(plan.row_node[reps]))
    rep_local = np.full(dup_of.size, -1, dtype=np.int64)
    rep_local[reps] = np.arange(reps.size)
    parents = plan.node_parent[nodes]
    lengths = plan.node_length[nodes]
    src = plan.node_source_row[nodes]
    node_tokens = [planned.token_ids[s][:n] for s, n in zip(src.tolist(), lengths.tolist())]
    work = int((lengths - np.where(parents >= 0, plan.node_length[np.maximum(parents, 0)], 0)).sum())
    row_node = plan.row_node[members]
    work += int((plan.seqs.lengths[reps] - plan.node_length[plan.row_node[reps]]).sum())
    return WorkUnit(
        unit_id=unit_id,
        rows=planned.rows.take(members),
        token_ids=[planned.token_ids[i] for i in members.tolist()],
        keys=[planned.keys[i] for i in members.tolist()],
        rep=rep_local[dup_of[members]],
        order=np.arange(reps.size, dtype=np.int64),
        row_node=np.searchsorted(nodes, row_node),
        node_parent=np.where(parents >= 0, np.searchsorted(nodes, np.maximum(parents, 0)), -1),
        node_tokens=node_tokens,
        node_keys=tuple(prefix_key(t) for t in node_tokens),
        work=work + reps.size * planned.max_new_tokens,
        params=None if planned.params is None else [planned.params[i] for i in members.tolist()],
        continuations=None
        if planned.continuations is None
        else [planned.continuations[i] for i in members.tolist()],
    )


def _with_ancestors(plan: Plan, nodes: np.ndarray) -> np.ndarray:
    """Sorted node ids: ``nodes``, every ancestor of them, and the root."""
    found = [np.zeros(1, dtype=np.int64), nodes]
    current = nodes
    while current.size:
        current = np.unique(plan.node_parent[current])
        current = current[current > 0]
        found.append(current)
    return np.unique(np.concatenate(found))
