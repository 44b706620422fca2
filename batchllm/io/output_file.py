"""The final output file: Parquet, or JSON Lines when its name ends in ``.jsonl`` / ``.ndjson``.

Both hold the same columns in the same order; only the encoding differs. The run directory's shards
are always Parquet, so resume and the report do not depend on the output's format.
"""

from __future__ import annotations

import base64
import datetime
import decimal
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa

JSONL_SUFFIXES = (".jsonl", ".ndjson")
_LINES_PER_WRITE = 8192  # rows turned into Python objects at a time, bounding memory


@dataclass(frozen=True)
class OutputPart:
    """Input rows ``[start, stop)`` go to ``path`` (one part per input file with ``--output-dir``)."""

    path: Path
    start: int
    stop: int


def is_jsonl(path: Path) -> bool:
    return Path(path).suffix.lower() in JSONL_SUFFIXES


def write_jsonl(table: pa.Table, f: BinaryIO) -> None:
    """One JSON object per row, keys in column order; nulls as ``null``, non-finite floats as ``null``
    (JSON has no NaN), bytes as base64, dates and times in ISO 8601, decimals as strings."""
    for batch in table.to_batches(max_chunksize=_LINES_PER_WRITE):
        rows = batch.to_pylist()
        lines = [json.dumps(_finite(row), ensure_ascii=False, default=_json_value) for row in rows]
        if lines:
            f.write(("\n".join(lines) + "\n").encode("utf-8"))


def _finite(value: object) -> object:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _json_value(value: object) -> object:
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, (datetime.date, datetime.time, datetime.datetime)):
        return value.isoformat()
    if isinstance(value, (decimal.Decimal, datetime.timedelta)):
        return str(value)
    raise TypeError(f"cannot write a {type(value).__name__} value as JSON")
