"""Short chunks under a shared prefix as one-token rows, so that the cascade reads the prefix once.

A step's short chunks (a few tokens each: choices being scored, small prefill tails, decode rows)
whose sequences share a cached prefix would each read that whole prefix in the general path. Each
token of such a chunk is instead a one-token row of its own, over its sequence's block table, its
context ending at its own position; the rows keep their group, so the decode cascade runs on them::

    step rows:    a:[x x x]  b:[y y]  c:[z z z]  P            a, b, c under one prefix; P a long chunk
    pseudo rows:  x1 x2 x3 y1 y2 z1 z2 z3                    one group: prefix read once for all 8
                  seq_len of x2 = context_len(a) + 2         own tokens: each row's causal suffix
    rest:         P                                          the backend's general path

The prefix part needs no mask (every query position is past the prefix); the suffix part is each
pseudo row's positions after the prefix, which ends at the row itself (causal); the two are merged by
log-sum-exp, exactly as for decode rows. Backend-agnostic: only the metadata changes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np
import torch

from batchllm.kernels.decode_part import MixedSplit
from batchllm.kernels.metadata import AttentionMetadata, metadata_on_device

MAX_SHORT_CHUNK = 16  # longer chunks read their prefix once per query tile anyway


@dataclasses.dataclass(frozen=True)
class ShortRows:
    """The step rows run as one-token rows, and their groups over those pseudo rows."""

    rows: np.ndarray  # int64 [r], step rows chosen, in step order
    group_starts: np.ndarray  # int64 [g + 1], over pseudo rows, total last
    shared_blocks: np.ndarray  # int64 [g], each group's shared blocks (> 0)


def with_short_chunks(
    meta: AttentionMetadata,  # the step's general metadata
    query_lens: np.ndarray,  # [n] host copies of the step's arrays
    seq_lens: np.ndarray,  # [n]
    groups: tuple[np.ndarray, np.ndarray],  # (group starts over the step's rows, n last; shared blocks)
    block_size: int,
    dev: Mapping[str, torch.Tensor],  # the step's device tensors (query_start_loc, seq_lens, ...)
) -> AttentionMetadata | None:
    """The step's metadata with its short chunks under shared prefixes as one-token rows (all of its
    rows: a one-token step; some: a mixed split), or None when no multi-token chunk gains."""
    chosen = choose_short_rows(query_lens, seq_lens, groups, block_size)
    if chosen is None:
        return None
    tokens, part = _pseudo_rows(query_lens, seq_lens, chosen, dev)
    if len(chosen.rows) == len(query_lens):
        return part  # every row: pseudo rows are the step's tokens in step order
    rest_tokens, rest = _rest(
        query_lens, seq_lens, np.setdiff1d(np.arange(len(query_lens)), chosen.rows), dev
    )
    split = MixedSplit(torch.from_numpy(tokens).to(rest_tokens.device), part, rest_tokens, rest)
    return dataclasses.replace(meta, mixed_split=split)


def _rest(
    query_lens: np.ndarray, seq_lens: np.ndarray, rows: np.ndarray, dev: Mapping[str, torch.Tensor]
) -> tuple[torch.Tensor, AttentionMetadata]:
    """The other rows' tokens (their index in the step's q) and their metadata (general path)."""
    qsl = np.concatenate([[0], np.cumsum(query_lens)])
    tokens = np.concatenate([np.arange(qsl[i], qsl[i + 1]) for i in rows])
    device = dev["seq_lens"].device
    index, tok = torch.from_numpy(rows).to(device), torch.from_numpy(tokens).to(device)
    rest_qsl = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum(query_lens[rows], out=rest_qsl[1:])
    part = {
        "query_start_loc": torch.from_numpy(rest_qsl).to(device),
        "seq_lens": dev["seq_lens"][index],
        "block_tables": dev["block_tables"][index],
        "slot_mapping": dev["slot_mapping"][tok],
    }
    return tok, metadata_on_device(query_lens[rows], seq_lens[rows], None, part)


def choose_short_rows(
    query_lens: np.ndarray, seq_lens: np.ndarray, groups: tuple[np.ndarray, np.ndarray], block_size: int
) -> ShortRows | None:
    """Rows of at most MAX_SHORT_CHUNK tokens, past their group's shared prefix, whose own positions
    read once per token cost no more than their whole context once; kept where two or more rows of a
    group qualify. None unless some chosen row has more than one token (decode_part covers the rest)."""
    starts, shared = (np.asarray(a, dtype=np.int64) for a in groups)
    sizes = np.diff(starts)
    group_of = np.full(len(query_lens), len(shared), dtype=np.int64)  # rows outside groups: past the end
    group_of[starts[0] : starts[-1]] = np.repeat(np.arange(len(shared)), sizes)
    prefix = np.append(shared, 0)[group_of] * block_size
    ok = (query_lens <= MAX_SHORT_CHUNK) & (prefix > 0) & (seq_lens - query_lens >= prefix)
    ok &= query_lens * (seq_lens - prefix) <= seq_lens
    ok &= np.bincount(group_of[ok], minlength=len(shared) + 1)[group_of] >= 2
    if not (ok & (query_lens > 1)).any():
        return None
    ends = np.concatenate([[0], np.cumsum(np.where(ok, query_lens, 0))])[starts]
    keep = np.diff(ends) > 0
    return ShortRows(np.flatnonzero(ok), np.append(ends[:-1][keep], ends[-1]), shared[keep])


def _pseudo_rows(
    query_lens: np.ndarray, seq_lens: np.ndarray, chosen: ShortRows, dev: Mapping[str, torch.Tensor]
) -> tuple[np.ndarray, AttentionMetadata]:
    """The chosen rows' tokens (their index in the step's q) and their one-token-each metadata."""
    q = query_lens[chosen.rows]
    step_rows = np.repeat(chosen.rows, q)
    within = np.arange(int(q.sum()), dtype=np.int64) - np.repeat(np.cumsum(q) - q, q)
    tokens = (np.cumsum(query_lens) - query_lens)[step_rows] + within
    lens = (seq_lens - query_lens)[step_rows] + within + 1
    device = dev["seq_lens"].device
    index, tok = torch.from_numpy(step_rows).to(device), torch.from_numpy(tokens).to(device)
    part = {
        "query_start_loc": torch.arange(len(tokens) + 1, dtype=torch.int32, device=device),
        "seq_lens": torch.from_numpy(lens.astype(np.int32)).to(device),
        "block_tables": dev["block_tables"][index],
        "slot_mapping": dev["slot_mapping"][tok],
        "group_start_loc": torch.from_numpy(chosen.group_starts.astype(np.int32)).to(device),
        "shared_blocks": torch.from_numpy(chosen.shared_blocks.astype(np.int32)).to(device),
    }
    groups = (chosen.group_starts, chosen.shared_blocks)
    return tokens, metadata_on_device(np.ones(len(tokens), dtype=np.int64), lens, groups, part)
