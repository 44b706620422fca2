"""`--output x.jsonl`: the same rows and columns as the Parquet output, as JSON lines; resume and the
report are unchanged (the run directory's shards stay Parquet)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from crash_runs import run_killed
from typer.testing import CliRunner

from batchllm.cli import app


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_models, make_rows) -> dict:
    root = tmp_path_factory.mktemp("jsonl_out")
    texts = make_rows(num_groups=3, rows_per_group=4, duplicates=2, seed=5)
    texts[3] = None  # an error row: null output, its error
    ids = [f"r{i}" for i in range(len(texts))]
    pq.write_table(
        pa.table({"text": texts, "key": ids, "score": [i / 2 for i in range(len(texts))]}),
        root / "in.parquet",
    )
    spec = {"root": root, "model": tiny_models["qwen2"], "rows": len(texts)}
    code, out = cli(spec, "reference.parquet")
    assert code == 1, out  # one row failed
    spec["expected"] = pq.read_table(root / "reference.parquet").to_pylist()
    return spec


def args(spec: dict, output: str, *extra: str) -> list[str]:
    root = spec["root"]
    return [
        "run", str(root / "in.parquet"), "--model", str(spec["model"]), "--output", str(root / output),
        "--id-column", "key", "--keep-columns", "score", "--max-new-tokens", "6", "--quiet",
        "--checkpoint-rows", "2", *extra,
    ]  # fmt: skip


def cli(spec: dict, output: str, *extra: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, args(spec, output, *extra))
    return result.exit_code, result.output


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_jsonl_output_has_the_parquet_rows_and_columns(job):
    code, out = cli(job, "out.jsonl")
    assert code == 1, out
    rows = read_lines(job["root"] / "out.jsonl")
    assert rows == job["expected"]
    assert list(rows[0]) == ["id", "output", "prompt_tokens", "output_tokens", "cached_tokens",
                             "finish_reason", "error", "score"]  # fmt: skip
    assert rows[3]["output"] is None and rows[3]["error"] == "text is null"


def test_ndjson_name_and_job_file_give_lines_too(job):
    root = job["root"]
    settings = [
        'input = "in.parquet"', f'model = "{job["model"]}"', 'output = "job.ndjson"', 'id-column = "key"',
        'keep-columns = ["score"]', "max-new-tokens = 6",
    ]  # fmt: skip
    (root / "job.toml").write_text("\n".join(settings) + "\n")
    result = CliRunner().invoke(app, ["run", "--job", str(root / "job.toml"), "--quiet"])
    assert result.exit_code == 1, result.output
    assert read_lines(root / "job.ndjson") == job["expected"]


def test_sigkill_then_resume_writes_the_same_lines(job):
    run_killed(*args(job, "killed.jsonl"))
    assert not (job["root"] / "killed.jsonl").exists()
    code, out = cli(job, "killed.jsonl")
    assert code == 1, out
    assert read_lines(job["root"] / "killed.jsonl") == job["expected"]
    report = CliRunner().invoke(app, ["report", str(job["root"] / "killed.jsonl.run"), "--json"])
    figures = json.loads(report.output)
    assert figures["attempts"] == 2 and figures["rows_done"] == job["rows"] and figures["rows_failed"] == 1
