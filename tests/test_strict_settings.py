"""Strict settings and messages (#11): every flag and job-file key checked by type and range before
anything is written, and every bad input, prefix, manifest or full disk named by file, line or row."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from batchllm.cli import app
from batchllm.config import EngineConfig, JobSpec, SamplingParams


def run_cli(*args: str | Path) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["run", *map(str, args), "--quiet"])
    return result.exit_code, result.output


def error_line(code: int, text: str) -> str:
    """The one error line of a job that could not run (exit 2), without a traceback."""
    assert code == 2, text
    assert "Traceback" not in text, text
    lines = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, text
    return lines[0]


@pytest.fixture
def job(tmp_path: Path, tiny_models: dict[str, Path]) -> dict:
    """A one-row Parquet input, a tiny model and an output; the run directory must stay unwritten."""
    inp = tmp_path / "in.parquet"
    pq.write_table(pa.table({"text": ["a fine product"], "stars": [5]}), inp)
    out = tmp_path / "o.parquet"
    return {"tmp": tmp_path, "input": inp, "model": tiny_models["qwen2"], "output": out}


def base_args(job: dict) -> list:
    return [job["input"], "--model", job["model"], "--output", job["output"], "--max-new-tokens", "2"]


def nothing_written(job: dict) -> bool:
    return not job["output"].exists() and not job["output"].with_name("o.parquet.run").exists()


# ------------------------------------------------------------------------------------- flags (item 6)


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--temperature", "nan"),
        ("--temperature", "inf"),
        ("--top-p", "nan"),
        ("--checkpoint-seconds", "nan"),
        ("--checkpoint-seconds", "inf"),
        ("--kv-cache-memory", "infGB"),
        ("--kv-cache-memory", "nanGB"),
        ("--max-new-tokens", "0"),
        ("--token-budget", "0"),
        ("--window", "-1"),
    ],
)
def test_bad_flag_values_are_refused_naming_the_flag(job, flag, value):
    line = error_line(*run_cli(*base_args(job), flag, value))
    assert flag in line and value in line
    assert nothing_written(job)


# ----------------------------------------------------------------------------------- job file (item 6)


@pytest.mark.parametrize(
    "setting, expect",
    [
        ('chat = "false"', "true or false"),
        ("quiet = 1", "true or false"),
        ("max-new-tokens = true", "an integer"),
        ("max-new-tokens = 8.9", "an integer"),
        ('top-k = "5"', "an integer"),
        ('temperature = "hot"', "a number"),
        ("temperature = true", "a number"),
        ("temperature = nan", "finite"),
        ("checkpoint-seconds = inf", "finite"),
        ("workers = 0", ">= 1"),
        ("model = 3", "a string"),
        ("prefix = 3", "a string"),
        ("stop = 3", "a string or a list of strings"),
        ('stop = ["END", 3]', "a string or a list of strings"),
        ("keep-columns = 5", "a string or a list of strings"),
        ('device = ["cpu"]', "a string"),
    ],
)
def test_job_file_values_must_have_the_flag_type(job, setting, expect):
    key = setting.split(" = ")[0]
    base = {"input": '"in.parquet"', "model": f'"{job["model"]}"', "output": '"o.parquet"'}
    toml = job["tmp"] / "job.toml"
    toml.write_text("".join(f"{k} = {v}\n" for k, v in base.items() if k != key) + setting + "\n")
    line = error_line(*run_cli("--job", toml))
    assert str(toml) in line and key in line and expect in line, line
    assert nothing_written(job)


def test_job_file_values_of_the_right_type_run(job):
    toml = job["tmp"] / "job.toml"
    toml.write_text(
        f'input = "in.parquet"\nmodel = "{job["model"]}"\noutput = "o.parquet"\nchat = false\n'
        'max-new-tokens = 2\ntemperature = 0\ncheckpoint-seconds = 5\nkeep-columns = ["stars"]\n'
        'stop = "END"\nprefix-sharing = true\n'
    )
    code, text = run_cli("--job", toml)
    assert code == 0, text
    assert pq.read_table(job["output"]).column("stars").to_pylist() == [5]


def test_configs_refuse_wrong_types_and_non_finite_numbers():
    cases = [
        (lambda: SamplingParams(max_new_tokens=True), "max-new-tokens"),
        (lambda: SamplingParams(max_new_tokens=8.9), "max-new-tokens"),
        (lambda: SamplingParams(temperature=float("inf")), "temperature"),
        (lambda: SamplingParams(top_k=True), "top-k"),
        (lambda: SamplingParams(seed=1.5), "seed"),
        (lambda: SamplingParams(ignore_eos="false"), "ignore-eos"),
        (lambda: EngineConfig(prefix_sharing="false"), "prefix-sharing"),
        (lambda: EngineConfig(token_budget=8.9), "token-budget"),
        (lambda: JobSpec(Path("i.parquet"), "m", Path("o.parquet"), chat="false"), "chat"),
        (
            lambda: JobSpec(Path("i.parquet"), "m", Path("o.parquet"), checkpoint_seconds=float("nan")),
            "seconds",
        ),
        (lambda: JobSpec(Path("i.parquet"), "m", Path("o.parquet"), window_rows=True), "window"),
    ]
    for make, setting in cases:
        with pytest.raises(ValueError, match=setting):
            make()


# ------------------------------------------------------------------------------------ messages (item 8)


def test_duplicate_keep_columns_are_refused_before_any_work(job):
    line = error_line(*run_cli(*base_args(job), "--keep-columns", "stars,stars"))
    assert "--keep-columns" in line and "'stars'" in line and "twice" in line
    assert nothing_written(job)


def test_a_non_utf8_jsonl_line_is_that_rows_error(job):
    inp = job["tmp"] / "in.jsonl"
    good = [json.dumps({"text": t, "rid": i}).encode() for i, t in enumerate(["one", "two"])]
    inp.write_bytes(good[0] + b'\n{"text": "bad \xff\xfe bytes", "rid": 7}\n' + good[1] + b"\n")
    args = base_args(job)
    args[0] = inp
    code, text = run_cli(*args, "--id-column", "rid")
    assert code == 1, text  # the job ran; one row failed
    rows = pq.read_table(job["output"]).to_pylist()
    assert [r["finish_reason"] == "error" for r in rows] == [False, True, False]
    assert rows[1]["error"].startswith("line 2 is not valid UTF-8") and rows[1]["output"] is None
    assert rows[1]["id"] == 7 and [rows[0]["id"], rows[2]["id"]] == [0, 1]


def test_a_non_utf8_parquet_string_is_that_rows_error(job):
    def strings(*values: bytes) -> pa.Array:  # Parquet stores string bytes unchecked
        return pa.array(values, type=pa.binary()).view(pa.string())

    texts = strings(b"one", b"bad \xff bytes", b"two", b"three")
    rids = strings(b"r0", b"r1", b"r\xc3", b"r3")
    pq.write_table(pa.table({"text": texts, "rid": rids}), job["input"])
    code, text = run_cli(*base_args(job), "--id-column", "rid")
    assert code == 1, text
    rows = pq.read_table(job["output"]).to_pylist()
    assert [r["finish_reason"] == "error" for r in rows] == [False, True, True, False]
    assert rows[1]["error"].startswith("text is not valid UTF-8") and rows[1]["output"] is None
    assert rows[2]["error"].startswith("id column 'rid' is not valid UTF-8") and rows[2]["id"] is None
    assert [r["id"] for r in rows] == ["r0", "r1", None, "r3"]


def test_a_binary_prefix_file_is_named(job):
    prefix = job["tmp"] / "prefix.bin"
    prefix.write_bytes(b"\x89PNG\r\n\x1a\n\xff\x00")
    line = error_line(*run_cli(*base_args(job), "--prefix", prefix))
    assert str(prefix) in line and "UTF-8" in line
    assert nothing_written(job)


def test_a_directory_given_as_prefix_is_called_a_directory(job):
    line = error_line(*run_cli(*base_args(job), "--prefix", job["tmp"]))
    assert str(job["tmp"]) in line and "is a directory" in line and "does not exist" not in line


@pytest.mark.parametrize(
    "content", ["", "{not json", '{"input": {}}', "[1, 2]", '{"input": 1, "settings": {}}']
)
def test_an_unreadable_manifest_is_named_with_how_to_recover(job, content):
    run_dir = job["tmp"] / "o.parquet.run"
    run_dir.mkdir()
    (run_dir / "manifest.json").write_text(content)
    line = error_line(*run_cli(*base_args(job)))
    assert str(run_dir / "manifest.json") in line and "--fresh" in line
    code, text = run_cli(*base_args(job), "--fresh")
    assert code == 0, text


@pytest.mark.parametrize("failing_fsync", [1, 2, 3])
def test_a_full_disk_names_the_path(job, monkeypatch, failing_fsync):
    """The n-th fsync finds the disk full: the manifest, the metrics log or a shard, in that order."""
    calls = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        calls.append(fd)
        if len(calls) == failing_fsync:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    line = error_line(*run_cli(*base_args(job)))
    assert str(job["tmp"] / "o.parquet.run") in line and "disk is full" in line, line
