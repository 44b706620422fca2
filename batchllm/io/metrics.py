"""The run's metrics log: one JSON line per attempt start, commit and attempt end, appended as it goes.

``batchllm report`` reads it back, also for a run that is still going or was interrupted.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from batchllm.errors import write_failure

METRICS = "metrics.jsonl"


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

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
        return records
