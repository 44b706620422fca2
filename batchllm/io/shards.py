"""Committed result shards and their checksums.

A shard's name carries a checksum of its bytes, so the one atomic rename that commits a shard also
commits its checksum; reading a shard verifies it, and a shard that fails is never used:

    shard-000007-9f86d081884c7d65.parquet            number 7, blake2b-64 of the file's bytes
    shard-1f2e3d4c-000007-9f86d081884c7d65.parquet   the same, from a writer tagged 1f2e3d4c (Ray)

The Parquet footer of a verified shard then gives its row count and row indices; ``check_complete``
checks that the verified shards hold every row of the input exactly once.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

_NAME = re.compile(r"shard-(?:([0-9a-f]{8})-)?(\d{6,})-([0-9a-f]{16})\.parquet")


@dataclass(frozen=True)
class ShardFile:
    number: int
    writer: str | None  # the writer tag; None for the run's own (untagged) writer
    checksum: str  # 16 hex digits: blake2b (8 bytes) of the file
    path: Path

    @classmethod
    def parse(cls, path: Path) -> ShardFile | None:
        """The shard named by ``path``; None for any other file."""
        m = _NAME.fullmatch(path.name)
        return None if m is None else cls(int(m.group(2)), m.group(1), m.group(3), path)

    @classmethod
    def of(cls, folder: Path, number: int, writer: str | None, data: bytes) -> ShardFile:
        """Where the shard with this number, writer and content is committed."""
        digest = checksum(data)
        tag = "" if writer is None else f"{writer}-"
        return cls(number, writer, digest, folder / f"shard-{tag}{number:06d}-{digest}.parquet")

    def read_verified(self, columns: list[str] | None = None) -> pa.Table | None:
        """The shard's table; None when its bytes no longer match its checksum. Raises OSError and
        pyarrow errors for a file that cannot be read at all."""
        data = self.path.read_bytes()
        if checksum(data) != self.checksum:
            return None
        return pq.read_table(pa.BufferReader(data), columns=columns)


def checksum(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def encode(table: pa.Table) -> bytes:
    """The Parquet bytes of a shard (written in memory, so they are hashed before they are committed)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def list_shards(folder: Path) -> list[ShardFile]:
    """Every committed shard in ``folder``, by number then writer."""
    if not folder.is_dir():
        return []
    found = (ShardFile.parse(p) for p in folder.iterdir())
    return sorted((s for s in found if s is not None), key=lambda s: (s.number, s.writer or ""))


def check_complete(index: np.ndarray, num_rows: int, output: Path) -> None:
    """Every row index 0..num_rows-1 exactly once, or a RuntimeError naming what is wrong."""
    inside = (index >= 0) & (index < num_rows)
    counts = np.bincount(index[inside], minlength=num_rows)
    problems = []
    if not inside.all():
        problems.append(
            f"{(~inside).sum()} row indices outside 0..{num_rows - 1} ({_examples(index[~inside])})"
        )
    missing, duplicated = np.flatnonzero(counts == 0), np.flatnonzero(counts > 1)
    if missing.size:
        problems.append(f"{missing.size} rows missing ({_examples(missing)})")
    if duplicated.size:
        problems.append(f"{duplicated.size} rows committed more than once ({_examples(duplicated)})")
    if problems:
        raise RuntimeError(f"cannot assemble {output}: " + "; ".join(problems))


def _examples(values: np.ndarray, limit: int = 10) -> str:
    shown = ", ".join(str(v) for v in np.sort(values)[:limit])
    return f"rows {shown}" + (", ..." if values.size > limit else "")
