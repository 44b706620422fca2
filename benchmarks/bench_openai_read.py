"""Reading an OpenAI batch file: opening it (every line parsed once: ids, and what the requests need
of the job) and reading its rows (each request parsed into text, settings, schema and what its output
line reports), per line, against a plain JSONL file of the same conversations read as a messages
column (the baseline, measured in the same run). No model, no tokenizer.

    python benchmarks/bench_openai_read.py --lines 100000
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from batchllm.io.openai_batch import open_batch_file
from batchllm.io.reader import open_input


def write_files(root: Path, lines: int) -> tuple[Path, Path]:
    batch, plain = root / "batch.jsonl", root / "plain.jsonl"
    with open(batch, "w") as b, open(plain, "w") as p:
        for i in range(lines):
            messages = [
                {"role": "system", "content": "You label reviews."},
                {"role": "user", "content": f"Review {i}"},
            ]
            body = {"model": "m", "messages": messages, "max_tokens": 16 + i % 64, "temperature": 0.7}
            if i % 4 == 0:
                body |= {"n": 2, "logprobs": True, "top_logprobs": 3}
            if i % 8 == 1:
                body["response_format"] = {"type": "json_object"}
            b.write(
                json.dumps(
                    {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}
                )
                + "\n"
            )
            p.write(json.dumps({"id": f"r{i}", "messages": messages}) + "\n")
    return batch, plain


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lines", type=int, default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        batch, plain = write_files(Path(tmp), args.lines)
        source = None

        def open_batch() -> None:
            nonlocal source
            source = open_batch_file(batch, "m")

        t_open = timed(open_batch)
        t_rows = timed(lambda: sum(len(b) for b in source.iter_batches(65536)))
        base = open_input(plain, None, "messages", "id", (), messages=True)
        t_plain = timed(lambda: sum(len(b) for b in base.iter_batches(65536)))
    per = 1e6 / args.lines
    print(f"lines={args.lines} open={t_open:.2f}s ({t_open * per:.1f} us/line) "
          f"rows={t_rows:.2f}s ({t_rows * per:.1f} us/line) "
          f"plain messages JSONL rows={t_plain:.2f}s ({t_plain * per:.1f} us/line) "
          f"ratio (open + rows) / plain = {(t_open + t_rows) / t_plain:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
