"""Cascade decode in plain torch: each group's shared prefix is read once for all its rows, each row
reads the rest of its context, and the two partial states are merged through their log-sum-exp.

No Python loop over groups per layer: groups of similar size (powers of two) are padded into one
batch each, so a layer runs a handful of batched products whatever the number of groups. The plan
(which rows sit in which padded slot) depends only on the step, so the first layer builds it and the
others reuse it (``DecodeGroups.once``)::

    bucket b:  rows [G, m]      row of each group slot (padding repeats the group's first row)
               prefix [G, P]    block ids of each group's shared prefix (padding: its first block)
    per layer: scores [G, m, kv, group, P * block_size] -> prefix state of every real slot
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from batchllm.kernels.kv_gather import KVGather, row_chunks
from batchllm.kernels.metadata import AttentionMetadata
from batchllm.kernels.torch_merge import merge_attention_states


@dataclass(frozen=True)
class _Bucket:
    rows: torch.Tensor  # int64 [G, m], row of each group slot
    real_slots: torch.Tensor  # int64 [r], flat indices (into G * m) of slots that hold a row of their own
    real_rows: torch.Tensor  # int64 [r], the row of each of those slots
    prefix_tables: torch.Tensor  # int64 [G, P], each group's shared block ids
    prefix_mask: torch.Tensor  # float32 [G, 1, 1, P * block_size]: 0 inside the prefix, -inf past it


@dataclass(frozen=True)
class _CascadePlan:
    suffix_tables: torch.Tensor  # int64 [n, W], each row's blocks after its group's shared ones
    suffix_mask: torch.Tensor  # float32 [n, 1, 1, W * block_size]: 0 where a row attends, -inf elsewhere
    buckets: tuple[_Bucket, ...]


def cascade_decode_attention(
    q: torch.Tensor,  # [num_seqs, num_heads, head_dim], one new token per sequence
    k_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim]
    meta: AttentionMetadata,
    scale: float,
    gather: KVGather | None = None,
) -> torch.Tensor:  # [num_seqs, num_heads, head_dim]
    """``gather``: reusable memory for the K/V copied out of the cache (a fresh one when None)."""
    gather = gather or KVGather()
    groups = meta.decode_groups
    num_seqs, num_heads, head_dim = q.shape
    kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    plan = groups.once(("torch_cascade", block_size), lambda: _plan(meta, block_size))
    qg = q.reshape(num_seqs, kv_heads, num_heads // kv_heads, head_dim).float()
    out, lse = _gathered_state(qg, k_cache, v_cache, plan.suffix_tables, plan.suffix_mask, scale, gather)
    out, lse = out.reshape(num_seqs, -1), lse.reshape(num_seqs, -1)  # merged in place below, row by row
    for b in plan.buckets:
        p_out, p_lse = _prefix_state(qg, k_cache, v_cache, b, scale, gather)
        p_out = p_out.flatten(0, 1)[b.real_slots]  # [r, kv, group, head_dim]
        p_lse = p_lse.flatten(0, 1)[b.real_slots]
        rows_out = out[b.real_rows].view(p_out.shape)
        rows_lse = lse[b.real_rows].view(p_lse.shape)
        merged_out, merged_lse = merge_attention_states((rows_out, rows_lse), (p_out, p_lse))
        out[b.real_rows] = merged_out.flatten(1)
        lse[b.real_rows] = merged_lse.flatten(1)
    return out.view(num_seqs, num_heads, head_dim).to(q.dtype)


def _plan(meta: AttentionMetadata, block_size: int) -> _CascadePlan:
    groups = meta.decode_groups
    starts = np.asarray(groups.group_start_cpu, dtype=np.int64)
    shared = np.asarray(groups.shared_blocks_cpu, dtype=np.int64)
    sizes = np.diff(starts)
    row_shared = np.zeros(meta.num_seqs, dtype=np.int64)
    row_shared[starts[0] : starts[-1]] = np.repeat(shared, sizes)
    keep = np.flatnonzero((shared > 0) & (sizes > 0))
    size_class = np.ceil(np.log2(np.maximum(sizes[keep], 1))).astype(np.int64)
    buckets = tuple(
        _bucket(meta, starts[g], sizes[g], shared[g], block_size)
        for g in (keep[size_class == c] for c in np.unique(size_class))
    )
    return _CascadePlan(*_suffix_plan(meta, row_shared, block_size), buckets)


def _suffix_plan(meta: AttentionMetadata, row_shared: np.ndarray, block_size: int):
    """Each row's blocks after its shared ones, padded to the widest, and the mask of real positions."""
    seq_lens = np.asarray(meta.seq_lens_cpu, dtype=np.int64)
    width = -(-int((seq_lens - row_shared * block_size).max(initial=1)) // block_size)
    cols = row_shared[:, None] + np.arange(width)[None, :]  # [n, W] block columns
    pos = cols[:, :, None] * block_size + np.arange(block_size)  # [n, W, block_size]
    valid = (pos < seq_lens[:, None, None]).reshape(len(seq_lens), 1, 1, -1)
    dev = meta.block_tables.device
    # Columns past a row's table are padding; their positions are >= seq_len, so the mask drops them.
    cols = torch.from_numpy(np.minimum(cols, meta.block_tables.shape[1] - 1)).to(dev)
    return meta.block_tables.long().gather(1, cols), _additive(valid, dev)


def _additive(valid: np.ndarray, dev: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.where(valid, np.float32(0), np.float32(-np.inf))).to(dev)


def _bucket(meta, starts: np.ndarray, sizes: np.ndarray, shared: np.ndarray, block_size: int) -> _Bucket:
    dev = meta.block_tables.device
    m, p = int(sizes.max()), int(shared.max())
    slot = np.arange(m)
    real = slot[None, :] < sizes[:, None]  # [G, m]
    rows = np.where(real, starts[:, None] + slot[None, :], starts[:, None])
    block_valid = np.arange(p)[None, :] < shared[:, None]  # [G, P]
    first_rows = torch.from_numpy(starts).to(dev)
    cols = torch.from_numpy(np.where(block_valid, np.arange(p)[None, :], 0)).to(dev)
    tables = meta.block_tables.long()[first_rows[:, None], cols]
    return _Bucket(
        rows=torch.from_numpy(rows).to(dev),
        real_slots=torch.from_numpy(np.flatnonzero(real)).to(dev),
        real_rows=torch.from_numpy(rows[real]).to(dev),
        prefix_tables=tables,
        prefix_mask=_additive(np.repeat(block_valid, block_size, axis=1)[:, None, None, :], dev),
    )


def _prefix_state(
    qg: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, b: _Bucket, scale: float, gather: KVGather
) -> tuple[torch.Tensor, torch.Tensor]:  # out [G, m, kv, group, head_dim], lse [G, m, kv, group]
    q = qg[b.rows]  # [G, m, kv, group, head_dim]
    num_g, m, kv, group, head_dim = q.shape
    q = q.permute(0, 2, 1, 3, 4).reshape(num_g, kv, m * group, head_dim)  # a group's queries share its keys
    out, lse = _gathered_state(q, k_cache, v_cache, b.prefix_tables, b.prefix_mask, scale, gather)
    out = out.view(num_g, kv, m, group, head_dim).permute(0, 2, 1, 3, 4)
    return out, lse.view(num_g, kv, m, group).permute(0, 2, 1, 3)


def _gathered_state(
    q: torch.Tensor,  # [B, kv_heads, Lq, head_dim] float32
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    tables: torch.Tensor,  # [B, W] the blocks each batch entry reads
    mask: torch.Tensor,  # [B, 1, 1, W * block_size]
    scale: float,
    gather: KVGather,
) -> tuple[torch.Tensor, torch.Tensor]:  # out [B, kv_heads, Lq, head_dim], lse [B, kv_heads, Lq]
    """``attention_state`` over each entry's blocks, gathered a bounded number of entries at a time.
    Used for each row's context after its group's shared blocks (padded, masked) too."""
    outs, lses = [], []
    for rows in row_chunks(tables.shape[0], tables.shape[1] * k_cache[0].numel()):
        keys = gather.context("k", k_cache, tables[rows]).float()  # [b, kv_heads, L, head_dim]
        values = gather.context("v", v_cache, tables[rows]).float()
        out, lse = attention_state(q[rows], keys, values, mask[rows], scale)
        outs.append(out)
        lses.append(lse)
    if len(outs) == 1:
        return outs[0], lses[0]
    return torch.cat(outs), torch.cat(lses)


def attention_state(
    q: torch.Tensor,  # [B, H, Lq, D] float32
    k: torch.Tensor,  # [B, H, Lk, D]
    v: torch.Tensor,  # [B, H, Lk, D]
    mask: torch.Tensor,  # float32, broadcasts to [B, H, Lq, Lk]: 0 or -inf; every query sees a key
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # out [B, H, Lq, D], lse [B, H, Lq]
    """Softmax attention and its log-sum-exp (what a merge needs). On the CPU, torch's fused flash
    kernel returns both in one pass; elsewhere, the scores are materialised."""
    if q.device.type == "cpu" and _CPU_FLASH is not None:
        out, lse = _CPU_FLASH(q, k, v, 0.0, False, attn_mask=mask, scale=scale)
        return out, lse
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(scale).add_(mask)
    lse = scores.logsumexp(-1)
    return torch.matmul(scores.sub_(lse[..., None]).exp_(), v), lse


_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
