"""The run's metrics log: one JSON line per attempt start, commit, unit, retry and attempt end.

``batchllm report`` reads it back, also for a run that is still going or was interrupted. A line it
cannot use (cut short by a crash, edited, a number where a record belongs, a missing or mistyped
field) is skipped and counted, never fatal: the report says how many as ``metrics_lines_skipped``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import NamedTuple

from batchllm.errors import write_failure

METRICS = "metrics.jsonl"

# The fields each kind of record must carry, and their types; the report reads these without checks.
_NUMBER = (int, float)
_REQUIRED: dict[str, dict[str, tuple[type, ...]]] = {
    "attempt": {},
    "commit": {"elapsed": _NUMBER, "prefill_tokens_computed": _NUMBER, "output_tokens": _NUMBER},
    "unit": {"worker": (str,), "rows": _NUMBER, "output_tokens": _NUMBER, "seconds": _NUMBER},
    "retry": {},
    "end": {"wall_seconds": _NUMBER, "prefill_tokens_computed": _NUMBER},
}
# Fields of an end record the report reads when present.
_END_NUMBERS = ("peak_kv_blocks", "kv_blocks", "preemptions", "unique_prompt_tokens")


class MetricsLines(NamedTuple):
    records: list[dict]  # the lines that are valid records, in order
    skipped: int  # lines that are not


class MetricsLog:
    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / METRICS

    def append(self, kind: str, **fields) -> None:
        record = {"kind": kind, "time": time.time(), **fields}
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise write_failure("the metrics log", self.path, e) from e

    def read(self) -> MetricsLines:
        if not self.path.exists():
            return MetricsLines([], 0)
        records, skipped = [], 0
        for line in self.path.read_text(errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if valid(record):
                records.append(record)
            else:
                skipped += 1
        return MetricsLines(records, skipped)


def valid(record: object) -> bool:
    """A record of a known kind with every field the report reads, each of the right type."""
    if not isinstance(record, dict) or record.get("kind") not in _REQUIRED:
        return False
    fields = {"time": _NUMBER, **_REQUIRED[record["kind"]]}
    if not all(_is(record.get(name), types) for name, types in fields.items()):
        return False
    if record["kind"] != "end":
        return True
    optional = all(_is(record[k], _NUMBER) for k in _END_NUMBERS if k in record)
    phases = record.get("phases", {})
    samples = record.get("kv_samples", [])
    return (
        optional
        and isinstance(phases, dict)
        and all(_is(v, _NUMBER) for v in phases.values())
        and isinstance(samples, list)
        and all(isinstance(s, list) and len(s) == 2 and all(_is(v, _NUMBER) for v in s) for s in samples)
        and isinstance(record.get("workers", {}), dict)
    )


def _is(value: object, types: tuple[type, ...]) -> bool:
    return isinstance(value, types) and not isinstance(value, bool)
