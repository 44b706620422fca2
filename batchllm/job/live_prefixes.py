"""A worker's table of live prefixes: prefilled prefix KV kept between its units.

Units of one window that share a prefix (one system prompt over every group) run one after another on
a worker. Whoever hands out the units knows which prefixes units still queued need (``keep``): the
worker keeps exactly those, so a later unit under the same prefix borrows its KV instead of prefilling
it again. A kept prefix holds one extra pending "row" (the hold) in the scheduler, so the scheduler's
own refcounting keeps its blocks while the units beneath it run; dropping the hold frees the prefix
once no row beneath it is pending.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from batchllm.job.units import WorkUnit
from batchllm.scheduler.scheduler import Scheduler
from batchllm.scheduler.seq import Seq, SeqKind


class LivePrefixes:
    """Prefix key -> the prefilled prefix ``Seq`` held for later units, in one scheduler."""

    def __init__(self) -> None:
        self._held: dict[int, Seq] = {}

    @property
    def seqs(self) -> Mapping[int, Seq]:
        return self._held

    def __len__(self) -> int:
        return len(self._held)

    def update(self, unit: WorkUnit, new: list[Seq], keep: Collection[int], scheduler: Scheduler) -> None:
        """Before ``unit`` runs (its rows already attached to the held prefixes they need): hold the
        unit's new prefixes whose key is in ``keep``, and let go of held ones that are not."""
        for seq in new:
            key = unit.node_keys[seq.index] if seq.kind is SeqKind.PREFIX and not seq.of_row else None
            if key in keep:
                if key in self._held:  # the same tokens under another parent (another window's tree)
                    scheduler.release_prefix(self._held.pop(key))
                seq.pending_rows += 1
                self._held[key] = seq
        for key in [k for k in self._held if k not in keep]:
            scheduler.release_prefix(self._held.pop(key))

    def clear(self) -> None:
        """Forget every hold (the scheduler that held them is being discarded)."""
        self._held.clear()

    def check_invariants(self, scheduler: Scheduler) -> None:
        """Between units: every held prefix is prefilled and live, and nothing else is."""
        held = set(self._held.values())
        if any(not s.prefilled or s.pending_rows != 1 for s in held):
            raise AssertionError("a held prefix is not prefilled, or has rows pending between units")
        if any(s.parent is not None and s.parent not in held for s in held):
            raise AssertionError("a held prefix's parent prefix is not held")
        if held != scheduler.live_prefixes:
            raise AssertionError("the scheduler's live prefixes are not the held ones")
        if scheduler.running or scheduler.waiting:
            raise AssertionError("sequences left in the scheduler between units")
        scheduler.check_invariants()
