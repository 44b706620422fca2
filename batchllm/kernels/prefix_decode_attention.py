"""Prefix-aware decode attention (one new token per row): a group's shared prefix read once for all its
rows. It splits each row's context at its group's shared prefix::

    row r of group g:  [0, shared_blocks[g] * block_size)  |  [..., seq_len[r])
                        shared prefix: same blocks for     |  the row's own blocks
                        every row of the group             |

One launch does both parts. A *shared* program takes a tile of ``SHARED_M`` query rows, each a
pair (row of the group, query head of one KV head), and one KV split of the group's prefix: every
prefix K/V tile is loaded once and multiplied against all of them (``tl.dot``). An *own* program
takes one row and the query heads of one KV head over the row's remaining blocks. Each writes a
partial (out, lse) state; ``merge_state_stack`` then combines the parts by log-sum-exp.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from batchllm.kernels.decode_attention import attend_rows
from batchllm.kernels.merge import LN2, merge_state_stack
from batchllm.kernels.metadata import AttentionMetadata, auto_splits
from batchllm.kernels.prefill_attention import (
    BLOCK_N,
    LOG2E,
    MIN_DOT,
    NO_WINDOW,
    check_decode_inputs,
    needs_f32_dot,
)

SHARED_BLOCK_M = 64
# The no-window value for the kernels: a global a kernel reads must be a constexpr (a plain int runs in
# the interpreter but does not compile).
ANY_POS = tl.constexpr(NO_WINDOW)


@triton.jit
def _store_state(
    part_out,  # [num_states, num_seqs, num_heads, head_dim] float32
    part_lse,  # [num_states, num_seqs, num_heads] float32, natural log
    state,
    seqs,  # [M]
    heads,  # [M]
    row_ok,  # [M]
    acc,  # [M, D_PAD]
    m_i,  # [M], base 2
    l_i,  # [M], > 0 for every row (each saw at least one position)
    stride_ps, stride_pt, stride_ph, stride_ls, stride_lt, stride_lh,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
):  # fmt: skip
    dims = tl.arange(0, D_PAD)
    row = state.to(tl.int64) * stride_ps + seqs.to(tl.int64) * stride_pt + heads.to(tl.int64) * stride_ph
    mask = row_ok[:, None] & (dims < HEAD_DIM)[None, :]
    tl.store(part_out + row[:, None] + dims[None, :], acc / l_i[:, None], mask=mask)
    lse_offs = state.to(tl.int64) * stride_ls + seqs.to(tl.int64) * stride_lt + heads.to(tl.int64) * stride_lh
    tl.store(part_lse + lse_offs, (m_i + tl.log2(l_i)) * LN2, mask=row_ok)


@triton.jit
def _shared_prefix_part(
    part_out, part_lse, q, k_cache, v_cache, block_tables, group_start_loc, shared_blocks,
    pid, kv_head, row_tiles, num_splits,
    stride_qt, stride_qh, stride_bt, stride_cb, stride_cs, stride_ch, stride_cd,
    stride_ps, stride_pt, stride_ph, stride_ls, stride_lt, stride_lh, qk_scale,
    QUERY_GROUP: tl.constexpr, ROWS_PER_TILE: tl.constexpr, SHARED_M: tl.constexpr,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    F32_DOT: tl.constexpr,
):  # fmt: skip
    """Program ``pid`` = (group, tile of rows, split): those rows over one split of the group's prefix."""
    group = pid // (row_tiles * num_splits)
    split = pid % num_splits
    group_start = tl.load(group_start_loc + group)
    first_seq = group_start + (pid // num_splits % row_tiles) * ROWS_PER_TILE
    end_seq = tl.load(group_start_loc + group + 1)
    n_blocks = tl.load(shared_blocks + group)
    per_split = tl.cdiv(n_blocks, num_splits)
    lo = split * per_split * BLOCK_SIZE
    hi = tl.minimum(n_blocks, (split + 1) * per_split) * BLOCK_SIZE
    if (first_seq < end_seq) & (lo < hi):
        rows = tl.arange(0, SHARED_M)
        seqs = first_seq + rows // QUERY_GROUP
        heads = kv_head * QUERY_GROUP + rows % QUERY_GROUP
        row_ok = (rows < ROWS_PER_TILE * QUERY_GROUP) & (seqs < end_seq)
        # Every row of the group has these blocks first in its table: read the group's first row.
        table = block_tables + group_start.to(tl.int64) * stride_bt
        acc, m_i, l_i = attend_rows(
            q, seqs, heads, row_ok, table, lo, hi, k_cache, v_cache,
            stride_qt, stride_qh, stride_cb, stride_cs, stride_ch, stride_cd, kv_head, qk_scale, ANY_POS,
            SHARED_M, HEAD_DIM, D_PAD, BLOCK_N, BLOCK_SIZE, F32_DOT,
        )  # fmt: skip
        _store_state(
            part_out, part_lse, split, seqs, heads, row_ok, acc, m_i, l_i,
            stride_ps, stride_pt, stride_ph, stride_ls, stride_lt, stride_lh, HEAD_DIM, D_PAD,
        )  # fmt: skip


@triton.jit
def _own_blocks_part(
    part_out, part_lse, q, k_cache, v_cache, seq_lens, block_tables, row_shared_blocks,
    seq, kv_head, num_splits,
    stride_qt, stride_qh, stride_bt, stride_cb, stride_cs, stride_ch, stride_cd,
    stride_ps, stride_pt, stride_ph, stride_ls, stride_lt, stride_lh, qk_scale,
    QUERY_GROUP: tl.constexpr, OWN_M: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, F32_DOT: tl.constexpr,
):  # fmt: skip
    """Row ``seq``'s query heads of one KV head over its blocks after the shared prefix."""
    lo = tl.load(row_shared_blocks + seq) * BLOCK_SIZE
    hi = tl.load(seq_lens + seq)
    if lo < hi:
        rows = tl.arange(0, OWN_M)
        seqs = tl.full([OWN_M], 0, tl.int32) + seq
        heads = kv_head * QUERY_GROUP + rows
        row_ok = rows < QUERY_GROUP
        table = block_tables + seq.to(tl.int64) * stride_bt
        acc, m_i, l_i = attend_rows(
            q, seqs, heads, row_ok, table, lo, hi, k_cache, v_cache,
            stride_qt, stride_qh, stride_cb, stride_cs, stride_ch, stride_cd, kv_head, qk_scale, ANY_POS,
            OWN_M, HEAD_DIM, D_PAD, BLOCK_N, BLOCK_SIZE, F32_DOT,
        )  # fmt: skip
        _store_state(
            part_out, part_lse, num_splits, seqs, heads, row_ok, acc, m_i, l_i,
            stride_ps, stride_pt, stride_ph, stride_ls, stride_lt, stride_lh, HEAD_DIM, D_PAD,
        )  # fmt: skip


# Runtime counts stay runtime values: a count of 1 would otherwise become a constexpr.
@triton.jit(do_not_specialize=["num_shared_programs", "row_tiles", "num_splits"])
def _prefix_decode_kernel(
    part_out,  # [num_splits + 1, num_seqs, num_heads, head_dim] float32
    part_lse,  # [num_splits + 1, num_seqs, num_heads] float32, pre-filled with -inf
    q,  # [num_seqs, num_heads, head_dim]
    k_cache,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache,  # [num_blocks, block_size, num_kv_heads, head_dim]
    seq_lens,  # [num_seqs] int32
    block_tables,  # [num_seqs, max_blocks_per_seq] int32
    group_start_loc,  # [num_groups + 1] int32
    shared_blocks,  # [num_groups] int32
    row_shared_blocks,  # [num_seqs] int32, shared_blocks of each row's group (0 outside groups)
    num_shared_programs, row_tiles, num_splits,
    stride_qt, stride_qh, stride_bt, stride_cb, stride_cs, stride_ch, stride_cd,
    stride_ps, stride_pt, stride_ph, stride_ls, stride_lt, stride_lh, qk_scale,
    QUERY_GROUP: tl.constexpr, ROWS_PER_TILE: tl.constexpr, SHARED_M: tl.constexpr, OWN_M: tl.constexpr,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    F32_DOT: tl.constexpr,
):  # fmt: skip
    """Programs ``[0, num_shared_programs)`` do the shared-prefix part, one more per row its own part;
    the shared part writes states ``0 .. num_splits-1``, the own part state ``num_splits``."""
    pid, kv_head = tl.program_id(0), tl.program_id(1)
    if pid < num_shared_programs:
        _shared_prefix_part(
            part_out, part_lse, q, k_cache, v_cache, block_tables, group_start_loc, shared_blocks,
            pid, kv_head, row_tiles, num_splits,
            stride_qt, stride_qh, stride_bt, stride_cb, stride_cs, stride_ch, stride_cd,
            stride_ps, stride_pt, stride_ph, stride_ls, stride_lt, stride_lh, qk_scale,
            QUERY_GROUP, ROWS_PER_TILE, SHARED_M, HEAD_DIM, D_PAD, BLOCK_N, BLOCK_SIZE, F32_DOT,
        )  # fmt: skip
    else:
        _own_blocks_part(
            part_out, part_lse, q, k_cache, v_cache, seq_lens, block_tables, row_shared_blocks,
            pid - num_shared_programs, kv_head, num_splits,
            stride_qt, stride_qh, stride_bt, stride_cb, stride_cs, stride_ch, stride_cd,
            stride_ps, stride_pt, stride_ph, stride_ls, stride_lt, stride_lh, qk_scale,
            QUERY_GROUP, OWN_M, HEAD_DIM, D_PAD, BLOCK_N, BLOCK_SIZE, F32_DOT,
        )  # fmt: skip


def prefix_decode_attention(
    q: torch.Tensor,  # [num_seqs, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    meta: AttentionMetadata,
    scale: float,
    num_splits: int | None = None,
) -> torch.Tensor:  # [num_seqs, num_heads, head_dim]
    """Decode that reads each group's shared prefix once for all its rows (``meta.decode_groups``).

    ``num_splits`` cuts each group's prefix into that many KV splits (None: enough to fill the GPU).
    """
    q = check_decode_inputs(q, k_cache, v_cache, meta)
    groups = meta.decode_groups
    if groups is None:
        raise ValueError("prefix_decode_attention needs meta.decode_groups; use paged_decode_attention")
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    num_seqs, num_heads, head_dim = q.shape
    if num_seqs == 0:
        return torch.empty_like(q)
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    shared_m = max(SHARED_BLOCK_M, triton.next_power_of_2(group))
    rows_per_tile = shared_m // group
    num_groups = groups.shared_blocks.shape[0]
    row_tiles = triton.cdiv(max(groups.max_group_size, 1), rows_per_tile)
    num_splits = num_splits or meta.num_splits
    if num_splits is None:
        num_splits = auto_splits(q.device, num_groups * row_tiles * num_kv_heads, meta.max_seq_len)
    part_out = torch.empty((num_splits + 1, *q.shape), dtype=torch.float32, device=q.device)
    part_lse = torch.full((num_splits + 1, num_seqs, num_heads), float("-inf"), device=q.device)
    num_shared_programs = num_groups * row_tiles * num_splits
    _prefix_decode_kernel[(num_shared_programs + num_seqs, num_kv_heads)](
        part_out, part_lse, q, k_cache, v_cache, meta.seq_lens, meta.block_tables,
        groups.group_start_loc, groups.shared_blocks, groups.row_shared_blocks(num_seqs),
        num_shared_programs, row_tiles, num_splits,
        q.stride(0), q.stride(1), meta.block_tables.stride(0), *k_cache.stride(),
        *part_out.stride()[:3], *part_lse.stride(), scale * LOG2E,
        QUERY_GROUP=group, ROWS_PER_TILE=rows_per_tile, SHARED_M=shared_m,
        OWN_M=max(MIN_DOT, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        D_PAD=max(MIN_DOT, triton.next_power_of_2(head_dim)), BLOCK_N=BLOCK_N, BLOCK_SIZE=k_cache.shape[1],
        F32_DOT=needs_f32_dot(_prefix_decode_kernel, q.dtype),
    )  # fmt: skip
    return merge_state_stack(part_out, part_lse, out=torch.empty_like(q)).out
