"""Crash points for the crash-safety tests: ``BATCHLLM_CRASH_AT=<point>:<n>`` SIGKILLs this process
the n-th time it passes <point> (``row``, ``commit``, ``assemble``). Unset in real runs: a no-op."""

from __future__ import annotations

import os
import signal
from collections import Counter

_passes: Counter[str] = Counter()  # only ever touched when the test variable is set


def crash_point(point: str) -> None:
    spec = os.environ.get("BATCHLLM_CRASH_AT")
    if not spec:
        return
    name, _, nth = spec.partition(":")
    if name != point:
        return
    _passes[point] += 1
    if _passes[point] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
