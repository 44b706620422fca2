"""The one tally of finished rows and their tokens.

A unit counts what each shard commits, progress adds up what units finish, the metrics log records
it, and the report recounts the committed shards with ``RowCounts.of_table``: every figure about rows
and tokens is a ``RowCounts``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import pyarrow as pa
import pyarrow.compute as pc


@dataclass
class RowCounts:
    rows: int = 0  # finished rows, failed ones included
    failed: int = 0  # rows whose finish_reason is "error"
    prompt_tokens: int = 0  # of the rows that ran
    cached_tokens: int = 0  # prompt tokens whose KV a row reused instead of computing
    output_tokens: int = 0

    def add(self, other: RowCounts) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def of_table(cls, table: pa.Table) -> RowCounts:
        """The counts of result rows (a shard, or all of them): ``finish_reason`` and the token columns."""
        ok = pc.not_equal(table["finish_reason"], "error")
        return cls(
            rows=table.num_rows,
            failed=table.num_rows - int(pc.sum(ok).as_py() or 0),
            prompt_tokens=_sum(table.filter(ok)["prompt_tokens"]),
            cached_tokens=_sum(table["cached_tokens"]),
            output_tokens=_sum(table["output_tokens"]),
        )


def _sum(column: pa.ChunkedArray) -> int:
    return int(pc.sum(column).as_py() or 0)
