"""Reading a dataset of many files vs the same rows in one file: the reader's cost per row.

    python benchmarks/bench_io.py                       # 1M short rows, 100 Parquet files vs 1
    python benchmarks/bench_io.py --format jsonl --rows 200000 --json io.json

What is timed (best of --repeats, taken round-robin): ``open_input`` (validation: footers for Parquet,
the whole scan for JSONL; with --id-column the cross-file id check) plus reading every row through
``iter_batches`` in windows of --window rows, as ``batchllm run`` does before tokenizing. Tokenizing,
planning and generation are not included: they do not depend on how the input is split into files.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from batchllm.io.reader import open_input  # noqa: E402

WORDS = "the review product battery shipping price quality color size order great poor fast slow".split()


def make_rows(rows: int, seed: int = 0) -> pa.Table:
    rng = random.Random(seed)
    texts = [" ".join(rng.choices(WORDS, k=rng.randint(4, 12))) for _ in range(rows)]
    return pa.table({"text": texts, "key": [f"r{i}" for i in range(rows)]})


def write(table: pa.Table, directory: Path, files: int, fmt: str) -> None:
    directory.mkdir(parents=True)
    size = -(-table.num_rows // files)
    for i in range(files):
        part = table.slice(i * size, size)
        path = directory / f"part=p{i // 10}" / f"rows-{i:04d}.{fmt}"
        path.parent.mkdir(exist_ok=True)
        if fmt == "parquet":
            pq.write_table(part, path)
        else:
            path.write_text("".join(json.dumps(r) + "\n" for r in part.to_pylist()))


def read_all(path: Path, window: int, id_column: str | None) -> tuple[float, int]:
    started = time.perf_counter()
    source = open_input(path, None, "text", id_column, ())
    rows = sum(len(b.texts) for b in source.iter_batches(rows_per_batch=window))
    return time.perf_counter() - started, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--files", type=int, default=100)
    ap.add_argument("--format", choices=("parquet", "jsonl"), default="parquet")
    ap.add_argument("--window", type=int, default=65536)
    ap.add_argument("--id-column", default=None, help="also check ids unique (e.g. key)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    table = make_rows(args.rows)
    with tempfile.TemporaryDirectory() as tmp:
        one, many = Path(tmp) / "one", Path(tmp) / "many"
        write(table, one, 1, args.format)
        write(table, many, args.files, args.format)
        single = next(one.rglob(f"*.{args.format}"))
        best = {"one_file": float("inf"), "many_files": float("inf")}
        for _ in range(args.repeats):
            for name, path in (("one_file", single), ("many_files", many)):
                seconds, rows = read_all(path, args.window, args.id_column)
                assert rows == args.rows, (name, rows)
                best[name] = min(best[name], seconds)
    result = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}",
        "rows": args.rows, "files": args.files, "format": args.format, "window": args.window,
        "id_check": args.id_column is not None,
        "one_file_us_per_row": best["one_file"] / args.rows * 1e6,
        "many_files_us_per_row": best["many_files"] / args.rows * 1e6,
        "many_over_one": best["many_files"] / best["one_file"],
    }  # fmt: skip
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
