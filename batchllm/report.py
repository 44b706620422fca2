"""The run report: one JSON object, and the same figures as a short summary table."""

from __future__ import annotations

import json
import os
from pathlib import Path

from rich.console import Console
from rich.table import Table

from batchllm.pipeline import RunOutcome


def run_report(outcome: RunOutcome, model: str) -> dict:
    t = outcome.totals
    wall = max(outcome.wall_seconds, 1e-9)
    prompt_ok = t.prompt_tokens
    computed = outcome.engine.prefill_tokens
    stats = outcome.plan_stats
    groups = sum(s.groups for s in stats)
    return {
        "rows": t.rows,
        "rows_failed": t.rows_failed,
        "prompt_tokens": prompt_ok,
        "unique_prompt_tokens": t.unique_prompt_tokens,
        "prefill_tokens_computed": computed,
        "cached_tokens": t.cached_tokens,
        "output_tokens": t.output_tokens,
        "saving_ratio": 1 - computed / prompt_ok if prompt_ok else 0.0,
        "groups": groups,
        "avg_sharing_degree": _weighted(stats, "avg_sharing_degree", "groups"),
        "avg_prefix_tokens": _weighted(stats, "avg_prefix_tokens", "groups"),
        "duplicate_rows": t.duplicate_rows,
        "max_tree_depth": max((s.max_tree_depth for s in stats), default=0),
        "wall_seconds": outcome.wall_seconds,
        "prefill_seconds": outcome.engine.prefill_seconds,
        "decode_seconds": outcome.engine.decode_seconds,
        "requests_per_second": t.rows / wall,
        "input_tokens_per_second": prompt_ok / wall,
        "output_tokens_per_second": t.output_tokens / wall,
        "total_tokens_per_second": (prompt_ok + t.output_tokens) / wall,
        "steps": outcome.engine.steps,
        "preemptions": outcome.preemptions,
        "kv_blocks": outcome.kv_blocks,
        "peak_kv_blocks": outcome.peak_kv_blocks,
        "model": model,
        "device": outcome.device,
        "dtype": outcome.dtype,
    }


def _weighted(stats: list, key: str, weight: str) -> float:
    total = sum(getattr(s, weight) for s in stats)
    if not total:
        return 0.0
    return sum(getattr(s, key) * getattr(s, weight) for s in stats) / total


def write_json(report: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, path)


def print_summary(report: dict, console: Console) -> None:
    table = Table(title="batchllm run", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    rows = [
        ("rows ok / failed", f"{report['rows'] - report['rows_failed']:,} / {report['rows_failed']:,}"),
        ("prompt tokens", f"{report['prompt_tokens']:,}"),
        ("prefill tokens computed", f"{report['prefill_tokens_computed']:,}"),
        ("prefix saving", f"{100 * report['saving_ratio']:.1f}%"),
        ("output tokens", f"{report['output_tokens']:,}"),
        ("wall time", f"{report['wall_seconds']:.2f} s"),
        ("requests/s", f"{report['requests_per_second']:.2f}"),
        ("output tokens/s", f"{report['output_tokens_per_second']:,.1f}"),
        ("total tokens/s", f"{report['total_tokens_per_second']:,.1f}"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
