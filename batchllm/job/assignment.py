"""Which worker runs which unit: prefix-affine queues, and stealing only when a worker would idle.

Units come in the plan's depth-first order, so neighbours share prefixes. Each worker starts with one
contiguous run of them, of about equal predicted work, cut where neighbours share the fewest prefix
tokens among the cuts within a quarter share of the equal-work points: whole groups to a worker, so
under one system prompt over the whole window each worker prefills that prompt once and nothing else
twice. After each unit a worker keeps (``Handout.keep``) the prefixes of that unit, and those it kept
before, that a unit still queued anywhere needs; so it never prefills a prefix twice while units under
it wait, and finds it live if it steals them.

A worker with an empty queue first takes a dead worker's units (one at a time, in plan order), else
steals the tail of the queue with the most work left, cut between the two neighbours that share the
fewest prefix tokens it does not hold already (the shallowest cut), preferring cuts that give it a
third to two thirds of that queue's work: the extra prefill is one copy of the prefixes above the cut.
A cut that copies any prefix (a group cut across workers) is taken only while the window's copy
budget lasts: ``COPY_BUDGET`` of its planned prefill, less what the first split copied. Past it the
worker waits (a group runs whole on one worker), so prefill with W workers stays within one worker's
plus (W - 1) copies of the prefixes every unit shares, plus that budget.

``simulate`` runs the same assignment with equally fast workers, for ``batchllm plan --workers N``.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from batchllm.job.units import WorkUnit

COPY_BUDGET = 0.01  # of a window's planned prefill: prefix copies stealing may add beyond the shared ones


@dataclass(frozen=True)
class Handout:
    unit: WorkUnit
    keep: frozenset[int]  # prefix keys the worker holds after this unit, for units still queued


class Assignment:
    def __init__(self, units: list[WorkUnit], workers: list[str]) -> None:
        self._pos = {u.unit_id: i for i, u in enumerate(units)}
        self._keys = {u.unit_id: frozenset(u.prefix_edges()) for u in units}
        self._edges: dict[int, int] = {}  # prefix key -> its own tokens
        for u in units:
            self._edges.update(u.prefix_edges())
        self._queued: Counter[int] = Counter()  # prefix key -> queued units that need it
        for u in units:
            self._queued.update(self._keys[u.unit_id])
        # prefixes every unit needs: each worker prefills them once, whatever the split
        self._common = frozenset.intersection(*self._keys.values()) if units else frozenset()
        bounds = _contiguous(units, len(workers), self._cut_copies)
        self.queues: dict[str, deque[WorkUnit]] = {
            name: deque(units[a:b]) for name, a, b in zip(workers, bounds[:-1], bounds[1:])
        }
        planned = sum(self._edges.values()) + sum(u.row_prefill() for u in units)
        first = sum(self._cut_copies(units, j) for j in set(bounds) if 0 < j < len(units))
        self.budget = max(0, int(COPY_BUDGET * planned) - first)  # prefix tokens steals may copy
        self.orphans: list[WorkUnit] = []  # a dead worker's units, in plan order
        self.held: dict[str, frozenset[int]] = {}  # worker -> the keep of its last handout

    def __bool__(self) -> bool:
        return bool(self.orphans) or any(self.queues.values())

    def next_for(self, worker: str) -> Handout | None:
        """The next unit for an idle ``worker`` (stealing if its queue is empty); None: nothing left that
        it may take (the rest is queued for others, in groups the copy budget keeps whole)."""
        queue = self.queues.setdefault(worker, deque())
        if not queue:
            self._refill(worker)
        if not queue:
            return None
        unit = queue.popleft()
        keys = self._keys[unit.unit_id]
        self._queued.subtract(keys)
        held = keys | self.held.get(worker, frozenset())
        keep = frozenset(k for k in held if self._queued[k] > 0)
        self.held[worker] = keep
        return Handout(unit, keep)

    def give_back(self, unit: WorkUnit) -> None:
        """A unit (what is left of it) whose worker died: the next idle worker takes it."""
        self._queued.update(self._keys[unit.unit_id])
        self.orphans.append(unit)
        self.orphans.sort(key=lambda u: self._pos[u.unit_id])

    def retire(self, worker: str) -> None:
        """A dead worker: its queued units become orphans, its held prefixes are gone."""
        self.orphans += self.queues.pop(worker, deque())
        self.orphans.sort(key=lambda u: self._pos[u.unit_id])
        self.held.pop(worker, None)

    def _refill(self, thief: str) -> None:
        if self.orphans:
            self.queues[thief].append(self.orphans.pop(0))
            return
        others = [w for w, q in self.queues.items() if q and w != thief]
        if not others:
            return
        victim = max(others, key=lambda w: sum(u.work for u in self.queues[w]))
        queue = list(self.queues[victim])
        cut = self._cut(queue, victim, thief)
        if cut is None:
            return
        self.budget -= cut.copies
        self.queues[victim] = deque(queue[: cut.at])
        self.queues[thief].extend(queue[cut.at :])

    def _cut(self, queue: list[WorkUnit], victim: str, thief: str) -> _Steal | None:
        """Where the thief's tail of ``queue`` starts (see the module docstring); None: no cut the copy
        budget allows."""
        works = np.array([u.work for u in queue], dtype=np.int64)
        tail = np.cumsum(works[::-1])[::-1]  # tail[j]: work of queue[j:]
        total = int(tail[0])
        thief_held = self.held.get(thief, frozenset())

        def copied(j: int) -> int:
            before = self._keys[queue[j - 1].unit_id] if j else self.held.get(victim, frozenset())
            return sum(self._edges[k] for k in (self._keys[queue[j].unit_id] & before) - thief_held)

        costs = [copied(j) for j in range(len(queue))]
        allowed = [j for j in range(len(queue)) if costs[j] <= self.budget]
        if not allowed:
            return None

        def rank(j: int) -> tuple:
            fair = total <= 3 * tail[j] <= 2 * total
            return costs[j] > 0, not fair, costs[j], abs(2 * int(tail[j]) - total)

        at = min(allowed, key=rank)
        return _Steal(at, costs[at])

    def _cut_copies(self, units: list[WorkUnit], j: int) -> int:
        """Prefix tokens copied when units[:j] and units[j:] run on two workers, beyond the common ones."""
        shared = self._keys[units[j - 1].unit_id] & self._keys[units[j].unit_id]
        return sum(self._edges[k] for k in shared - self._common)

    def check_invariants(self) -> None:
        queued = [u for q in self.queues.values() for u in q] + self.orphans
        ids = [u.unit_id for u in queued]
        if len(set(ids)) != len(ids):
            raise AssertionError("a unit is queued twice")
        if self.budget < 0:
            raise AssertionError("steals copied more prefix tokens than the budget")
        counts = Counter(k for u in queued for k in self._keys[u.unit_id])
        if +self._queued != counts:
            raise AssertionError("queued prefix counts disagree with the queues")
        for queue in self.queues.values():
            pos = [self._pos[u.unit_id] for u in queue]
            if pos != sorted(pos):
                raise AssertionError("a queue is out of plan order")


@dataclass(frozen=True)
class _Steal:
    at: int  # the thief takes queue[at:]
    copies: int  # prefix tokens it prefills that another worker holds or will hold


def _contiguous(units: list[WorkUnit], n: int, copies: Callable[[list[WorkUnit], int], int]) -> list[int]:
    """Bounds of ``n`` contiguous runs of ``units`` of about equal work (some empty when units are
    few): each cut, among those within a quarter share of an equal-work point, copies the fewest prefix
    tokens (``copies(units, j)`` for a cut before units[j]), then lies nearest that point."""
    if len(units) < 2:
        return [0] + [len(units)] * n
    ends = np.cumsum([u.work for u in units])[:-1]  # ends[j - 1]: work before a cut at j
    total = sum(u.work for u in units)
    cuts = []
    for k in range(1, n):
        off = np.abs(ends - total * k / n)
        near = (np.flatnonzero(off <= total / (4 * n)) + 1).tolist() or [int(off.argmin()) + 1]
        cuts.append(min(near, key=lambda j: (copies(units, j), off[j - 1])))
    return np.maximum.accumulate([0, *cuts, len(units)]).tolist()


def simulate(units: list[WorkUnit], workers: int) -> dict[str, dict[str, int]]:
    """Per worker, with equally fast workers (work = predicted work): units, prefill tokens computed,
    and how many of those are prefix copies (a prefix some worker prefilled before)."""
    names = [f"w{i}" for i in range(workers)]
    assignment = Assignment(units, names)
    clock = dict.fromkeys(names, 0)
    held = dict.fromkeys(names, frozenset())
    out = {n: {"units": 0, "prefill_tokens": 0, "prefix_copy_tokens": 0} for n in names}
    seen: set[int] = set()
    active = set(names)
    while active:
        worker = min(active, key=lambda w: (clock[w], w))
        handout = assignment.next_for(worker)
        if handout is None:
            active.discard(worker)
            continue
        unit = handout.unit
        new = {k: t for k, t in unit.prefix_edges().items() if k not in held[worker]}
        mine = out[worker]
        mine["units"] += 1
        mine["prefill_tokens"] += sum(new.values()) + unit.row_prefill()
        mine["prefix_copy_tokens"] += sum(t for k, t in new.items() if k in seen)
        seen |= new.keys()
        held[worker] = handout.keep
        clock[worker] += unit.work
    return out
