"""The one seam for fault injection: named points on the commit path where crash-safety tests kill
the process. A no-op unless a test sets ``BATCHLLM_CRASH_AT``; the logic lives in
``batchllm.testing.faults``, which a real run never imports."""

from __future__ import annotations

import os

CRASH_ENV = "BATCHLLM_CRASH_AT"  # "<point>:<n>": SIGKILL this process the n-th time it passes <point>
# "<worker>:<point>:<n>": the first Ray worker number <worker> (or every first worker, for "*") gets
# CRASH_ENV=<point>:<n>; workers started later never crash.
WORKER_CRASH_ENV = "BATCHLLM_WORKER_CRASH_AT"


def crash_point(point: str) -> None:
    """``row`` (a row finished), ``commit`` (a shard recorded), ``shard_written`` and ``assemble``
    (a file written, not yet renamed into place)."""
    spec = os.environ.get(CRASH_ENV)
    if spec:
        from batchllm.testing.faults import pass_point

        pass_point(spec, point)


def worker_crash_spec(index: int) -> str:
    """CRASH_ENV for the ``index``-th worker of a first set ("" when WORKER_CRASH_ENV spares it)."""
    spec = os.environ.get(WORKER_CRASH_ENV)
    if not spec:
        return ""
    worker, _, point = spec.partition(":")
    return point if worker in (str(index), "*") else ""
