"""Ray processes a driver started, recorded in its run directory so that none outlive a killed driver.

A driver that starts a local Ray runtime records the pids of Ray's processes and of its workers in
``run_dir/ray_processes.json``, and removes the record once it has shut Ray down (normal end, error,
SIGINT/SIGTERM). A driver killed outright (``kill -9``) cannot; the next run on the directory, holding
the run lock (so the recorder is gone), ends whatever recorded process is still a Ray process.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import time
from collections.abc import Iterable
from pathlib import Path

logger = logging.getLogger(__name__)

RECORD = "ray_processes.json"
GRACE_S = 5.0  # after SIGTERM, before SIGKILL


def record_processes(run_dir: Path, pids: Iterable[int]) -> None:
    """Remember ``pids`` (this host) as processes to end if this driver dies without shutting Ray down."""
    path = Path(run_dir) / RECORD
    tmp = path.with_name(f".{RECORD}.{os.getpid()}.tmp")
    tmp.write_text(
        json.dumps({"host": socket.gethostname(), "driver": os.getpid(), "pids": sorted(set(pids))})
    )
    os.replace(tmp, path)


def forget_processes(run_dir: Path) -> None:
    (Path(run_dir) / RECORD).unlink(missing_ok=True)


def end_leftovers(run_dir: Path) -> list[int]:
    """End the recorded processes of a driver that died without shutting Ray down; the pids ended."""
    path = Path(run_dir) / RECORD
    try:
        record = json.loads(path.read_text())
        host, pids = record["host"], [int(p) for p in record["pids"]]
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError, TypeError):
        logger.warning("ignoring the unreadable record of Ray processes %s", path)
        path.unlink(missing_ok=True)
        return []
    if host != socket.gethostname():
        logger.warning(
            "Ray processes recorded in %s ran on host %s; end them there if any remain", path, host
        )
        path.unlink(missing_ok=True)
        return []
    ending = [pid for pid in pids if pid != os.getpid() and _is_ray(pid)]
    _end(ending)
    if ending:
        logger.warning("ended %d Ray process(es) left by a killed driver: %s", len(ending), ending)
    path.unlink(missing_ok=True)
    return ending


def _is_ray(pid: int) -> bool:
    """Whether ``pid`` is (still) a Ray process: a recorded pid reused by another program is spared."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False  # gone (or no /proc: nothing to check it against, so leave it)
    text = b" ".join(argv)
    names = {Path(a.decode(errors="replace")).name for a in argv[:1]}
    return b"ray::" in text or b"/ray/" in text or bool(names & {"raylet", "gcs_server"})


def _end(pids: list[int]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except OSError:
                pass  # gone already, or not ours to end
        deadline = time.monotonic() + GRACE_S
        while pids and time.monotonic() < deadline:
            pids = [pid for pid in pids if _alive(pid)]
            time.sleep(0.05)
        if not pids:
            return


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    try:  # a zombie (ended, not yet reaped by its parent) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True
