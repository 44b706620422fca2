"""The step's plan for batch-invariant attention: fixed KV chunks, fixed query tiles, fixed merge order.

A token at position ``p`` attends to KV chunks ``0 .. p // CHUNK`` of its sequence, each ``CHUNK``
positions starting at a multiple of ``CHUNK`` (block aligned, independent of prefixes and batch)::

    positions:  [0, CHUNK) [CHUNK, 2*CHUNK) ... [j*CHUNK, p]      one (out, lse) per chunk, merged
                 chunk 0    chunk 1              chunk j (causal)  left to right: 0, 1, ..., j

A *piece* is one chunk of KV read for a set of tokens: a chunk wholly inside a group's shared prefix
is one piece for every token of the group's rows (read once), any other chunk one piece per row.
A piece's tokens go in *tiles* of exactly ``TILE`` tokens (the last padded), so each attention matmul
has the same shape whoever shares it; a token's arithmetic is the same in every batch (see
``torch_chunked.py``). Everything here depends only on the step, so it is built once per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

CHUNK = 256  # KV positions per chunk (a multiple of the block size; see chunk_len)
TILE = 4  # tokens per query tile


def chunk_len(block_size: int) -> int:
    return max(CHUNK, block_size)


@dataclass(frozen=True)
class ChunkPlan:
    chunk: int  # KV positions per chunk
    tile_tokens: torch.Tensor  # [num_tiles, TILE] int64 token index (0 in padding slots)
    tile_blocks: torch.Tensor  # [num_tiles, chunk // block_size] int64 KV blocks of the tile's chunk
    tile_qpos: torch.Tensor  # [num_tiles, TILE] int64 position of each slot's token (-1: padding)
    tile_key_start: torch.Tensor  # [num_tiles] int64 first position of the tile's chunk
    tile_visible: torch.Tensor  # [num_tiles, TILE, chunk] bool, causal (no window)
    chunk_tiles: tuple[tuple[int, int], ...]  # per chunk index j: the tiles [lo, hi) over chunk j
    chunk_slots: tuple[torch.Tensor, ...]  # per j: flat slot (tile - lo) * TILE + slot of each token
    chunk_tokens: tuple[torch.Tensor, ...]  # per j: the token of each of those slots


def build_chunk_plan(
    query_lens: np.ndarray,  # [num_seqs] new tokens of each sequence
    seq_lens: np.ndarray,  # [num_seqs] cached + new tokens
    block_tables: np.ndarray,  # [num_seqs, max_blocks] int
    group_starts: np.ndarray,  # [num_groups + 1] over sequences; every sequence in one group
    shared_blocks: np.ndarray,  # [num_groups] leading blocks all rows of the group share
    block_size: int,
    to_device,  # np.ndarray -> torch.Tensor on the step's device
) -> ChunkPlan:
    chunk = chunk_len(block_size)
    num_seqs, num_groups = len(query_lens), len(shared_blocks)
    row = np.repeat(np.arange(num_seqs), query_lens)
    starts = np.cumsum(query_lens) - query_lens
    qpos = (seq_lens - query_lens)[row] + np.arange(len(row)) - starts[row]
    # Every (token, chunk j <= its position's chunk) pair, token-major.
    n_chunks = qpos // chunk + 1
    token = np.repeat(np.arange(len(row)), n_chunks)
    j = np.arange(len(token)) - np.repeat(np.cumsum(n_chunks) - n_chunks, n_chunks)
    group_of_seq = np.repeat(np.arange(num_groups), np.diff(group_starts))
    shared_chunks = (shared_blocks * block_size) // chunk
    g = group_of_seq[row[token]]
    key = j * (num_groups + num_seqs) + np.where(j < shared_chunks[g], g, num_groups + row[token])
    order = np.lexsort((token, key))
    token, j, key = token[order], j[order], key[order]
    tile, slot = _tiles_of(key)
    num_tiles = int(tile[-1]) + 1 if len(tile) else 0
    tile_tokens = np.zeros((num_tiles, TILE), dtype=np.int64)
    tile_qpos = np.full((num_tiles, TILE), -1, dtype=np.int64)
    tile_tokens[tile, slot] = token
    tile_qpos[tile, slot] = qpos[token]
    tile_j = np.zeros(num_tiles, dtype=np.int64)
    tile_j[tile] = j
    tile_row = np.zeros(num_tiles, dtype=np.int64)
    tile_row[tile] = row[token]  # a shared piece's rows all hold its blocks: any of them will do
    entries = (tile, slot, token, j)
    tiles = (tile_j, tile_row, tile_tokens, tile_qpos)
    return _assemble(chunk, block_size, block_tables, entries, tiles, to_device)


def _tiles_of(key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted piece keys -> (tile, slot in tile) of each entry."""
    n = len(key)
    new_piece = np.ones(n, dtype=bool)
    new_piece[1:] = key[1:] != key[:-1]
    piece_start = np.maximum.accumulate(np.where(new_piece, np.arange(n), 0))
    rank = np.arange(n) - piece_start
    new_tile = new_piece | (rank % TILE == 0)
    return np.cumsum(new_tile) - 1, rank % TILE


def _assemble(
    chunk: int,
    block_size: int,
    block_tables: np.ndarray,
    entries: tuple[np.ndarray, ...],  # (tile, slot, token, j) of every (token, chunk) pair
    tiles: tuple[np.ndarray, ...],  # (chunk index, sequence, tokens, positions) of every tile
    to_device,
) -> ChunkPlan:
    tile, slot, token, j = entries
    tile_j, tile_row, tile_tokens, tile_qpos = tiles
    per_chunk = chunk // block_size
    num_j = int(tile_j.max()) + 1 if len(tile_j) else 0
    width = num_j * per_chunk
    tables = np.zeros((block_tables.shape[0], max(width, block_tables.shape[1])), dtype=np.int64)
    tables[:, : block_tables.shape[1]] = block_tables
    cols = tile_j[:, None] * per_chunk + np.arange(per_chunk)
    tile_blocks = tables[tile_row[:, None], cols]
    key_start = tile_j * chunk
    visible = key_start[:, None, None] + np.arange(chunk) <= tile_qpos[:, :, None]
    tile_bounds = np.searchsorted(tile_j, np.arange(num_j + 1))
    entry_bounds = np.searchsorted(j, np.arange(num_j + 1))
    chunk_tiles, slots, tokens = [], [], []
    for c in range(num_j):
        lo, hi = int(tile_bounds[c]), int(tile_bounds[c + 1])
        a, b = entry_bounds[c], entry_bounds[c + 1]
        chunk_tiles.append((lo, hi))
        slots.append(to_device((tile[a:b] - lo) * TILE + slot[a:b]))
        tokens.append(to_device(token[a:b].astype(np.int64)))
    return ChunkPlan(
        chunk=chunk,
        tile_tokens=to_device(tile_tokens),
        tile_blocks=to_device(np.ascontiguousarray(tile_blocks)),
        tile_qpos=to_device(tile_qpos),
        tile_key_start=to_device(key_start),
        tile_visible=to_device(visible),
        chunk_tiles=tuple(chunk_tiles),
        chunk_slots=tuple(slots),
        chunk_tokens=tuple(tokens),
    )
