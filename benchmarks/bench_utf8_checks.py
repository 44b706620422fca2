"""What the UTF-8 checks of #11 cost when reading input: every row's text (and id) through
``open_input(...).iter_batches()``, with the checks and with them switched off, in the same process.

    python benchmarks/bench_utf8_checks.py [--rows 200000] [--repeat 3]

Prints seconds per pass and the ratio checked / unchecked for Parquet and JSONL (CPU only; no model).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import pyarrow as pa
import pyarrow.parquet as pq

from batchllm.io import jsonl, source
from batchllm.io.reader import open_input


def write_inputs(root: Path, rows: int) -> dict[str, Path]:
    texts = [
        f"review {i}: the battery was fine but shipping was slow, {'very ' * (i % 40)}slow"
        for i in range(rows)
    ]
    ids = [f"r{i}" for i in range(rows)]
    pq.write_table(pa.table({"text": texts, "rid": ids}), root / "in.parquet")
    with open(root / "in.jsonl", "w") as f:
        f.writelines(json.dumps({"text": t, "rid": r}) + "\n" for t, r in zip(texts, ids))
    return {"parquet": root / "in.parquet", "jsonl": root / "in.jsonl"}


@contextmanager
def checks_off():
    """The read path as it was before #11: no full validation of string columns."""
    with mock.patch.object(jsonl, "_check_utf8", lambda table: None):
        with mock.patch.object(source, "_valid_utf8", lambda values, what, errors: values):
            yield


def one_pass(path: Path) -> float:
    t0 = time.perf_counter()
    src = open_input(path, None, "text", "rid", ())
    for _ in src.iter_batches():
        pass
    return time.perf_counter() - t0


def best(path: Path, repeat: int, checked: bool) -> float:
    times = []
    for _ in range(repeat):
        if checked:
            times.append(one_pass(path))
        else:
            with checks_off():
                times.append(one_pass(path))
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {args.rows} rows, best of {args.repeat}")
    with tempfile.TemporaryDirectory() as tmp:
        for fmt, path in write_inputs(Path(tmp), args.rows).items():
            off, on = best(path, args.repeat, False), best(path, args.repeat, True)
            print(f"{fmt:8s} unchecked {off:.3f}s  checked {on:.3f}s  ratio {on / off:.3f}")


if __name__ == "__main__":
    main()
