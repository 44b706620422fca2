"""A scoring unit's engine work: per row, one SCORE sequence per continuation, sharing the prompt.

A row with k > 1 continuations gets a prefix of its own, ``prompt[:-1]`` (beneath the plan's shared
prefix it starts from, as usual); its k SCORE sequences each compute only the prompt's last token and
their continuation less its last token (see ``engine.score_positions``)::

    plan prefix (shared by rows)  ->  row prefix: prompt[:-1]  ->  k x [prompt[-1] + choice[:-1]]

So the prompt is computed once and each choice's own tokens once. A row with one continuation (or a
prompt the plan prefix covers but its last token) hangs its sequences under the plan prefix directly.

A sequence waits until its prefix is prefilled, and the scheduler admits in order; so rows go in
batches of ``ROWS_PER_BATCH`` (in execution order): the plan prefixes they need, then their row
prefixes, then their SCORE sequences. So a few steps prefill a batch's prefixes, level by level, and
the next scores all its choices, instead of two steps per row.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from batchllm.scheduler.seq import Seq

if TYPE_CHECKING:
    from batchllm.job.units import WorkUnit

ROWS_PER_BATCH = 256


def score_sequences(
    unit: WorkUnit, node_seq: Callable[[int], Iterator[Seq]], nodes: dict[int, Seq]
) -> Iterator[Seq]:
    """The unit's work in execution order; ``node_seq(v)`` yields plan prefix v (and its ancestors)
    the first time it is needed, and ``nodes`` then holds it."""
    order = unit.order.tolist()
    for lo in range(0, len(order), ROWS_PER_BATCH):
        batch = order[lo : lo + ROWS_PER_BATCH]
        for row in batch:
            yield from node_seq(int(unit.row_node[row]))
        heads = [_row_prefix(unit, row, nodes.get(int(unit.row_node[row]))) for row in batch]
        yield from (head for head in heads if head is not None and head.of_row)
        for row, head in zip(batch, heads):
            prompt = unit.token_ids[row].tolist()
            for choice, ids in enumerate(unit.continuations[row].ids):
                seq = Seq.score(row, prompt, ids.tolist(), head)
                seq.choice = choice
                yield seq


def _row_prefix(unit: WorkUnit, row: int, parent: Seq | None) -> Seq | None:
    """The row's own prefix (prompt less its last token) for several continuations; else ``parent``."""
    prompt = unit.token_ids[row]
    k = len(unit.continuations[row])
    shared = parent.prompt_len if parent is not None else 0
    if k < 2 or len(prompt) - 1 <= shared:
        return parent
    seq = Seq.prefix(row, prompt[:-1].tolist(), parent, pending_rows=k)
    seq.of_row = True
    return seq
