"""Each row's random stream: a 64-bit key per row, and the uniform number that picks its token at each
generation step, both pure hashes (no torch: planning a job derives the keys without a model)."""

from __future__ import annotations

import hashlib


def row_key(seed: int, row_id: object) -> int:
    """A 64-bit key for one row's random stream, stable across runs and processes."""
    digest = hashlib.blake2b(f"{seed}\x00{row_id!r}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def uniform(key: int, step: int) -> float:
    """A number in [0, 1) for generation step ``step`` of the row with ``key``."""
    digest = hashlib.blake2b(step.to_bytes(8, "little"), key=key.to_bytes(8, "little"), digest_size=8)
    return (int.from_bytes(digest.digest(), "little") >> 11) / float(1 << 53)
