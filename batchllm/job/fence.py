"""Which attempt owns the run directory, so that workers of a dead driver stop writing into it.

Ray ends a driver's workers only seconds after the driver dies; meanwhile they would go on committing
rows that a resumed attempt, having read the committed rows already, generates again. Every attempt
claims the directory with a fresh token before it reads what is committed; a worker checks the token
before each commit (and about once a second between steps) and stops once it has changed.

The run lock (``io/run_lock.py``) keeps a second driver out; the fence covers what a lock cannot: Ray
workers, in other processes (and on other nodes), that outlive the driver holding it.
"""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

from batchllm.errors import write_failure

OWNER = "owner"


def claim(run_dir: Path) -> str:
    """Make this attempt the owner of ``run_dir``; returns its token."""
    token = secrets.token_hex(8)
    tmp = run_dir / f".{OWNER}.{os.getpid()}.tmp"
    try:
        tmp.write_text(token)
        os.replace(tmp, run_dir / OWNER)
    except OSError as e:
        raise write_failure("the owner file", run_dir / OWNER, e) from e
    return token


class Fence:
    def __init__(self, run_dir: Path, token: str, every_s: float = 1.0) -> None:
        self.path = Path(run_dir) / OWNER
        self.token = token
        self.every_s = every_s
        self._checked = 0.0
        self._held = True

    def holds(self) -> bool:
        """True while the attempt that started this worker still owns the directory."""
        if self._held:
            try:
                self._held = self.path.read_text() == self.token
            except OSError:  # removed (--fresh) or unreadable: the directory is no longer ours
                self._held = False
            self._checked = time.monotonic()
        return self._held

    def lost(self) -> bool:
        """``not holds()``, looked up at most once per ``every_s`` (it runs after every engine step)."""
        if self._held and time.monotonic() - self._checked < self.every_s:
            return False
        return not self.holds()
