"""The example jobs in jobs/ parse and run (with a tiny model swapped in by a flag)."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from batchllm.cli import app

JOBS = Path(__file__).resolve().parent.parent / "jobs"


@pytest.mark.parametrize("name", ["review_sentiment.toml", "summarize_chat.toml", "review_facts.toml"])
def test_example_job_runs(tmp_path, tiny_models, name):
    out = tmp_path / "out.parquet"
    result = CliRunner().invoke(
        app,
        ["run", "--job", str(JOBS / name), "--model", str(tiny_models["qwen2"]), "--output", str(out),
         "--report", str(tmp_path / "r.json"), "--max-new-tokens", "4", "--quiet"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    table = pq.read_table(out)
    assert table.num_rows >= 3
    assert set(table["finish_reason"].to_pylist()) <= {"stop", "length"}
    assert table["id"].type == "string"
