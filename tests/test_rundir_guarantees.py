"""Issue #11, "nothing lost, ever": what a run directory guarantees. One test per item of the issue."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from batchllm.cli import app

SHARD_GLOB = "shard-*.parquet"


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_models, make_rows) -> dict:
    """A 12-row job and its uninterrupted output."""
    root = tmp_path_factory.mktemp("rundir")
    texts = make_rows(num_groups=3, rows_per_group=4, seed=5)
    pq.write_table(pa.table({"text": texts}), root / "in.parquet")
    spec = {"root": root, "model": str(tiny_models["qwen2"]), "rows": len(texts)}
    code, out = cli(spec, "--output", str(root / "reference.parquet"))
    assert code == 0, out
    spec["expected"] = pq.read_table(root / "reference.parquet")
    return spec


def flags(spec: dict, *extra: str, input: Path | None = None) -> list[str]:
    inp = input or spec["root"] / "in.parquet"
    return [
        "run", str(inp), "--model", spec["model"], "--device", "cpu", "--max-new-tokens", "8",
        "--quiet", "--checkpoint-rows", "3", *extra,
    ]  # fmt: skip


def cli(spec: dict, *extra: str, input: Path | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(app, flags(spec, *extra, input=input))
    return result.exit_code, result.output


def subprocess_cli(spec: dict, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "batchllm", *flags(spec, *extra)]
    return subprocess.run(cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=300)


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# ------------------------------------------------------------------------------------------------ item 1


def test_fresh_removes_only_the_tools_own_files_and_checks_the_job_first(job, tmp_path):
    proj = tmp_path / "proj"
    (proj / "data").mkdir(parents=True)
    shutil.copy(job["root"] / "in.parquet", proj / "data" / "in.parquet")
    (proj / "notes.txt").write_text("mine")
    before = listing(proj)
    # The command: the run directory holds the input.
    code, out = cli(job, "--output", str(proj / "out.parquet"), "--run-dir", str(proj), "--fresh",
                    input=proj / "data" / "in.parquet")  # fmt: skip
    assert code == 2 and "contains the input" in out, out
    assert listing(proj) == before
    # A folder the tool did not make is refused, whatever it holds.
    code, out = cli(job, "--output", str(tmp_path / "o.parquet"), "--run-dir", str(proj), "--fresh")
    assert code == 2 and "not a batchllm run directory" in out, out
    assert listing(proj) == before
    # A job file with run_dir = "." and fresh = true, next to other files, leaves its folder alone.
    (proj / "job.toml").write_text(
        f'input = "data/in.parquet"\nmodel = "{job["model"]}"\noutput = "../elsewhere.parquet"\n'
        'run_dir = "."\nfresh = true\nmax-new-tokens = 8\nquiet = true\ndevice = "cpu"\n'
    )
    before = listing(proj)
    result = CliRunner().invoke(app, ["run", "--job", str(proj / "job.toml")])
    assert result.exit_code == 2 and listing(proj) == before, result.output
    # A real run directory: a mistyped model is found before anything is removed.
    run_dir = tmp_path / "out.parquet.run"
    code, out = cli(job, "--output", str(tmp_path / "out.parquet"))
    assert code == 0, out
    shards = listing(run_dir / "shards")
    code, out = cli(job, "--output", str(tmp_path / "out.parquet"), "--fresh", "--model", "./no/such/model")
    assert code == 2 and "does not exist" in out
    assert listing(run_dir / "shards") == shards and shards
    # --fresh on it removes the tool's files and nothing else.
    (run_dir / "my_notes.txt").write_text("kept")
    code, out = cli(job, "--output", str(tmp_path / "out.parquet"), "--fresh")
    assert code == 0, out
    assert (run_dir / "my_notes.txt").read_text() == "kept"
    assert pq.read_table(tmp_path / "out.parquet").equals(job["expected"])


# ------------------------------------------------------------------------------------------------ item 2


def test_output_or_run_dir_overlapping_the_input_is_refused(job, tmp_path):
    data = tmp_path / "d.parquet"
    shutil.copy(job["root"] / "in.parquet", data)
    original = data.read_bytes()
    code, out = cli(job, "--output", str(data), input=data)
    assert code == 2 and "is the input" in out, out
    code, out = cli(job, "--output", str(tmp_path / "o.parquet"), "--run-dir", str(tmp_path), input=data)
    assert code == 2 and "contains the input" in out, out
    code, out = cli(job, "--output", str(tmp_path / "r" / "o.parquet"), "--run-dir", str(tmp_path / "r"))
    assert code == 2 and "inside the run directory" in out, out
    assert data.read_bytes() == original and not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------------------------ item 3


def test_a_second_run_on_a_run_dir_exits_2_naming_the_holder_and_kill_9_frees_it(job, tmp_path):
    run_dir = tmp_path / "out.parquet.run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from batchllm.io.run_lock import "
         "RunLock; RunLock.acquire(Path(sys.argv[1])); print('held', flush=True); time.sleep(300)",
         str(run_dir)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        code, out = cli(job, "--output", str(tmp_path / "out.parquet"))
        assert code == 2 and f"pid {holder.pid}" in out and socket.gethostname() in out, out
        assert not (tmp_path / "out.parquet").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    code, out = cli(job, "--output", str(tmp_path / "out.parquet"))
    assert code == 0, out
    assert pq.read_table(tmp_path / "out.parquet").equals(job["expected"])


# ------------------------------------------------------------------------------------------------ item 4


def test_shards_without_a_manifest_are_refused_until_fresh(job, tmp_path):
    code, out = cli(job, "--output", str(tmp_path / "out.parquet"))
    assert code == 0, out
    run_dir = tmp_path / "out.parquet.run"
    (run_dir / "manifest.json").unlink()
    code, out = cli(job, "--output", str(tmp_path / "out.parquet"), "--max-new-tokens", "4")
    assert code == 2 and "no manifest" in out and "--fresh" in out, out
    assert not (run_dir / "manifest.json").exists()
    code, out = cli(job, "--output", str(tmp_path / "out.parquet"), "--fresh")
    assert code == 0, out
    assert pq.read_table(tmp_path / "out.parquet").equals(job["expected"])


# ------------------------------------------------------------------------------------------------ item 7


def test_a_bit_flip_in_a_shard_is_named_moved_aside_and_its_rows_redone(job, tmp_path, caplog):
    code, out = cli(job, "--output", str(tmp_path / "out.parquet"))
    assert code == 0, out
    run_dir = tmp_path / "out.parquet.run"
    shard = sorted((run_dir / "shards").glob(SHARD_GLOB))[1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x10
    shard.write_bytes(bytes(data))
    report = json.loads(CliRunner().invoke(app, ["report", str(run_dir), "--json"]).output)
    assert report["rows_done"] < job["rows"]  # the report reads only verified shards
    (tmp_path / "out.parquet").unlink()
    code, out = cli(job, "--output", str(tmp_path / "out.parquet"))
    assert code == 0, out
    assert shard.name in caplog.text and "checksum" in caplog.text
    assert not shard.exists() and (run_dir / "quarantine" / shard.name).exists()
    # Only how much KV a redone row borrowed may differ: it runs with fewer rows to share with.
    got = pq.read_table(tmp_path / "out.parquet")
    assert got.drop_columns(["cached_tokens"]).equals(job["expected"].drop_columns(["cached_tokens"]))


# ------------------------------------------------------------------------------------------------ item 9


def test_unreadable_metrics_lines_are_skipped_and_counted(job, tmp_path):
    code, out = cli(job, "--output", str(tmp_path / "out.parquet"))
    assert code == 0, out
    run_dir = tmp_path / "out.parquet.run"
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('42\n{}\n{"kind": "commit", "time": 1.0}\n{"kind": "end", "time": 2, "wall_seconds": "x"}\n')
    result = CliRunner().invoke(app, ["report", str(run_dir), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["metrics_lines_skipped"] == 4 and report["rows_done"] == job["rows"]
    code, out = cli(job, "--output", str(tmp_path / "out.parquet"), "--report", str(tmp_path / "r.json"))
    assert code == 0, out
    assert json.loads((tmp_path / "r.json").read_text())["metrics_lines_skipped"] == 4


# ------------------------------------------------------------------------------------------------ item 10


def test_a_crash_during_assembly_leaves_no_temp_file_after_the_next_run(job, tmp_path):
    out_path = tmp_path / "out.parquet"
    killed = subprocess_cli(job, "--output", str(out_path), env={"BATCHLLM_CRASH_AT": "assemble:1"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert list(tmp_path.glob(".out.parquet.*.tmp"))  # the crash left one
    code, out = cli(job, "--output", str(out_path))
    assert code == 0, out
    assert not list(tmp_path.glob(".out.parquet.*.tmp"))
    assert pq.read_table(out_path).equals(job["expected"])


def test_ray_processes_a_killed_driver_left_are_ended_on_the_next_start(tmp_path):
    from batchllm.job.leftovers import end_leftovers, record_processes

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    sleeper = "import time; time.sleep(120)"
    orphan = subprocess.Popen([sys.executable, "-c", sleeper, "ray::EngineWorker"])
    bystander = subprocess.Popen([sys.executable, "-c", sleeper, "not-a-worker"])
    try:
        record_processes(run_dir, [orphan.pid, bystander.pid])
        end_leftovers(run_dir)
        deadline = time.time() + 20
        while orphan.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert orphan.poll() is not None  # ended
        assert bystander.poll() is None  # a process that is not Ray's is never touched
    finally:
        for p in (orphan, bystander):
            p.kill()
            p.wait()


@pytest.mark.slow
def test_a_kill_9_driver_leaves_no_ray_processes_after_the_next_start(job, tmp_path):
    pytest.importorskip("ray")
    out_path = tmp_path / "out.parquet"
    cmd = [sys.executable, "-m", "batchllm", *flags(job, "--output", str(out_path), "--workers", "2")]
    env = {**os.environ, "BATCHLLM_CRASH_AT": "commit:2"}  # the driver SIGKILLs itself mid-run
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == -signal.SIGKILL, stderr
        recorded = json.loads((tmp_path / "out.parquet.run" / "ray_processes.json").read_text())["pids"]
        assert len(recorded) >= 3  # Ray's own processes and the two workers
        code, out = cli(job, "--output", str(out_path))  # one worker: no Ray of its own
        assert code == 0, out
        assert not [pid for pid in recorded if alive(pid)]
        assert not (tmp_path / "out.parquet.run" / "ray_processes.json").exists()
    finally:
        for entry in os.listdir("/proc"):  # whatever the test left, in the driver's own session
            try:
                if entry.isdigit() and os.getsid(int(entry)) == proc.pid:
                    os.kill(int(entry), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def alive(pid: int) -> bool:
    """A process that exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
