"""Throughput reports of a run directory (finished, running or interrupted): JSON, table, plot.

Row and token totals come from the committed shards, so they always equal the output file's; timing,
prefill and KV figures come from the metrics log of each attempt.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
from rich.console import Console
from rich.table import Table

from batchllm.errors import JobError
from batchllm.io.manifest import MANIFEST
from batchllm.io.metrics import MetricsLog
from batchllm.io.writer import RunDir
from batchllm.job.counters import RowCounts

GROUP_KEYS = ("groups", "avg_sharing_degree", "avg_prefix_tokens", "avg_distinct_tokens")
GROUP_KEYS += ("duplicate_rows", "max_tree_depth")
GUIDE_KEYS = ("constrained_rows", "masked_steps", "forced_tokens")  # structured output, all attempts
SHARD_COLUMNS = ["finish_reason", "prompt_tokens", "output_tokens", "cached_tokens"]


def collect(run_dir: Path) -> dict:
    model, rows = _manifest(run_dir)
    shards = _shards(run_dir)
    counts = RowCounts.of_table(shards)
    records, skipped = MetricsLog(run_dir).read()
    attempts = _attempts(records)
    prompt, output = counts.prompt_tokens, counts.output_tokens
    wall = sum(a["wall_seconds"] for a in attempts)
    computed = sum(a["prefill_tokens_computed"] for a in attempts)
    last = attempts[-1] if attempts else {}
    return {
        "rows": rows,
        "rows_done": counts.rows,
        "rows_failed": counts.failed,
        "rows_remaining": rows - counts.rows,
        "prompt_tokens": prompt,
        "unique_prompt_tokens": last.get("unique_prompt_tokens", 0),
        "prefill_tokens_computed": computed,
        "cached_tokens": counts.cached_tokens,
        "output_tokens": output,
        **_scored(shards, attempts),
        # Only a finished run's ratio means anything: a run in progress has computed prefill for rows
        # it has not committed yet.
        "saving_ratio": (1 - computed / prompt if prompt else 0.0) if counts.rows == rows else None,
        **{key: last.get(key, 0) for key in GROUP_KEYS},
        "wall_seconds": wall,
        "phase_seconds": _phases(attempts),
        "requests_per_second": _rate(counts.rows, wall),
        "input_tokens_per_second": _rate(prompt, wall),
        "output_tokens_per_second": _rate(output, wall),
        "total_tokens_per_second": _rate(prompt + output, wall),
        "peak_kv_blocks": max((a.get("peak_kv_blocks", 0) for a in attempts), default=0),
        "kv_blocks": last.get("kv_blocks", 0),
        "preemptions": sum(a.get("preemptions", 0) for a in attempts),
        **{key: sum(a.get(key, 0) for a in attempts) for key in GUIDE_KEYS},
        "attempts": len(attempts),
        "workers": _workers(records),
        "worker_retries": sum(1 for r in records if r["kind"] == "retry"),
        "model": model,
        "metrics_lines_skipped": skipped,
    }


def _scored(shards: pa.Table, attempts: list[dict]) -> dict[str, int]:
    """Scoring jobs (``--choices``, ``--score-column``): rows scored, and continuation tokens whose
    log-prob was read. Their computation is prefill (in ``prefill_tokens_computed``), never output."""
    scored = pc.sum(pc.equal(shards["finish_reason"], "scored")).as_py() if shards.num_rows else 0
    return {
        "scored_rows": int(scored or 0),
        "scored_tokens": sum(a.get("scored_tokens", 0) for a in attempts),
    }


def _manifest(run_dir: Path) -> tuple[str, int]:
    """The run's model and input row count."""
    path = run_dir / MANIFEST
    if not path.exists():
        raise JobError(f"{run_dir} is not a batchllm run directory (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
        return str(manifest["settings"]["model"]), int(manifest["input"]["rows"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise JobError(f"the manifest {path} is unreadable ({e})") from e


def _shards(run_dir: Path) -> pa.Table:
    """The counted columns of every shard that passes its checksum (read only: the run may be going)."""
    tables = RunDir(run_dir, read_only=True).verified_tables(SHARD_COLUMNS)
    if not tables:
        schema = pa.schema([("finish_reason", pa.string())] + [(c, pa.int32()) for c in SHARD_COLUMNS[1:]])
        return schema.empty_table()
    return pa.concat_tables(tables)


def _attempts(records: list[dict]) -> list[dict]:
    """One summary per attempt: its end record, or what its last commit knew if it was killed."""
    attempts: list[dict] = []
    for rec in records:
        if rec["kind"] == "attempt":
            attempts.append({"start": rec["time"], "wall_seconds": 0.0, "prefill_tokens_computed": 0})
        elif attempts and rec["kind"] == "commit":
            attempts[-1]["wall_seconds"] = rec["elapsed"]
            attempts[-1]["prefill_tokens_computed"] = rec["prefill_tokens_computed"]
        elif attempts and rec["kind"] == "end":
            attempts[-1].update({k: v for k, v in rec.items() if k not in ("kind", "time")})
    return attempts


def _workers(records: list[dict]) -> dict[str, dict]:
    """Per worker name, over every attempt: finished units' rows, output tokens, prefill tokens computed
    and how many of those were copies of a prefix another unit had prefilled, and its output tokens per
    second of its own unit time (a unit cut short by a crash or a dead worker is not counted)."""
    workers: dict[str, dict] = {}
    keys = ("units", "rows", "output_tokens", "prefill_tokens", "prefix_copy_tokens", "busy_seconds")
    for rec in records:
        if rec["kind"] != "unit":
            continue
        w = workers.setdefault(rec["worker"], dict.fromkeys(keys, 0))
        w["units"] += 1
        w["rows"] += rec["rows"]
        w["output_tokens"] += rec["output_tokens"]
        w["prefill_tokens"] += rec["prefill_tokens_computed"]
        w["prefix_copy_tokens"] += rec.get("prefix_copy_tokens", 0)
        w["busy_seconds"] += rec["seconds"]
    for w in workers.values():
        w["output_tokens_per_second"] = _rate(w["output_tokens"], w["busy_seconds"])
    return workers


def _phases(attempts: list[dict]) -> dict[str, float]:
    total: dict[str, float] = {}
    for a in attempts:
        for name, seconds in a.get("phases", {}).items():
            total[name] = total.get(name, 0.0) + seconds
    return total


def _rate(amount: float, seconds: float) -> float:
    return amount / seconds if seconds > 0 else 0.0


def write_json(report: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, path)


def print_summary(report: dict, console: Console, title: str = "batchllm run") -> None:
    table = Table(title=title, show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    ok = report["rows_done"] - report["rows_failed"]
    rows = [
        (
            "rows ok / failed / remaining",
            f"{ok:,} / {report['rows_failed']:,} / {report['rows_remaining']:,}",
        ),
        ("prompt tokens (unique)", f"{report['prompt_tokens']:,} ({report['unique_prompt_tokens']:,})"),
        ("prefill tokens computed", f"{report['prefill_tokens_computed']:,}"),
        ("prefix saving", "-" if report["saving_ratio"] is None else f"{100 * report['saving_ratio']:.1f}%"),
        ("output tokens", f"{report['output_tokens']:,}"),
        ("wall time", f"{report['wall_seconds']:.2f} s over {report['attempts']} attempt(s)"),
        ("phases", "  ".join(f"{k} {v:.1f}s" for k, v in report["phase_seconds"].items())),
        ("requests/s", f"{report['requests_per_second']:.2f}"),
        (
            "input / output tokens/s",
            f"{report['input_tokens_per_second']:,.0f} / {report['output_tokens_per_second']:,.0f}",
        ),
        ("total tokens/s", f"{report['total_tokens_per_second']:,.0f}"),
        ("peak KV blocks", f"{report['peak_kv_blocks']:,} of {report['kv_blocks']:,}"),
        ("preemptions", f"{report['preemptions']:,}"),
    ]
    if report.get("scored_rows"):
        rows.insert(5, ("scored rows / tokens", f"{report['scored_rows']:,} / {report['scored_tokens']:,}"))
    if report.get("constrained_rows"):
        rows.append(
            (
                "constrained rows / masked steps / forced tokens",
                " / ".join(f"{report[k]:,}" for k in GUIDE_KEYS),
            )
        )
    if report.get("metrics_lines_skipped"):
        rows.append(("metrics lines skipped (unreadable)", f"{report['metrics_lines_skipped']:,}"))
    for name, value in rows + _worker_rows(report):
        table.add_row(name, value)
    console.print(table)


def _worker_rows(report: dict) -> list[tuple[str, str]]:
    workers = report.get("workers", {})
    if len(workers) <= 1 and not report.get("worker_retries"):
        return []
    return [("worker retries", f"{report['worker_retries']:,}")] + [
        (
            f"worker {name}",
            f"{w['rows']:,} rows  {w['output_tokens']:,} out tokens  {w['output_tokens_per_second']:,.0f} "
            f"tok/s  {w['prefill_tokens']:,} prefill ({w['prefix_copy_tokens']:,} prefix copies)",
        )
        for name, w in workers.items()
    ]


def plot(run_dir: Path, path: Path) -> None:
    """Throughput (output tokens/s between commits) and KV blocks in use over time, to a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise JobError('--plot needs matplotlib: pip install "batchllm[plot]"') from exc
    records = MetricsLog(run_dir).read().records
    t0 = records[0]["time"] if records else 0.0
    commits = [r for r in records if r["kind"] == "commit"]
    kv = [s for r in records if r["kind"] == "end" for s in r.get("kv_samples", [])]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    times, rates, prev = [], [], t0
    for r in commits:
        rates.append(r["output_tokens"] / max(r["time"] - prev, 1e-6))
        times.append(r["time"] - t0)
        prev = r["time"]
    ax1.step(times, rates, where="pre")
    ax1.set_ylabel("output tokens/s")
    ax1.set_title(f"batchllm run {run_dir}")
    ax2.plot([t - t0 for t, _ in kv], [b for _, b in kv])
    ax2.set_ylabel("KV blocks in use")
    ax2.set_xlabel("seconds since the first attempt")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
