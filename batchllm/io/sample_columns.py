"""The output columns of ``--logprobs`` and ``--n``, their Arrow types, and ``--explode-samples``.

With ``--logprobs K`` (K >= 1) a row gets ``output_logprobs``: per generated token its ``id``, ``token``
(the tokenizer's decoding of that one id), raw ``logprob`` and ``top`` (the K most likely tokens, each
``id``, ``token``, ``logprob``); and ``output_logprob``, their sum. With ``--n N`` (N > 1) a row gets
``outputs``, ``finish_reasons`` and ``sample_output_tokens``, one entry per sample, and the logprob
columns become lists over samples too; ``output`` and ``finish_reason`` hold sample 0's and
``output_tokens`` counts every sample's tokens. Every shard of a job carries the same columns (rows
that failed get nulls), so the shards concatenate.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from batchllm.config import SamplingParams

_ALT = pa.struct([("id", pa.int32()), ("token", pa.string()), ("logprob", pa.float32())])
TOKEN_LOGPROBS = pa.struct([*_ALT, ("top", pa.list_(_ALT))])
LOGPROBS = pa.list_(TOKEN_LOGPROBS)  # one row's (or sample's) generated tokens


def extra_fields(sampling: SamplingParams) -> list[pa.Field]:
    """The columns ``--n`` and ``--logprobs`` add to every shard, in order."""
    fields = []
    if sampling.n > 1:
        fields += [("outputs", pa.list_(pa.string())), ("finish_reasons", pa.list_(pa.string()))]
        fields += [("sample_output_tokens", pa.list_(pa.int32()))]
    if sampling.logprobs:
        many = sampling.n > 1
        fields += [("output_logprobs", pa.list_(LOGPROBS) if many else LOGPROBS)]
        fields += [("output_logprob", pa.list_(pa.float64()) if many else pa.float64())]
    return [pa.field(name, type_) for name, type_ in fields]


def pad_columns(table: pa.Table, sampling: SamplingParams) -> pa.Table:
    """``table`` with null columns for the extra columns it lacks (a shard of failed rows)."""
    for f in extra_fields(sampling):
        if f.name not in table.column_names:
            table = table.append_column(f, pa.nulls(table.num_rows, f.type))
    return table


def logprobs_array(logs: list, decode: Callable[[np.ndarray], list[str]]) -> pa.Array:
    """``LOGPROBS`` per entry of ``logs`` (``engine.sampled.LogprobLog``, one per row or sample)."""
    sizes = np.asarray([log.size for log in logs], dtype=np.int64)
    k = logs[0].top_ids.shape[1] if logs else 0
    ids = _cat([log.ids[: log.size] for log in logs], np.int32, (0,))
    chosen = _cat([log.chosen[: log.size] for log in logs], np.float32, (0,))
    top_ids = _cat([log.top_ids[: log.size] for log in logs], np.int32, (0, k)).ravel()
    top_values = _cat([log.top_values[: log.size] for log in logs], np.float32, (0, k)).ravel()
    alts = pa.StructArray.from_arrays(
        [pa.array(top_ids), pa.array(decode(top_ids), pa.string()), pa.array(top_values)], fields=list(_ALT)
    )
    top = pa.ListArray.from_arrays(_offsets(np.full(len(ids), k)), alts, type=pa.list_(_ALT))
    tokens = pa.StructArray.from_arrays(
        [pa.array(ids), pa.array(decode(ids), pa.string()), pa.array(chosen), top],
        fields=list(TOKEN_LOGPROBS),
    )
    return pa.ListArray.from_arrays(_offsets(sizes), tokens, type=LOGPROBS)


def nested(values: pa.Array, per_row: int | np.ndarray, type_: pa.DataType) -> pa.Array:
    """``values`` grouped ``per_row`` at a time (or each row's own count): one list of samples per row."""
    sizes = np.full(len(values) // per_row, per_row) if isinstance(per_row, int) else per_row
    return pa.ListArray.from_arrays(_offsets(sizes), values, type=type_)


def _cat(parts: list[np.ndarray], dtype, empty_shape: tuple[int, ...]) -> np.ndarray:
    return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(empty_shape, dtype)


def _offsets(sizes: np.ndarray) -> pa.Array:
    return pa.array(np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32))


def explode_samples(table: pa.Table) -> pa.Table:
    """The final output with one row per sample: ``sample_index`` after ``id`` and the per-sample values
    in ``output``, ``finish_reason``, ``output_tokens`` (and the logprob columns). A failed row stays one
    row, its ``sample_index`` null."""
    if "outputs" not in table.column_names:  # one sample per row
        index = pa.array(np.zeros(table.num_rows, np.int64), mask=_failed(table))
        return table.add_column(table.column_names.index("id") + 1, "sample_index", index)
    counts = pc.list_value_length(table["outputs"]).fill_null(0).to_numpy(zero_copy_only=False)
    reps = np.maximum(counts, 1)
    take = np.repeat(np.arange(table.num_rows), reps)
    ran = np.repeat(counts > 0, reps)
    flat_index = pa.array(np.cumsum(ran) - 1, mask=~ran)
    out = table.take(pa.array(take))
    pairs = [
        ("outputs", "output"),
        ("finish_reasons", "finish_reason"),
        ("sample_output_tokens", "output_tokens"),
    ]
    pairs += [(c, c) for c in ("output_logprobs", "output_logprob") if c in table.column_names]
    for many, one in pairs:
        values = pc.list_flatten(table[many]).combine_chunks().take(flat_index)
        if one != many:
            values = pc.if_else(pa.array(ran), values.cast(out.schema.field(one).type), out[one])
        out = out.set_column(
            out.column_names.index(one), out.schema.field(one).with_type(values.type), values
        )
    out = out.drop_columns(["outputs", "finish_reasons", "sample_output_tokens"])
    index = np.arange(len(take)) - np.repeat(np.cumsum(reps) - reps, reps)
    return out.add_column(out.column_names.index("id") + 1, "sample_index", pa.array(index, mask=~ran))


def _failed(table: pa.Table) -> np.ndarray:
    return pc.equal(table["finish_reason"], "error").to_numpy(zero_copy_only=False)
