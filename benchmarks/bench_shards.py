"""Cost of checksummed shards: committing and reading back shards with and without verification.

Baseline in the same process: ``pq.write_table`` straight to a file and ``pq.read_table`` of the
``row_index`` column (what a run did before checksums). Measured: ``RunDir.commit`` (Parquet encoded in
memory, hashed, written atomically) and ``RunDir.committed_row_indices`` (every shard read whole and
verified). Prints one JSON object with the ratios; run it on a quiet machine.

    python benchmarks/bench_shards.py --shards 20 --rows 10000 --chars 800
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from batchllm.io.writer import RunDir, result_table


def table(first: int, rows: int, chars: int, rng: np.random.Generator) -> pa.Table:
    idx = np.arange(first, first + rows)
    letters = rng.integers(97, 123, size=(rows, chars), dtype=np.uint8)
    texts = [bytes(r).decode() for r in letters]
    ones = np.ones(rows, np.int32)
    return result_table(idx, pa.array(idx), None, texts, ones, ones, ones, ["stop"] * rows, [None] * rows)


def timed(fn, repeats: int = 3) -> float:
    """The fastest of ``repeats`` calls (the others lose time to whatever else the machine runs)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, default=20)
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--chars", type=int, default=800, help="characters of output per row")
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    tables = [table(i * a.rows, a.rows, a.chars, rng) for i in range(a.shards)]
    with tempfile.TemporaryDirectory() as tmp:
        plain, run = Path(tmp) / "plain", RunDir(Path(tmp) / "run")
        plain.mkdir()
        run.ensure_writable(Path(tmp) / "out.parquet")
        write_plain = timed(
            lambda: [pq.write_table(t, plain / f"s{i}.parquet") for i, t in enumerate(tables)]
        )
        write_checked = timed(lambda: [run.commit(t) for t in tables], repeats=1)  # shards accumulate
        paths = sorted(plain.iterdir())
        pq.read_table(paths[0], columns=["row_index"])  # warm-up: pyarrow's first read sets up its datasets
        read_plain = timed(lambda: [pq.read_table(p, columns=["row_index"]) for p in paths])
        read_checked = timed(lambda: run.committed_row_indices())
        assert len(run.committed_row_indices()) == a.shards * a.rows
        size = sum(p.stat().st_size for p in paths)
    print(json.dumps({
        "machine": platform.processor() or platform.machine(), "shards": a.shards, "rows": a.rows,
        "mb": round(size / 2**20, 1),
        "commit_s": round(write_checked, 3), "plain_write_s": round(write_plain, 3),
        "commit_ratio": round(write_checked / write_plain, 2),
        "verified_read_s": round(read_checked, 3), "row_index_read_s": round(read_plain, 3),
        "read_ratio": round(read_checked / read_plain, 2),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
