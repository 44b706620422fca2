"""A window of input rows: read, tokenized and checked (the plan and its work units come after)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from batchllm.engine.sampling import row_key
from batchllm.io.prompts import Prompter
from batchllm.io.source import InputSource
from batchllm.job.rows import RowBlock


@dataclass(frozen=True)
class Window:
    start: int  # input row index of the window's first row
    ids: pa.Array
    keep: pa.Table | None
    token_ids: list[np.ndarray | None]
    errors: list[str | None]  # a row-level error, or None when the row can run
    skip: np.ndarray  # bool [rows]: committed by an earlier attempt
    schemas: list[str | None] | None = None  # [rows] each row's JSON Schema text (--schema-column)

    def __len__(self) -> int:
        return len(self.token_ids)

    def runnable(self) -> np.ndarray:
        """Window-local indices of the rows to generate now."""
        ok = np.fromiter((e is None for e in self.errors), dtype=bool, count=len(self))
        return np.nonzero(ok & ~self.skip)[0]

    def failed(self) -> np.ndarray:
        """Window-local indices of the rows that get an error row now."""
        bad = np.fromiter((e is not None for e in self.errors), dtype=bool, count=len(self))
        return np.nonzero(bad & ~self.skip)[0]

    @property
    def num_failed(self) -> int:
        return len(self.failed())

    def block(self, rows: np.ndarray) -> RowBlock:
        """Window-local ``rows`` (int64) as output rows."""
        take = pa.array(rows, type=pa.int64())
        lengths = [0 if self.token_ids[i] is None else len(self.token_ids[i]) for i in rows.tolist()]
        return RowBlock(
            row_index=rows.astype(np.int64) + self.start,
            ids=self.ids.take(take),
            keep=None if self.keep is None else self.keep.take(take),
            prompt_tokens=np.asarray(lengths, dtype=np.int32),
            errors=[self.errors[i] for i in rows.tolist()],
            schemas=None if self.schemas is None else [self.schemas[i] for i in rows.tolist()],
        )


def read_windows(
    source: InputSource,
    prompter: Prompter,
    window_rows: int,
    max_new_tokens: int,
    max_positions: int,
    skip: np.ndarray,
    systems: Callable[[int, int], list[str | None]] | None = None,
) -> Iterator[Window]:
    """Windows of rows, tokenized; rows marked in ``skip`` (bool [num_rows]) are not tokenized.
    ``systems(start, rows)``: each row's own system message (chat), when rows have their own."""
    for batch in source.iter_batches(rows_per_batch=window_rows):
        done = skip[batch.start : batch.start + len(batch)]
        if done.all():
            continue
        texts = [None if d else t for t, d in zip(batch.texts, done)]
        text_errors = [e or ("skipped" if d else None) for e, d in zip(batch.text_errors, done)]
        own = systems(batch.start, len(batch)) if systems is not None else None
        prompts = prompter.encode(texts, text_errors, own)
        errors = [
            err or length_error(ids, max_new_tokens, max_positions)
            for ids, err in zip(prompts.token_ids, prompts.errors)
        ]
        yield Window(batch.start, batch.ids, batch.keep, prompts.token_ids, errors, done)


def length_error(token_ids: np.ndarray | None, max_new_tokens: int, max_positions: int) -> str | None:
    n = 0 if token_ids is None else len(token_ids)
    if n == 0:
        return "the prompt is empty (0 tokens)"
    if n + max_new_tokens > max_positions:
        return (
            f"prompt has {n} tokens; with max_new_tokens={max_new_tokens} that exceeds the model's "
            f"{max_positions} positions"
        )
    return None


def row_keys(seed: int, ids: pa.Array, rows: np.ndarray) -> list[int]:
    values = ids.take(pa.array(rows)).to_pylist()
    return [row_key(seed, v) for v in values]
