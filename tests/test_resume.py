"""Durable runs: SIGKILL at any point then resume, refusals, windows, job files, reports."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from batchllm.cli import app

PREFIX = "Summarise in a few words.\n"


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_models, make_rows) -> dict:
    """A 40-row job (nested sharing, duplicates) and its uninterrupted output."""
    root = tmp_path_factory.mktemp("resume")
    texts = make_rows(num_groups=5, rows_per_group=7, duplicates=5, seed=11)
    pq.write_table(__import__("pyarrow").table({"text": texts}), root / "in.parquet")
    (root / "prefix.txt").write_text(PREFIX)
    spec = {"root": root, "model": tiny_models["qwen2"], "rows": len(texts)}
    code, out = cli(spec, "reference")
    assert code == 0, out
    spec["expected"] = pq.read_table(root / "reference.parquet")
    return spec


def args(spec: dict, name: str, *extra: str) -> list[str]:
    root = spec["root"]
    return [
        "run", str(root / "in.parquet"), "--model", str(spec["model"]), "--prefix", str(root / "prefix.txt"),
        "--output", str(root / f"{name}.parquet"), "--max-new-tokens", "8", "--quiet",
        "--window", "16", "--checkpoint-rows", "3", *extra,
    ]  # fmt: skip


def cli(spec: dict, name: str, *extra: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, args(spec, name, *extra))
    return result.exit_code, result.output


def subprocess_run(
    spec: dict, name: str, *extra: str, env: dict | None = None
) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "batchllm", *args(spec, name, *extra)[0:]]
    return subprocess.run(cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("crash_at", ["row:4", "commit:3", "shard_written:5", "assemble:1"])
def test_sigkill_then_resume_gives_the_uninterrupted_output(job, crash_at):
    name = f"crash_{crash_at.replace(':', '_')}"
    killed = subprocess_run(job, name, env={"BATCHLLM_CRASH_AT": crash_at})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (job["root"] / f"{name}.parquet").exists()
    code, out = cli(job, name, "--token-budget", "128")  # speed settings may change on resume
    assert code == 0, out
    got = pq.read_table(job["root"] / f"{name}.parquet")
    assert got.equals(job["expected"])
    assert sorted(got["id"].to_pylist()) == list(range(job["rows"]))
    report = json.loads(
        CliRunner().invoke(app, ["report", str(job["root"] / f"{name}.parquet.run"), "--json"]).output
    )
    assert report["attempts"] == 2 and report["rows_done"] == job["rows"]


def test_sigterm_commits_and_says_how_to_resume(job):
    cmd = [
        sys.executable,
        "-m",
        "batchllm",
        *args(job, "term", "--checkpoint-rows", "1", "--max-new-tokens", "40"),
    ]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    shards = job["root"] / "term.parquet.run" / "shards"
    deadline = time.time() + 120
    while time.time() < deadline and not any(shards.glob("shard-*.parquet")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before SIGTERM arrived")
    assert proc.returncode == 130, stderr
    assert "run the same command again to resume" in stderr
    code, out = cli(job, "term", "--checkpoint-rows", "1", "--max-new-tokens", "40")
    assert code == 0, out


def test_changed_input_or_sampling_is_refused_and_fresh_discards(job, tmp_path):
    code, _ = cli(job, "refuse")
    assert code == 0
    code, out = cli(job, "refuse", "--temperature", "0.7")
    assert code == 2 and "sampling changed" in out and "--fresh" in out
    code, out = cli(job, "refuse", "--max-new-tokens", "9")
    assert code == 2 and "max_new_tokens" in out
    original = job["root"] / "in.parquet"
    moved = tmp_path / "in.parquet"
    table = pq.read_table(original)
    pq.write_table(table.slice(0, table.num_rows - 1), moved)
    result = CliRunner().invoke(app, [*args(job, "refuse")[:1], str(moved), *args(job, "refuse")[2:]])
    assert result.exit_code == 2 and "input changed" in result.output
    code, out = cli(job, "refuse", "--temperature", "0.7", "--fresh")
    assert code == 0, out


def test_window_smaller_than_input_gives_the_same_output(job):
    code, out = cli(job, "one_window", "--window", "1000")
    assert code == 0, out
    one = pq.read_table(job["root"] / "one_window.parquet")
    # Only how much KV a row borrowed may differ: one tree over all rows finds more sharing.
    assert one.drop_columns(["cached_tokens"]).equals(job["expected"].drop_columns(["cached_tokens"]))
    assert pc.sum(one["cached_tokens"]).as_py() >= pc.sum(job["expected"]["cached_tokens"]).as_py()


def test_job_file_with_flag_override(job):
    root = job["root"]
    (root / "job.toml").write_text(
        f'input = "in.parquet"\nmodel = "{job["model"]}"\nprefix = "prefix.txt"\n'
        'output = "from_job.parquet"\nmax-new-tokens = 8\nwindow = 16\nquiet = true\n'
    )
    result = CliRunner().invoke(
        app, ["run", "--job", str(root / "job.toml"), "--output", str(root / "flag.parquet")]
    )
    assert result.exit_code == 0, result.output
    assert not (root / "from_job.parquet").exists()
    assert pq.read_table(root / "flag.parquet").equals(job["expected"])
    (root / "bad.toml").write_text('model = "x"\nno_such_setting = 1\n')
    result = CliRunner().invoke(app, ["run", "--job", str(root / "bad.toml")])
    assert result.exit_code == 2 and "no_such_setting" in result.output


def test_report_totals_equal_the_output_file_and_plot_writes_png(job):
    run_dir = job["root"] / "reference.parquet.run"
    result = CliRunner().invoke(app, ["report", str(run_dir), "--json", "--plot", str(job["root"] / "r.png")])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    table = job["expected"].to_pylist()
    ok = [r for r in table if r["finish_reason"] != "error"]
    assert report["rows"] == report["rows_done"] == len(table)
    assert report["output_tokens"] == sum(r["output_tokens"] for r in table)
    assert report["prompt_tokens"] == sum(r["prompt_tokens"] for r in ok)
    assert report["attempts"] == 1 and report["rows_remaining"] == 0
    for key in ("wall_seconds", "requests_per_second", "input_tokens_per_second", "total_tokens_per_second"):
        assert report[key] > 0
    assert (job["root"] / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plan_json_equals_what_the_run_reports(job):
    root = job["root"]
    prefix = str(root / "prefix.txt")
    flags = ["--prefix", prefix, "--max-new-tokens", "8", "--window", "16", "--json"]
    result = CliRunner().invoke(app, ["plan", str(root / "in.parquet"), "--model", str(job["model"]), *flags])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    report = json.loads(
        CliRunner().invoke(app, ["report", str(root / "reference.parquet.run"), "--json"]).output
    )
    for key in (
        "rows",
        "prompt_tokens",
        "unique_prompt_tokens",
        "groups",
        "duplicate_rows",
        "max_tree_depth",
    ):
        assert plan[key] == report[key], key
    assert plan["prefill_tokens_planned"] == report["prefill_tokens_computed"]
    assert plan["prefill_flops_with_sharing"] < plan["prefill_flops_without_sharing"]
