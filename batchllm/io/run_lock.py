"""The exclusive lock on a run directory: one run at a time, and never stuck after a crash.

The lock is an OS file lock (``fcntl.flock``) on ``run_dir/lock``, taken before anything in the
directory is read or changed and held for the whole run. The kernel drops it when its holder dies,
``kill -9`` included, so a killed run never leaves it stuck. The holder writes its pid and host into
the file, so a refused run can say who holds it. The file itself is never removed: a new file at the
same path would let a second run lock it while the first still holds the old one.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from pathlib import Path

from batchllm.errors import JobError

LOCK = "lock"


class RunLock:
    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, run_dir: Path) -> RunLock:
        """Lock ``run_dir`` (created if missing), or raise a JobError naming the run that holds it."""
        path = Path(run_dir) / LOCK
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise JobError(f"cannot write to the run directory {run_dir}: {e.strerror or e}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _holder(fd)
            os.close(fd)
            raise JobError(
                f"the run directory {run_dir} is in use by another batchllm run ({holder}); wait for it to "
                "end, or give this run another --run-dir"
            ) from None
        me = json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, me, 0)
        return cls(path, fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Unlock (the kernel does the same when the process dies); the file stays."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass  # the holder's record is only a hint
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _holder(fd: int) -> str:
    try:
        record = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {int(record['pid'])} on host {record['host']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "its pid is not recorded yet"
