"""The errors that end a job: a job that cannot run (exit code 2), and a run asked to stop (130)."""

from __future__ import annotations

import errno
from pathlib import Path


class JobError(Exception):
    """The job cannot run: bad input file, unknown column, missing model, unwritable output."""


class Interrupted(Exception):
    """The run was asked to stop; finished rows are committed and re-running resumes."""


class SettingError(ValueError):
    """A setting out of its type or range. ``setting`` is its flag name without dashes
    (``max-new-tokens``), so the command line and a job file can each say where it came from."""

    def __init__(self, setting: str, rule: str) -> None:
        super().__init__(f"{setting} {rule}")
        self.setting = setting
        self.rule = rule


def write_failure(what: str, path: Path, exc: OSError) -> JobError:
    """One line for a failed write: what, where, and why (a full disk said plainly)."""
    if exc.errno == errno.ENOSPC:
        why = "the disk is full (committed shards are kept; free space and rerun to resume)"
    else:
        why = exc.strerror or str(exc)
    return JobError(f"cannot write {what} {path}: {why}")
