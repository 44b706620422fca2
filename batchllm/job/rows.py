"""Rows as the output knows them: where each sits in the input, its id, kept columns and prompt length."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from batchllm.io.source import InputSource
from batchllm.io.writer import result_table


@dataclass(frozen=True, eq=False)
class RowBlock:
    row_index: np.ndarray  # int64 [rows]: input row index
    ids: pa.Array  # [rows]
    keep: pa.Table | None  # [rows] kept input columns
    prompt_tokens: np.ndarray  # int32 [rows]: 0 where the row could not be tokenized
    errors: list[str | None]  # [rows]: the row's error, None for a row to generate
    sample: np.ndarray | None = None  # int64 [rows]: each row's sample index under --n; None: one per row
    schemas: list[str | None] | None = None  # [rows]: the row's own JSON Schema (--schema-column)

    @classmethod
    def empty(cls, source: InputSource) -> RowBlock:
        """No rows, typed like ``source``'s: the shard that gives an empty input's output its columns
        (an empty JSONL file is refused when opened, so only Parquet gets here)."""
        schema = pq.read_schema(source.path) if source.path.suffix == ".parquet" else pa.schema([])
        typed = {f.name: f.type for f in schema}
        id_type = typed.get(source.id_column, pa.int64()) if source.id_column else pa.int64()
        keep = pa.schema([(c, typed.get(c, pa.null())) for c in source.keep_columns]).empty_table()
        no_ints = np.empty(0, np.int32)
        return cls(
            np.empty(0, np.int64), pa.array([], id_type), keep if source.keep_columns else None, no_ints, []
        )

    def __len__(self) -> int:
        return len(self.row_index)

    def take(self, rows: np.ndarray) -> RowBlock:
        take = pa.array(rows, type=pa.int64())
        return RowBlock(
            self.row_index[rows],
            self.ids.take(take),
            None if self.keep is None else self.keep.take(take),
            self.prompt_tokens[rows],
            [self.errors[i] for i in rows.tolist()],
            None if self.sample is None else self.sample[rows],
            None if self.schemas is None else [self.schemas[i] for i in rows.tolist()],
        )

    def table(
        self,
        output: list[str | None],
        output_tokens: np.ndarray,
        cached_tokens: np.ndarray,
        finish_reason: list[str],
    ) -> pa.Table:
        """The result shard of these rows, given what generating them produced."""
        return result_table(
            self.row_index, self.ids, self.keep, output, self.prompt_tokens, output_tokens, cached_tokens,
            finish_reason, self.errors,
        )  # fmt: skip

    def error_table(self) -> pa.Table:
        """The shard of rows that failed before generation: no output, their error."""
        zeros = np.zeros(len(self), dtype=np.int32)
        return self.table([None] * len(self), zeros, zeros, ["error"] * len(self))
