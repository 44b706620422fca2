"""Time ``batchllm plan`` as a whole process (read + tokenize + plan) on a million generated prompts,
with its peak RSS, against the same job on a baseline checkout in the same run.

    python benchmarks/bench_tokenize.py                          # 1,000,000 rows, this checkout
    python benchmarks/bench_tokenize.py --rows 100000            # a quicker look
    python benchmarks/bench_tokenize.py --baseline /path/to/other/checkout   # before vs after

Data (generated once, cached under ``--cache``, default /tmp/batchllm_bench_tokenize): a byte-level BPE
tokenizer with a 4,096-token vocabulary trained on review-like text, a tiny model config beside it (``plan``
reads no weights), a ``--prefix`` file of a ~120-token instruction, and a Parquet file whose text is a group
text (~165 tokens, ~50 rows a group) + a row text (~25 tokens), 2% of rows duplicating another row:
~311 tokens a prompt, ~92% of them shared with another row. Each checkout runs
``python -m batchllm plan in.parquet --model M --prefix P --window ROWS --json`` in a fresh process (its
own imports and tokenizer load count); wall time and peak RSS come from ``wait4``. Figures from a loaded
machine are noisy: compare the ratio, re-run on a quiet one for absolute numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROWS_PER_GROUP = 50
DUPLICATE_FRACTION = 0.02
WORDS = (
    "the product quality price shipping battery screen sound color size fit design customer service "
    "return refund warranty delivery package instructions setup comfort weight material durability "
    "value performance speed noise cable charger handle lid button strap zipper pocket seam fabric"
).split()


def _sentence(rng: random.Random, words: int) -> str:
    body = " ".join(rng.choice(WORDS) for _ in range(words))
    return f"{body.capitalize()} {rng.randint(1, 999)}."


def instruction() -> str:
    lines = [
        "You are a careful assistant that reads product reviews and classifies them.",
        "For each review, decide whether the customer is satisfied, and name the main reason.",
        "Consider the product quality, the price, the shipping and the customer service.",
        "Answer with one word for the sentiment (positive, negative or mixed), then a short reason.",
        "Do not repeat the review. Do not add anything else. Be brief and exact.",
        "Here are the product details and the review.",
    ]
    return "\n".join(lines) + "\nProduct: "


def generate(cache: Path, rows: int, seed: int = 0) -> Path:
    """Write the Parquet input (and, once, the tokenizer, model config and prefix) under ``cache``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    model = cache / "model"
    if not (model / "config.json").is_file():
        from batchllm.testing.tiny import make_tiny_model
        from batchllm.testing.tiny_tokenizer import default_corpus, train_tokenizer

        corpus = default_corpus() + [_sentence(random.Random(i), 12) for i in range(4000)]
        corpus += [instruction()] * 50
        train_tokenizer(cache / "tokenizer", corpus=corpus, vocab_size=4096)
        make_tiny_model(model, "llama", tokenizer_dir=cache / "tokenizer")
    (cache / "prefix.txt").write_text(instruction())
    path = cache / f"rows_{rows}.parquet"
    if path.is_file():
        return path
    rng = random.Random(seed)
    groups = [
        "\n".join(_sentence(rng, rng.randint(8, 14)) for _ in range(rng.randint(11, 16))) + "\nReview: "
        for _ in range(max(1, rows // ROWS_PER_GROUP))
    ]
    texts: list[str] = []
    for _ in range(rows):
        if texts and rng.random() < DUPLICATE_FRACTION:
            texts.append(texts[rng.randrange(len(texts))])
        else:
            texts.append(rng.choice(groups) + _sentence(rng, rng.randint(10, 20)))
    table = pa.table({"id": pa.array(range(rows), pa.int64()), "text": texts})
    pq.write_table(table, path.with_suffix(".tmp"), row_group_size=100_000)
    path.with_suffix(".tmp").rename(path)
    return path


def time_plan(checkout: Path, data: Path, cache: Path, rows: int) -> dict:
    """One ``batchllm plan`` process from ``checkout``: wall seconds, peak RSS and its JSON."""
    cmd = [sys.executable, "-m", "batchllm", "plan", str(data), "--model", str(cache / "model")]
    cmd += ["--prefix", str(cache / "prefix.txt"), "--window", str(rows), "--json"]
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=checkout, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    out, err = proc.stdout.read(), proc.stderr.read()
    if status != 0:
        raise SystemExit(f"plan failed in {checkout}:\n{err.decode()[-2000:]}")
    figures = json.loads(out.decode().strip().splitlines()[-1])
    keys = ("rows", "prompt_tokens", "unique_prompt_tokens", "prefill_tokens_planned", "groups")
    return {
        "checkout": str(checkout),
        "wall_s": round(wall, 2),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
        "peak_rss_gb": round(usage.ru_maxrss / 1e6, 3),  # ru_maxrss is in KiB on Linux
        **{k: figures.get(k) for k in keys},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/batchllm_bench_tokenize"))
    parser.add_argument("--baseline", type=Path, default=None, help="another checkout, timed first")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    data = generate(args.cache, args.rows)
    runs = [time_plan(c, data, args.cache, args.rows) for c in filter(None, [args.baseline, ROOT])]
    result = {
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, load {os.getloadavg()[0]:.1f}",
        "rows": args.rows,
        "runs": runs,
    }
    if len(runs) == 2:
        result["wall_ratio"] = round(runs[1]["wall_s"] / runs[0]["wall_s"], 3)
        result["rss_ratio"] = round(runs[1]["peak_rss_gb"] / runs[0]["peak_rss_gb"], 3)
    print(json.dumps(result, indent=1))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
