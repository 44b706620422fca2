"""``--n N``: every row runs as N sample sequences, each with its own random stream.

A row's samples are planned as N rows with the same prompt: the planner builds its tree over each
prompt less its last token, so the N samples (and identical prompts of other rows) share the whole
prompt but that token as one group, computed once. Sample 0 keeps the row's own stream
(``random_streams.row_key``), so ``--n 1`` output is unchanged; sample ``s`` > 0 draws from a key derived
from (seed, row id, s). The samples of a row run in one work unit and commit together, as one row.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace

import numpy as np

from batchllm.engine.random_streams import row_key
from batchllm.job.rows import RowBlock


def sample_key(seed: int, row_id: object, sample: int) -> int:
    """The random stream of sample ``sample`` of a row: the row's own for sample 0."""
    if sample == 0:
        return row_key(seed, row_id)
    text = f"{seed}\x00{row_id!r}\x00sample {sample}"
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def expand_samples(
    block: RowBlock, prompts: list[np.ndarray], keys: list[int], n: int | list[int], seed: int
) -> tuple[RowBlock, list[np.ndarray], list[int]]:
    """Each row as ``n`` consecutive sample rows (sample index in ``RowBlock.sample``), with their keys.
    ``n`` may be each row's own count (OpenAI requests); the job's ``--n`` is then their largest."""
    if isinstance(n, int) and n == 1:
        return block, prompts, keys
    counts = np.full(len(block), n, dtype=np.int64) if isinstance(n, int) else np.asarray(n, np.int64)
    rows = np.repeat(np.arange(len(block), dtype=np.int64), counts)
    sample = np.arange(len(rows), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    ids = block.ids.to_pylist()
    new_keys = [
        keys[r] if s == 0 else sample_key(seed, ids[r], s) for r, s in zip(rows.tolist(), sample.tolist())
    ]
    return replace(block.take(rows), sample=sample), [prompts[r] for r in rows.tolist()], new_keys


def align_pieces(pieces: list[tuple[int, int]], row_of: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) pieces of an order moved so that none splits a run of equal ``row_of`` (the samples
    of one row); pieces left empty are dropped."""
    bounds = [start for start, _ in pieces[1:]]
    moved = []
    for b in bounds:
        while 0 < b < len(row_of) and row_of[b] == row_of[b - 1]:
            b += 1
        moved.append(b)
    edges = [0, *moved, len(row_of)]
    return [(s, e) for s, e in zip(edges, edges[1:]) if e > s]
