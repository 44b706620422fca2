"""Time the global prefix tree + plan on synthetic prompts with nested sharing, and its peak memory.

    python benchmarks/bench_plan.py                 # 1,000,000 rows of ~300 tokens
    python benchmarks/bench_plan.py --rows 100000   # quick run
    python benchmarks/bench_plan.py --tokens /tmp/batchllm_bench_tokenize/tokens_1000000.npz  # real ids

Prompts: a few system prompts (~150 tokens, sharing their first 6) > groups of ~50 rows with
a group text (~80 tokens, opening with a 2-token template) > a distinct row text (~70 tokens),
2% of rows duplicating another row of their group. Token ids follow a power law, so short
accidental shared prefixes are common, as with real BPE text. The data is generated in this
process and saved; a fresh worker process loads it and plans, so its peak RSS is the planner's
(plus the token array it must hold). Baseline in the same run: one argsort of a 64-bit key per
row, the least work any exact grouping of the rows needs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

VOCAB = 128_256
SYSTEMS = 4
ROWS_PER_GROUP = 50
DUPLICATE_FRACTION = 0.02
CHUNK_ROWS = 20_000
ROOT = Path(__file__).resolve().parents[1]  # the worker imports batchllm from this checkout


def _hash(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: uint64 -> well-mixed uint64 (vectorised)."""
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & np.uint64(0xFFFFFFFFFFFFFFFF)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _token(kind: np.ndarray, ident: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Power-law token id for position j of text `ident` of a kind (0 system, 1 group, 2 row)."""
    x = (
        (ident.astype(np.uint64) << np.uint64(20))
        ^ j.astype(np.uint64)
        ^ (kind.astype(np.uint64) << np.uint64(60))
    )
    u = (_hash(x) >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    u *= u
    return np.minimum(VOCAB * (u * u), VOCAB - 1).astype(np.int32)


def generate(rows: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(tokens int32, offsets int64) of `rows` synthetic prompts, in shuffled order."""
    rng = np.random.default_rng(seed)
    groups = max(1, rows // ROWS_PER_GROUP)
    sys_len = rng.integers(120, 181, SYSTEMS)
    grp_len = rng.integers(50, 111, groups)
    grp_sys = rng.integers(0, SYSTEMS, groups)
    row_grp = rng.integers(0, groups, rows)
    text = np.arange(rows)  # which row text each row uses; duplicates reuse another row's
    row_len = rng.integers(40, 101, rows)
    dup = np.flatnonzero(rng.random(rows) < DUPLICATE_FRACTION)
    src = rng.integers(0, rows, dup.size)
    text[dup], row_len[dup], row_grp[dup] = src, row_len[src], row_grp[src]
    seg = (sys_len[grp_sys[row_grp]], grp_len[row_grp], row_len)
    offsets = np.concatenate([[0], np.cumsum(seg[0] + seg[1] + seg[2])]).astype(np.int64)
    tokens = np.empty(int(offsets[-1]), dtype=np.int32)
    for a in range(0, rows, CHUNK_ROWS):
        b = min(rows, a + CHUNK_ROWS)
        _fill(tokens, offsets, a, b, [s[a:b] for s in seg], grp_sys[row_grp[a:b]], row_grp[a:b], text[a:b])
    return tokens, offsets


def _fill(tokens, offsets, a, b, seg, sys_id, grp_id, text_id) -> None:
    lengths = seg[0] + seg[1] + seg[2]
    row = np.repeat(np.arange(b - a), lengths)
    j = np.arange(row.size) - np.repeat(offsets[a:b] - offsets[a], lengths)
    s_len, g_len = seg[0][row], seg[1][row]
    kind = (j >= s_len).astype(np.int64) + (j >= s_len + g_len)  # 0 system, 1 group, 2 row text
    # System prompts share their first 6 tokens; group texts open with a shared 2-token template.
    ident = np.where(j < 6, 0, sys_id[row] + 1)
    ident = np.where(kind == 1, np.where(j - s_len < 2, 0, grp_id[row] + 1), ident)
    ident = np.where(kind == 2, text_id[row], ident)
    pos = j - np.where(kind >= 1, s_len, 0) - np.where(kind == 2, g_len, 0)
    tokens[offsets[a] : offsets[b]] = _token(kind, ident, pos)


def worker(data: Path, check: bool) -> dict[str, float | int | str]:
    from batchllm.prefix_tree.plan import plan_tree
    from batchllm.prefix_tree.seqs import TokenSeqs
    from batchllm.prefix_tree.tree import PrefixTree

    seqs = TokenSeqs(np.load(data / "tokens.npy"), np.load(data / "offsets.npy"))
    input_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    t0 = time.perf_counter()
    tree = PrefixTree.build(seqs.heads(np.ones(len(seqs), dtype=np.int64)))  # as make_plan does
    t1 = time.perf_counter()
    plan = plan_tree(tree, seqs)
    t2 = time.perf_counter()
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    out: dict[str, float | int | str] = {"build_s": t1 - t0, "plan_s": t2 - t1, "peak_gb": peak_gb}
    out["above_input_gb"] = peak_gb - input_gb  # what planning adds to the loaded token buffer
    key = seqs.tokens[seqs.offsets[:-1]].astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    t3 = time.perf_counter()
    np.argsort(key ^ seqs.lengths.astype(np.uint64))
    out["baseline_argsort_s"] = time.perf_counter() - t3
    out["tree_nodes"] = tree.num_nodes
    out.update(plan.stats.to_dict())
    if check:
        t4 = time.perf_counter()
        tree.check_invariants()
        plan.check_invariants()
        out["check_invariants_s"] = time.perf_counter() - t4
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check", action="store_true", help="also time check_invariants()")
    parser.add_argument("--tokens", type=Path, help="plan this .npz (tokens, offsets) instead of generating")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        print(json.dumps(worker(args.worker, args.check)))
        return
    t0 = time.perf_counter()
    if args.tokens is not None:
        saved = np.load(args.tokens)
        tokens, offsets = saved["tokens"], saved["offsets"]
    else:
        tokens, offsets = generate(args.rows, args.seed)
    gen_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / "tokens.npy", tokens)
        np.save(Path(tmp) / "offsets.npy", offsets)
        del tokens
        cmd = [sys.executable, __file__, "--worker", tmp] + (["--check"] if args.check else [])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        done = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True, env=env)
        result = json.loads(done.stdout)
    result["generate_s"] = gen_s
    result["machine"] = f"{platform.processor() or platform.machine()}, {_cpus()} CPUs"
    result["total_s"] = result["build_s"] + result["plan_s"]
    result["x_baseline"] = result["total_s"] / result["baseline_argsort_s"]
    for name, value in result.items():
        print(f"{name:>24}: {value:.3f}" if isinstance(value, float) else f"{name:>24}: {value}")


def _cpus() -> int:
    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    main()
