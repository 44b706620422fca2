"""Crash points for the crash-safety tests, reached through ``batchllm.io.faults.crash_point``."""

from __future__ import annotations

import os
import signal
from collections import Counter

_passes: Counter[str] = Counter()  # test processes only: counts the passes of each point


def pass_point(spec: str, point: str) -> None:
    """SIGKILL this process the n-th time it passes ``point``, for ``spec`` = "<point>:<n>"."""
    name, _, nth = spec.partition(":")
    if name != point:
        return
    _passes[point] += 1
    if _passes[point] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
