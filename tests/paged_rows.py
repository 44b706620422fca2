"""Rows laid out in a paged KV cache for kernel tests: each row's shared blocks, then fresh ones."""

from __future__ import annotations

import math

import numpy as np


def paged_rows(rows: list, bs: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``rows``: (shared block ids, seq_len, query_len) each. Returns (query lens, seq lens, block
    tables int32 [rows, width], slot mapping of every new token); blocks after the shared ones are
    numbered from 100 on, one run per row."""
    tables, nxt, slots = np.zeros((len(rows), width), dtype=np.int32), 100, []
    for i, (ids, seq_len, q) in enumerate(rows):
        table = list(ids) + list(range(nxt, nxt + math.ceil(seq_len / bs) - len(ids)))
        nxt += len(table) - len(ids)
        tables[i, : len(table)] = table
        pos = np.arange(seq_len - q, seq_len)
        slots.append(tables[i, pos // bs].astype(np.int64) * bs + pos % bs)
    q_lens, seq_lens = np.array([r[2] for r in rows]), np.array([r[1] for r in rows])
    return q_lens, seq_lens, tables, np.concatenate(slots)
