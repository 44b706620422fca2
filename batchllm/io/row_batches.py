"""Joining and cutting RowBatches (a dataset's windows cross file boundaries)."""

from __future__ import annotations

from itertools import chain

import pyarrow as pa

from batchllm.io.source import RowBatch


def concat_batches(batches: list[RowBatch]) -> RowBatch:
    """Consecutive batches (each starting where the one before ended) as one."""
    if len(batches) == 1:
        return batches[0]
    ids = pa.concat_arrays([_array(b.ids) for b in batches])
    keeps = [b.keep for b in batches]
    keep = None if keeps[0] is None else pa.concat_tables(keeps)
    texts = list(chain.from_iterable(b.texts for b in batches))  # C speed: windows copy every row
    errors = list(chain.from_iterable(b.text_errors for b in batches))
    params = None if batches[0].params is None else list(chain.from_iterable(b.params for b in batches))
    return RowBatch(batches[0].start, ids, texts, errors, keep, params)


def split_batch(batch: RowBatch, rows: int) -> tuple[RowBatch, RowBatch]:
    """(the first ``rows`` rows, the rest)."""
    head = RowBatch(
        batch.start, batch.ids.slice(0, rows), batch.texts[:rows], batch.text_errors[:rows],
        None if batch.keep is None else batch.keep.slice(0, rows),
        None if batch.params is None else batch.params[:rows],
    )  # fmt: skip
    tail = RowBatch(
        batch.start + rows, batch.ids.slice(rows), batch.texts[rows:], batch.text_errors[rows:],
        None if batch.keep is None else batch.keep.slice(rows),
        None if batch.params is None else batch.params[rows:],
    )  # fmt: skip
    return head, tail


def _array(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    return values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
