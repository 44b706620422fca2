"""Killing a batchllm run part-way from a test: the CLI in a subprocess that SIGKILLs itself at a crash
point (``io/faults.py``), then the same run resumed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from batchllm.cli import app


def run_killed(*argv: str | Path, crash_at: str = "commit:2") -> None:
    """``python -m batchllm ARGV``, killed at ``crash_at``; fails the test unless it died that way."""
    cmd = [sys.executable, "-m", "batchllm", *map(str, argv)]
    env = {**os.environ, "BATCHLLM_CRASH_AT": crash_at, "PYTHONPATH": os.getcwd()}
    killed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr


def kill_then_resume_job(job_file: Path) -> None:
    """Run ``job_file``, killed after its second commit, then resume it to the end (in this process)."""
    run_killed("run", "--job", job_file, "--quiet")
    result = CliRunner().invoke(app, ["run", "--job", str(job_file), "--quiet"])
    assert result.exit_code == 0, result.output
