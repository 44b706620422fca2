"""Prefill cascade in plain torch: rows that prefill their own tokens under one long shared prefix
read that prefix once per group and layer, not once per row::

    group g:  rows r0 .. r1-1 of the step, sharing the blocks table[r0, :S] (full blocks only)
    prefix:   all new tokens of the group's rows (one contiguous run of the step's tokens) attend
              the S * block_size shared positions, unmasked: every one of them sits past the prefix
    suffix:   each row attends its own context after the shared blocks, causally
              (positions S * block_size .. seq_len - 1: its earlier own tokens and this chunk)
    merge:    the two (out, lse) states, by log-sum-exp

Rows outside such groups keep the general path (``varlen_attention``). The suffix part is padded
and bucketed by query length (powers of two) like that path. The plan depends only on the step: the
first layer builds it and the others reuse it (``PrefillGroups.once``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from batchllm.kernels.kv_gather import GATHER_ELEMENTS, KVGather, row_chunks
from batchllm.kernels.metadata import AttentionMetadata
from batchllm.kernels.torch_cascade import attention_state
from batchllm.kernels.torch_merge import merge_attention_states

# A group pays for its own few ops per layer (gather, attention, merge) only when its rows would
# otherwise re-read enough shared positions: (rows - 1) * shared positions of at least this.
MIN_SHARED_READS = 512
# A step with more groups than this (many small ones: choices under a prompt) cascades the groups
# that save most and leaves the others on the general path, so the loop over groups stays short.
MAX_GROUPS = 16


@dataclass(frozen=True)
class _Group:
    tokens: slice  # the group's new tokens in the step's q
    prefix_table: torch.Tensor  # int64 [1, S], the shared blocks


@dataclass(frozen=True)
class _Bucket:
    """Cascade rows of similar query length, padded into one batch for their suffix part."""

    tokens: torch.Tensor  # int64 [t], the rows' new tokens in the step's q
    row_of: torch.Tensor  # int64 [t], each token's row in the bucket
    j_of: torch.Tensor  # int64 [t], and its index in that row's chunk
    tables: torch.Tensor  # int64 [n, W], each row's blocks after its group's shared ones
    mask: torch.Tensor  # float32 [n, 1, max_q, W * block_size]: 0 where a query sees a key, -inf elsewhere


@dataclass(frozen=True)
class PrefillCascade:
    other_rows: tuple[int, ...]  # rows that keep the general path
    groups: tuple[_Group, ...]
    buckets: tuple[_Bucket, ...]


def prefill_cascade_plan(meta: AttentionMetadata, block_size: int) -> PrefillCascade | None:
    """The step's plan, or None when no group of two or more rows has a shared block before all its
    rows' new tokens."""
    groups = meta.prefill_groups
    if groups is None:
        return None
    return groups.once(("torch_prefill_cascade", block_size), lambda: _plan(meta, block_size))


def prefill_cascade_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim]
    plan: PrefillCascade,
    scale: float,
    gather: KVGather,
    out: torch.Tensor,  # [num_tokens, num_heads, head_dim]: the cascade rows' tokens are written
) -> None:
    suffix_out = q.new_empty(q.shape, dtype=torch.float32)
    suffix_lse = q.new_empty(q.shape[:2], dtype=torch.float32)
    for b in plan.buckets:
        suffix_out[b.tokens], suffix_lse[b.tokens] = _suffix_state(q, k_cache, v_cache, b, scale, gather)
    for g in plan.groups:
        prefix = _prefix_state(q[g.tokens], k_cache, v_cache, g.prefix_table, scale, gather)
        merged, _ = merge_attention_states((suffix_out[g.tokens], suffix_lse[g.tokens]), prefix)
        out[g.tokens] = merged.to(out.dtype)


