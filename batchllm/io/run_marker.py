"""Which directories are run directories, what ``--fresh`` may remove, and where the output may go.

A run directory carries a marker file the tool wrote (``.batchllm-run``). batchllm adopts a directory
only if it is new, empty, marked, or holds nothing but the tool's own files (a run directory made
before markers existed); anything else is refused, so ``--run-dir proj`` never writes into, or with
``--fresh`` empties, a folder of the user's. ``--fresh`` removes only the tool's own files.

    run_dir/
      .batchllm-run       the marker           lock             the run lock (run_lock.py)
      manifest.json       input and settings   metrics.jsonl    the metrics log
      owner               the Ray fence        ray_processes.json  Ray processes this run started
      shards/             committed shards     quarantine/      shards that failed their checksum
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from batchllm.errors import JobError

logger = logging.getLogger(__name__)

MARKER = ".batchllm-run"
# The tool's own files at the top of a run directory (names kept in step with manifest.py, metrics.py,
# run_lock.py, job/fence.py and job/leftovers.py), and the temp files written beside them.
TOOL_FILES = frozenset({MARKER, "lock", "manifest.json", "metrics.jsonl", "owner", "ray_processes.json"})
TOOL_DIRS = ("shards", "quarantine")
_TOOL_TEMP = re.compile(r"\.(manifest\.json|owner|ray_processes\.json)(\.\d+)?\.tmp")
_RESULT_FILE = re.compile(r"\.?shard-[0-9a-f-]+\.parquet(\.\d+\.tmp)?")


def check_paths(input: Path, output: Path, run_dir: Path) -> None:
    """Refuse an output that is the input, a run directory holding the input, an output inside it."""
    inp, out, run = (Path(p).resolve() for p in (input, output, run_dir))
    if out == inp:
        raise JobError(f"the output {output} is the input; give another --output")
    if run == inp or run in inp.parents:
        raise JobError(
            f"the run directory {run_dir} is or contains the input {input}; give another --run-dir"
        )
    if run == out or run in out.parents:
        raise JobError(
            f"the output {output} is inside the run directory {run_dir}; put it elsewhere (the run "
            "directory holds only the tool's own files)"
        )


def check_recognised(run_dir: Path) -> None:
    """Raise unless ``run_dir`` is missing, empty, marked, or holds only the tool's own files."""
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise JobError(f"the run directory {run_dir} is a file; give a directory as --run-dir")
    if (run_dir / MARKER).is_file():
        return
    foreign = sorted(p.name for p in run_dir.iterdir() if not _is_tool_entry(p))
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise JobError(
            f"{run_dir} is not a batchllm run directory (it holds {shown} and no {MARKER} marker); "
            "batchllm neither writes into nor empties such a folder: give a new or empty --run-dir"
        )


def mark(run_dir: Path) -> None:
    marker = run_dir / MARKER
    if not marker.exists():
        marker.write_text(json.dumps({"tool": "batchllm", "format": 1}) + "\n")


def clear(run_dir: Path) -> int:
    """``--fresh``: remove the tool's own files (not the marker or the lock); returns how many."""
    removed = 0
    for path in run_dir.iterdir():
        if path.is_file() and (path.name in TOOL_FILES - {MARKER, "lock"} or _TOOL_TEMP.fullmatch(path.name)):
            path.unlink()
            removed += 1
    for name in TOOL_DIRS:
        folder = run_dir / name
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            if path.is_file() and _RESULT_FILE.fullmatch(path.name):
                path.unlink()
                removed += 1
        if not any(folder.iterdir()):
            folder.rmdir()
        else:
            logger.warning("--fresh kept %s: it holds files batchllm did not write", folder)
    logger.info("--fresh removed %d file(s) of the earlier run in %s", removed, run_dir)
    return removed


def _is_tool_entry(path: Path) -> bool:
    if path.name in TOOL_DIRS:
        return path.is_dir()
    return path.is_file() and (path.name in TOOL_FILES or bool(_TOOL_TEMP.fullmatch(path.name)))