def _plan(meta: AttentionMetadata, block_size: int) -> PrefillCascade | None:
    groups = meta.prefill_groups
    starts, shared = np.asarray(groups.starts, np.int64), np.asarray(groups.shared_blocks, np.int64)
    context = np.asarray(meta.seq_lens_cpu, np.int64) - np.asarray(meta.query_lens_cpu, np.int64)
    qsl = np.concatenate([[0], np.cumsum(meta.query_lens_cpu)]).astype(np.int64)
    row_shared = np.zeros(meta.num_seqs, dtype=np.int64)
    kept = []
    for g in np.flatnonzero((np.diff(starts) >= 2) & (shared > 0)):
        lo, hi = int(starts[g]), int(starts[g + 1])
        # Only blocks before every row's first new token: those tokens see the whole prefix.
        blocks = min(int(shared[g]), int(context[lo:hi].min()) // block_size)
        if (hi - lo - 1) * blocks * block_size >= max(MIN_SHARED_READS, 1):
            kept.append((lo, hi, blocks))
    kept = sorted(sorted(kept, key=lambda g: -(g[1] - g[0] - 1) * g[2])[:MAX_GROUPS])
    if not kept:
        return None
    for lo, hi, blocks in kept:
        row_shared[lo:hi] = blocks
    table = meta.block_tables
    cascade = np.flatnonzero(row_shared)
    return PrefillCascade(
        other_rows=tuple(np.flatnonzero(row_shared == 0).tolist()),
        groups=tuple(_Group(slice(qsl[lo], qsl[hi]), table[lo : lo + 1, :s].long()) for lo, hi, s in kept),
        buckets=tuple(_buckets(meta, cascade, row_shared, qsl, block_size)),
    )


def _buckets(meta: AttentionMetadata, cascade: np.ndarray, row_shared: np.ndarray, qsl, block_size: int):
    q_lens = np.asarray(meta.query_lens_cpu, np.int64)
    size_class = np.array([max(int(n) - 1, 0).bit_length() for n in q_lens[cascade]])
    for c in np.unique(size_class):
        yield _bucket(meta, cascade[size_class == c], row_shared, qsl, block_size)


def _bucket(meta: AttentionMetadata, rows: np.ndarray, row_shared: np.ndarray, qsl, block_size: int):
    dev = meta.block_tables.device
    q_lens = np.asarray(meta.query_lens_cpu, np.int64)[rows]
    seq_lens = np.asarray(meta.seq_lens_cpu, np.int64)[rows]
    base = row_shared[rows] * block_size  # first position of each row's suffix
    width = -(-int((seq_lens - base).max()) // block_size)
    cols = np.minimum(row_shared[rows, None] + np.arange(width), meta.block_tables.shape[1] - 1)
    tables = meta.block_tables.long()[torch.from_numpy(rows).to(dev)[:, None], torch.from_numpy(cols).to(dev)]
    key_pos = base[:, None, None] + np.arange(width * block_size)  # [n, 1, L]
    query_pos = (seq_lens - q_lens)[:, None, None] + np.arange(int(q_lens.max()))[:, None]  # [n, max_q, 1]
    visible = (key_pos <= query_pos) & (key_pos < seq_lens[:, None, None])  # columns past a table: masked
    mask = np.where(visible, np.float32(0), np.float32(-np.inf))[:, None]
    offsets = np.cumsum(q_lens) - q_lens
    row_of = np.repeat(np.arange(len(rows)), q_lens)
    j_of = np.arange(int(q_lens.sum())) - offsets[row_of]
    return _Bucket(
        tokens=torch.from_numpy(qsl[rows][row_of] + j_of).to(dev),
        row_of=torch.from_numpy(row_of).to(dev),
        j_of=torch.from_numpy(j_of).to(dev),
        tables=tables,
        mask=torch.from_numpy(mask).to(dev),
    )


def _suffix_state(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, b: _Bucket, scale: float, gather: KVGather
) -> tuple[torch.Tensor, torch.Tensor]:  # out [t, heads, head_dim] float32, lse [t, heads]
    heads, head_dim = q.shape[1], q.shape[2]
    kv_heads = k_cache.shape[2]
    group, (n, _, max_q, length) = heads // kv_heads, b.mask.shape
    qp = q.new_zeros(n, max_q, heads, head_dim, dtype=torch.float32)
    qp[b.row_of, b.j_of] = q[b.tokens].float()
    # GQA without copying K/V per head: the q heads of one kv head act as its query rows.
    qp = qp.view(n, max_q, kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)
    qp = qp.reshape(n, kv_heads, group * max_q, head_dim)
    outs, lses = [], []
    for rows in row_chunks(n, max(length, max_q * group) * kv_heads * head_dim):
        keys = gather.context("k", k_cache, b.tables[rows]).float()  # [m, kv_heads, L, head_dim]
        values = gather.context("v", v_cache, b.tables[rows]).float()
        mask = b.mask[rows].repeat(1, 1, group, 1)  # [m, 1, group * max_q, L], rows ordered like qp
        out, lse = attention_state(qp[rows], keys, values, mask, scale)
        outs.append(out)
        lses.append(lse)
    out = torch.cat(outs).view(n, kv_heads, group, max_q, head_dim).permute(0, 3, 1, 2, 4)
    lse = torch.cat(lses).view(n, kv_heads, group, max_q).permute(0, 3, 1, 2)
    at = (b.row_of, b.j_of)
    return out.reshape(n, max_q, heads, head_dim)[at], lse.reshape(n, max_q, heads)[at]


def _prefix_state(
    q: torch.Tensor,  # [t, heads, head_dim], one group's new tokens
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    table: torch.Tensor,  # int64 [1, S]
    scale: float,
    gather: KVGather,
) -> tuple[torch.Tensor, torch.Tensor]:  # out [t, heads, head_dim] float32, lse [t, heads]
    t, heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    group = heads // kv_heads
    # Every token of every row of the group is one query row of its kv head: the prefix is read once.
    qp = q.float().view(t, kv_heads, group, head_dim).permute(1, 2, 0, 3).reshape(1, kv_heads, -1, head_dim)
    keys = gather.context("k", k_cache, table).float()  # [1, kv_heads, S * block_size, head_dim]
    values = gather.context("v", v_cache, table).float()
    mask = qp.new_zeros(1, 1, 1, keys.shape[2])
    step = max(1, GATHER_ELEMENTS // (keys.shape[2] * kv_heads))  # bounds the scores off the CPU
    parts = [attention_state(qp[:, :, a : a + step], keys, values, mask, scale)
             for a in range(0, qp.shape[2], step)]  # fmt: skip
    out = torch.cat([p[0] for p in parts], 2) if len(parts) > 1 else parts[0][0]
    lse = torch.cat([p[1] for p in parts], 2) if len(parts) > 1 else parts[0][1]
    out = out.view(kv_heads, group, t, head_dim).permute(2, 0, 1, 3).reshape(t, heads, head_dim)
    return out, lse.view(kv_heads, group, t).permute(2, 0, 1).reshape(t, heads)
